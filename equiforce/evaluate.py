"""Evaluate a potential on labelled structures: MAE/RMSE tables and parity plots.

The batch loop here is also the trainer's validation loop, so "validation error" during training and
``equiforce eval`` afterwards are computed by the same code and agree.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from equiforce.data import keys as K
from equiforce.data.graph import Graph, collate, config_to_graph, to_device
from equiforce.data.packed import GraphStore
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError, DataError, UnknownElementError
from equiforce.models.potential import Potential
from equiforce.train.hessian_loss import batch_has_hessians, hessian_vector_products
from equiforce.train.metrics import UNITS, ErrorMetrics

KEEP_MAX = 200_000  # rows per quantity kept for a parity plot (more points than a plot can show)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None → CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:  # "gpu", "mps:x", a typo: torch's own list of device types
        raise ConfigError(f"device {device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'auto' ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {str(device)!r}: equiforce runs on 'cpu' or 'cuda' ('auto' picks)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available (use 'cpu' or 'auto')")
    return device


def check_known_elements(model, numbers, source: str, frame: int | None, note: str = "") -> None:
    """``model.check_elements`` with the structure's file and frame named (``note``: what the model is)."""
    try:
        model.check_elements(numbers)
    except UnknownElementError as err:
        raise DataError(f"{err}{note}", source=source, frame=frame, field="numbers") from None


def as_graphs(model: Potential, data: Sequence[Configuration | Graph] | GraphStore) -> Sequence[Graph]:
    """Graphs in the model's cutoff and dtype; configurations are checked for unknown elements first.  A packed
    dataset stays on disk (its graphs are read batch by batch), its edges within the model's cutoff."""
    if isinstance(data, GraphStore):
        return store_for(model, data)
    dtype = next(model.parameters()).dtype
    graphs = []
    for item in data:
        if isinstance(item, Configuration):
            check_known_elements(model, item.numbers, item.source, item.frame)
            item = config_to_graph(item, model.cutoff, dtype)
        graphs.append(item)
    return graphs


def store_for(model: Potential, store: GraphStore) -> GraphStore:
    """``store`` checked for elements the model lacks (the first structure holding one is named, from the summary)
    and cut to the model's cutoff."""
    for z in store.elements:
        try:
            model.check_elements([z])
        except UnknownElementError:
            holding = store.holding(z)
            if len(holding):
                first = store.configuration(int(holding[0]))
                check_known_elements(model, first.numbers, first.source, first.frame,
                                     f"; {len(holding)} structures of {store.root} hold it")
    return store.within(model.cutoff)


def run_batches(model: Potential, graphs: Sequence[Graph], batch_size: int, device: torch.device,
                metrics=None, compute_forces: bool = True, compute_stress: bool | None = None,
                hessian_vectors: int = 0) -> None:
    """Predict every graph in order and feed each batch to ``metrics`` (anything with ``update(pred, batch)``:
    :class:`ErrorMetrics`, a :class:`~equiforce.train.loss.LossSums`, several through :class:`Fanout`).

    Forces need autograd even at evaluation, so this runs with grad enabled but builds no second-order
    graph — except for batches with Hessian labels when ``hessian_vectors`` > 0: their ``H·v`` products use
    vectors seeded by the batch's position, so every validation sees the same ones.
    ``compute_stress=None`` computes stress only when some graph carries a stress label.
    """
    if compute_stress is None:
        compute_stress = has_labels(graphs, K.HAS_STRESS)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for start in range(0, len(graphs), batch_size):
                chunk = graphs[start:start + batch_size]
                batch = to_device(collate(chunk), device, dtype)
                hessian = hessian_vectors > 0 and batch_has_hessians(batch)
                if hessian:
                    batch[K.POSITIONS] = batch[K.POSITIONS].detach().requires_grad_(True)
                pred = model(batch, compute_forces=compute_forces or hessian, compute_stress=compute_stress,
                             create_graph=hessian)
                if hessian:
                    pred.update(hessian_vector_products(pred[K.FORCES], batch[K.POSITIONS], batch, hessian_vectors,
                                                        torch.Generator().manual_seed(start), create_graph=False))
                pred = {k: v.detach() for k, v in pred.items()}
                if metrics is not None:
                    metrics.update(pred, batch)
    finally:
        model.train(was_training)


class Fanout:
    """Feeds each batch to several sinks (the overall metrics, a group's, a σ collector), so one pass gives all."""

    def __init__(self, *sinks) -> None:
        self.sinks = sinks

    def update(self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        for sink in self.sinks:
            sink.update(pred, batch)


def has_labels(graphs: Sequence[Graph], flag: str) -> bool:
    """Whether any graph carries the label of ``flag`` (``K.HAS_STRESS``, ...); a pack's from its summary."""
    if isinstance(graphs, GraphStore):  # from the summary, without reading the structures
        return graphs.labelled(flag)
    return any(float(g[flag].sum()) > 0 for g in graphs)


def _groups(configs: Sequence[Configuration | Graph], graphs: Sequence[Graph]) -> dict[str, Sequence[Graph]]:
    """The graphs of each ``config_type`` (for a packed dataset, stores over its rows of each type)."""
    if isinstance(graphs, GraphStore):
        types = graphs.column("config_type")
        return {graphs.index["config_types"][int(t)]: graphs.subset(np.flatnonzero(types == t))
                for t in np.unique(types)}
    groups: dict[str, list[Graph]] = {}
    for item, graph in zip(configs, graphs):
        groups.setdefault(str(item.config_type) if isinstance(item, Configuration) else "None", []).append(graph)
    return groups


def _counts(graphs: Sequence[Graph]) -> dict[str, int]:
    if isinstance(graphs, GraphStore):
        return {"n_configs": len(graphs), "n_atoms": int(graphs.column("n_atoms").sum())}
    return {"n_configs": len(graphs), "n_atoms": int(sum(int(g[K.N_ATOMS].sum()) for g in graphs))}


def _hessian_labelled(configs: Sequence[Configuration | Graph]) -> tuple[int, Iterable[Configuration]]:
    """How many structures carry a Hessian label, and those structures (from a pack: read one at a time, each
    holding 9N² numbers)."""
    if isinstance(configs, GraphStore):
        positions = np.flatnonzero(configs.column(K.HAS_HESSIAN))
        return len(positions), (configs.configuration(int(k)) for k in positions)
    labelled = [c for c in configs if isinstance(c, Configuration) and c.hessian is not None]
    return len(labelled), labelled


def evaluate(model: Potential, configs: Sequence[Configuration | Graph] | GraphStore, batch_size: int = 16,
             device: str | torch.device | None = "cpu", compute_stress: bool | None = None,
             keep_values: bool = False, hessians: bool = True, by_config_type: bool = False,
             observers: Sequence = (), keep_max: int | None = KEEP_MAX) -> dict:
    """Energy (per atom, meV/atom, and per structure, meV), force (meV/Å) and stress (meV/Å³) MAE and RMSE.

    The model is moved to ``device`` (in place, as ``Module.to`` does).
    With ``keep_values=True`` the result also holds ``"values"``: ``{quantity: (pred, ref)}`` arrays in eV
    units for :func:`parity_plot`.  ``hessians=False`` skips the full Hessians of Hessian-labelled structures
    (3N backward passes each).  ``by_config_type=True`` adds ``"by_config_type"``: the same metrics for each
    ``config_type`` on its own (MD temperatures, dimers, surfaces, ...), because one overall MAE hides which
    kind of structure a model gets wrong.  The groups come from the same pass over the data (batches are
    formed within a group); the key is left out when all structures share one type.  ``observers`` get every
    batch's predictions and labels too (``update(pred, batch)``, e.g. a
    :class:`~equiforce.uq.predict.UQCollector`), in the same pass.

    ``configs`` may be a packed dataset (:class:`~equiforce.data.packed.GraphStore`): its structures are read
    batch by batch, so memory holds one batch (and the kept values: at most ``keep_max`` rows per quantity, an
    even sample, with ``"values_every"`` saying 1 in how many rows were kept where not all were).
    """
    device = resolve_device(device)
    model = model.to(device)
    graphs = as_graphs(model, configs)
    if compute_stress is None:  # decided once, so every group (and every observer's batch) has the same outputs
        compute_stress = has_labels(graphs, K.HAS_STRESS)
    metrics = ErrorMetrics(keep=keep_values, keep_max=keep_max)
    groups = _groups(configs, graphs) if by_config_type else {}
    per_group: dict[str, dict] = {}
    if len(groups) > 1:
        for name, members in sorted(groups.items()):
            group_metrics = ErrorMetrics()
            run_batches(model, members, batch_size, device, Fanout(metrics, group_metrics, *observers),
                        compute_stress=compute_stress)
            per_group[name] = {**group_metrics.compute(), **_counts(members)}
    elif len(graphs):
        run_batches(model, graphs, batch_size, device, Fanout(metrics, *observers), compute_stress=compute_stress)
    result: dict = dict(metrics.compute())
    count, labelled = _hessian_labelled(configs) if hessians else (0, ())
    if count:
        result.update(hessian_errors(model, labelled, device))
    result.update(_counts(graphs))
    if keep_values:
        result["values"] = metrics.values() if len(graphs) else {}
        thinned = {name: every for name, every in metrics.kept_every().items() if every > 1}
        if thinned:
            result["values_every"] = thinned
    if per_group:
        result["by_config_type"] = per_group
    return result


def hessian_errors(model: Potential, configs: Iterable[Configuration], device: torch.device | str = "cpu") -> dict:
    """Full model Hessians (3N backward passes each) against the labels: entry-wise ``hessian_mae``/``_rmse``
    in meV/Å², and ``frequency_mae_cm`` over the harmonic frequencies above the rigid-body modes (the 6, 5 for a
    linear molecule, 3 for a periodic cell, lowest |ω|), each set sorted; ``n_hessians`` structures."""
    from equiforce.sim.hessian import frequencies_from_hessian, hessian

    abs_sum = sq_sum = count = 0.0
    freq_errors: list[np.ndarray] = []
    for config in configs:
        atoms = config.to_atoms()
        predicted = hessian(model, atoms, device=str(device))
        error = predicted - config.hessian
        abs_sum += float(np.abs(error).sum())
        sq_sum += float(np.square(error).sum())
        count += error.size
        skip = rigid_body_modes(atoms)
        freqs = [frequencies_from_hessian(h, atoms.get_masses()) for h in (predicted, config.hessian)]
        freqs = [np.sort(f[np.argsort(np.abs(f))[skip:]]) for f in freqs]
        freq_errors.append(np.abs(freqs[0] - freqs[1]))
    return {"hessian_mae": 1000.0 * abs_sum / count, "hessian_rmse": 1000.0 * float(np.sqrt(sq_sum / count)),
            "frequency_mae_cm": float(np.mean(np.concatenate(freq_errors))), "n_hessians": len(freq_errors)}


def rigid_body_modes(atoms) -> int:
    """Zero-frequency modes of a free structure: 3 translations for a periodic cell; for a molecule 3 + 3
    rotations, or 3 + 2 when it is linear (no rotation about its axis), 3 for a single atom."""
    if atoms.pbc.any() or len(atoms) == 1:
        return 3
    inertia = np.sort(atoms.get_moments_of_inertia())
    return 5 if inertia[0] < 1e-6 * max(inertia[-1], 1e-12) else 6


_PANELS = (("energy_per_atom", "energy per atom", "eV/atom"), ("forces", "force", "eV/Å"),
           ("stress", "stress", "eV/Å³"))


def parity_plot(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray], path: str | os.PathLike,
                title: str | None = None, metrics: dict[str, float] | None = None,
                every: dict[str, int] | None = None) -> Path:
    """Predicted vs reference scatter, one panel per quantity present (energy per atom, forces, stress).

    Each panel's MAE and RMSE are those of ``metrics`` (from :func:`evaluate`, over all the data) where given, else
    of the points shown; ``every`` says where only 1 in so many points is shown."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    from equiforce.utils.atomic_io import atomic_write

    panels = [p for p in _PANELS if p[0] in pred and p[0] in ref and np.size(ref[p[0]]) > 0]
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 4.2))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    for ax, (name, label, unit) in zip(axes[0], panels):
        x, y = np.ravel(ref[name]), np.ravel(pred[name])
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1, zorder=0)
        ax.scatter(x, y, s=6, alpha=0.6, edgecolors="none")
        mae = 1000.0 * float(np.mean(np.abs(y - x)))
        rmse = 1000.0 * float(np.sqrt(np.mean((y - x) ** 2)))
        if metrics is not None and f"{name}_mae" in metrics:
            mae, rmse = metrics[f"{name}_mae"], metrics[f"{name}_rmse"]
        shown = f"\n(1 in {every[name]} points shown)" if every and every.get(name, 1) > 1 else ""
        ax.set_title(f"{label}: MAE {mae:.3g}, RMSE {rmse:.3g} {UNITS[name]}{shown}", fontsize=9)
        ax.set_xlabel(f"reference {label} ({unit})")
        ax.set_ylabel(f"predicted {label} ({unit})")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
    if not panels:
        axes[0][0].text(0.5, 0.5, "no labelled data", ha="center", va="center")
        axes[0][0].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return Path(path)
