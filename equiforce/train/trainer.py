"""The training loop: data → statistics → model → epochs of Adam + EMA → best/last model files.

Three layers, so callers can enter where their data is:

* :func:`train` — from a :class:`TrainConfig` (the CLI): reads files, then calls
* :func:`train_configs` — from in-memory configurations: elements, E0s, graphs, normalisation statistics,
  the model; then calls
* :func:`fit` — from a built model and graphs: the epoch loop, validation, checkpoints, resume.

Resume is exact: the checkpoint holds everything the loop reads (weights, EMA, optimiser and scheduler
state, the shuffling generator and global RNGs, counters), so an interrupted run continued from its
checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

from equiforce.data import keys as K
from equiforce.data.graph import Graph, collate, config_to_graph, to_device
from equiforce.data.packed import GraphStore, data_sha256, is_pack
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError, DataError, ModelFileError, TrainingError
from equiforce.evaluate import Fanout, evaluate, resolve_device, run_batches
from equiforce.models.compiled import CompiledForces
from equiforce.models.file import load_model, read_header, save_model
from equiforce.models.potential import Potential, build_model
from equiforce.models.spec import ModelSpec, fade_from_closest
from equiforce.train import distributed
from equiforce.train.batching import make_batches
from equiforce.train.checkpoint import load_checkpoint, save_checkpoint
from equiforce.train.config import (
    COMPUTED_SPEC_FIELDS,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    format_validation_error,
)
from equiforce.train.ema import EMA
from equiforce.train.hessian_loss import batch_has_hessians, hessian_vector_products
from equiforce.train.loading import BatchReader
from equiforce.train.loss import TERMS as LOSS_TERMS
from equiforce.train.loss import LossSums, WeightedLoss
from equiforce.train.metrics import ErrorMetrics
from equiforce.train.schedule import LearningRate
from equiforce.utils.atomic_io import atomic_write_text, fsync_path
from equiforce.utils.digest import graphs_sha256
from equiforce.utils.locking import held_lock
from equiforce.utils.paths import check_output_directory

CHECKPOINT = "checkpoint.safetensors"
BEST_MODEL = "best.eqf"
LAST_MODEL = "last.eqf"
METRICS_LOG = "metrics.jsonl"
BEST_PENDING = "best.eqf.next"  # a new best model, until the checkpoint that records it is written


def promote_best(out: Path, best_epoch: int) -> None:
    """Make the pending best model ``best.eqf`` once a checkpoint records its epoch as the best; a pending model
    of another epoch belongs to epochs a resumed run does again (after a kill), and is dropped.  So ``best.eqf``
    is always the best of the epochs the checkpoint holds, even when a redone epoch turns out differently."""
    pending = out / BEST_PENDING
    if not pending.exists():
        return
    try:
        epoch = int(read_header(pending)["extra"]["training"]["epoch"])
    except (ModelFileError, KeyError, TypeError, ValueError):
        epoch = -1  # cut short by a kill: never recorded by a checkpoint
    if epoch == best_epoch:
        os.replace(pending, out / BEST_MODEL)
        fsync_path(out)
    else:
        pending.unlink()


DTYPES = {"float64": torch.float64, "float32": torch.float32, "tf32": torch.float32}
REFIT_RTOL = 1e-4
"""Eigenvalues of the shift refit's normal matrix below this fraction of the largest are not fitted (singular
values of the per-atom design below 1 % of the largest: compositions that vary by less are treated as one)."""

EpochCallback = Callable[[dict[str, Any]], None]
"""Called with each epoch's log record after its checkpoint is written; raising stops training there."""


# ----------------------------------------------------------------------------------------------- optimiser
def build_optimizer(model: torch.nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Adam(W) over the model; with ``weight_decay_on: interactions`` the decay reaches only the interaction
    blocks (``blocks.*``), so the per-element embedding and the energy readouts, which set absolute energies,
    are not pulled towards zero."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    if cfg.weight_decay_on == "interactions":
        named = list(model.named_parameters())
        decayed = [p for n, p in named if n.startswith("blocks.")]
        rest = [p for n, p in named if not n.startswith("blocks.")]
        groups = [{"params": decayed}, {"params": rest, "weight_decay": 0.0}]
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)


def build_schedule(cfg: TrainingConfig) -> LearningRate:
    """The learning rate as a function of progress (see :mod:`equiforce.train.schedule`)."""
    return LearningRate(cfg.lr, cfg.scheduler, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                        plateau_factor=cfg.plateau_factor, plateau_patience=cfg.plateau_patience,
                        gamma=cfg.exponential_gamma)


def _apply_dtype_mode(mode: str) -> Callable[[], None]:
    """Enable TensorFloat-32 matmuls for ``tf32``; returns a function restoring the previous settings."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if mode == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def restore() -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous

    return restore


# ----------------------------------------------------------------------------------------------- RNG state
def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {"shuffle": generator.get_state(), "torch": torch.get_rng_state(),
                             "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- logging
def _truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines of epochs after the checkpoint (written before a crash, redone on resume)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= last_epoch:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _summary(record: dict[str, Any]) -> str:
    parts = [f"loss {record['train_loss']:.4g}"]
    if "valid_loss" in record:
        parts.append(f"valid {record['valid_loss']:.4g}")
    for key, label in (("valid_energy_per_atom_mae", "E {:.3g} meV/at"), ("valid_forces_mae", "F {:.3g} meV/Å"),
                       ("valid_stress_mae", "S {:.3g} meV/Å³")):
        if key in record:
            parts.append(label.format(record[key]))
    return " | ".join(parts)


class _Reporter:
    """Rich progress bar on a terminal, one plain line per epoch otherwise, or silence."""

    def __init__(self, progress: bool | None, total: int, start: int) -> None:
        if progress is None:
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        else:
            self.mode = "bar" if progress else "off"
        self.total, self.start = total, start
        self._progress = None

    def __enter__(self) -> _Reporter:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("epoch"), MofNCompleteColumn(), BarColumn(bar_width=30),
                                      TimeRemainingColumn(), TextColumn("{task.description}"),
                                      console=Console(stderr=True, highlight=False))
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.start)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def info(self, message: str) -> None:
        if self.mode == "bar":
            self._progress.console.print(message)
        elif self.mode == "lines":
            print(message, file=sys.stderr, flush=True)

    def epoch(self, record: dict[str, Any], best_epoch: int) -> None:
        line = f"epoch {record['epoch']}/{self.total}: {_summary(record)} ({record['time']:.1f} s)"
        if self.mode == "bar":  # the log scrolls above the bar
            self._progress.console.print(line)
            self._progress.update(self._task, completed=record["epoch"], description=f"best: epoch {best_epoch}")
        elif self.mode == "lines":
            print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- fit
def _result(state: dict[str, Any], out: Path, resumed_from: int | None) -> dict[str, Any]:
    return {"epochs": state["epoch"], "best_epoch": state["best_epoch"], "best_loss": state["best_loss"],
            "train_loss": state["train_loss"], "valid": dict(state["best_metrics"]),
            "stopped_early": state["stopped_early"], "resumed_from": resumed_from,
            "elapsed": state.get("elapsed", 0.0), "out_of_time": state.get("out_of_time", False),
            "output_dir": str(out), "best_model": str(out / BEST_MODEL), "last_model": str(out / LAST_MODEL)}


TRAIN_LOCK = "train.lock"  # held while a process trains into the directory (one at a time)
RESUMABLE_TRAINING_KEYS = frozenset({"epochs", "max_time", "max_epochs_without_improvement", "valid_batch_size",
                                     "device", "compile", "compile_backend"})
"""Training settings a resumed run may change: how long it goes on, and where and how fast it runs.  The others
(batches, loss, schedule, seed, ...) decide the course of training; a run that changed them half-way would be
neither the old run nor the new one, so a resume refuses them."""


def spec_difference(saved: ModelSpec, now: ModelSpec, limit: int = 4) -> str:
    """The fields in which two specs differ, as ``model.KEY: was → now`` (for a refused resume: a changed
    default, e.g. a new model option, is then named, not guessed); fields computed from the data, which no
    config key sets, are named as such."""
    before, after = saved.model_dump(mode="json"), now.model_dump(mode="json")
    keys = [key for key in after if before.get(key) != after[key]]
    shown = [f"{'data-derived ' if key in COMPUTED_SPEC_FIELDS else 'model.'}{key}: {before.get(key)!r:.60} → "
             f"{after[key]!r:.60}" for key in keys[:limit]]
    more = f"; and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(shown) + more


def fit(model: Potential, train_graphs: Sequence[Graph], valid_graphs: Sequence[Graph], training: TrainingConfig,
        output_dir: str | os.PathLike, *, resume: bool = True, checkpoint_every: int = 1,
        progress: bool | None = None, extra: dict[str, Any] | None = None,
        epoch_callback: EpochCallback | None = None, workers: int = 0) -> dict[str, Any]:
    """Train ``model`` on graphs; write best/last models, checkpoint and metrics log into ``output_dir``.

    The EMA weights (or the raw ones when ``ema_decay`` is 0) are validated each epoch and saved; the best
    by ``training.select_by`` (on the training loss when there is no validation set) goes to ``best.eqf``.
    Progress — the larger of the epoch fraction and the ``max_time`` fraction — drives the cosine decay and
    the start of stage two, so a run with a wall-clock budget anneals within it.  With ``resume`` and an
    existing checkpoint, training continues after its epoch; a finished run only returns its result.
    ``extra`` is stored in the model files' headers and the checkpoint.  Graphs may be a list in memory or a
    :class:`~equiforce.data.packed.GraphStore` read from disk batch by batch (``workers`` processes reading ahead).
    """
    if not train_graphs:
        raise DataError("no training structures")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = resolve_device(training.device), DTYPES[training.dtype]
    ranks = distributed.setup(device.type)
    device = distributed.device_for(ranks, device)
    restore_dtype_mode = _apply_dtype_mode(training.dtype)
    try:
        with held_lock(out / TRAIN_LOCK, f"training in {out}", take=ranks.main):
            result = _fit(model, train_graphs, valid_graphs, training, out, device, dtype, ranks, resume=resume,
                          checkpoint_every=checkpoint_every, progress=progress if ranks.main else False,
                          extra=dict(extra or {}), epoch_callback=epoch_callback, workers=workers)
    finally:
        restore_dtype_mode()
    distributed.barrier(ranks)  # other ranks read rank 0's model files only once they are written
    return result


@torch.no_grad()
def refit_shift(eval_model: Potential, models: Sequence[Potential], graphs: Sequence[Graph], batch_size: int) -> None:
    """Least-squares refit of the per-element energy shifts on ``eval_model``'s per-atom energy residuals.

    With forces dominating the loss, the energy offset of a single-composition data set (where the E0s are
    not determined) drifts freely and costs accuracy in energies only; refitting the linear part of the
    model each epoch removes that drift at the price of one energy-only pass over ``graphs``.
    The correction is added to every model in ``models`` (the trained one and its EMA).
    """
    n_el = len(eval_model.spec.elements)
    dtype = eval_model.shift_correction.dtype
    device = eval_model.shift_correction.device
    normal = torch.zeros(n_el, n_el, dtype=torch.float64, device=device)
    rhs = torch.zeros(n_el, dtype=torch.float64, device=device)
    was_training = eval_model.training
    eval_model.eval()
    for first in range(0, len(graphs), batch_size):
        batch = collate(graphs[first:first + batch_size])
        residual = batch[K.ENERGY] - eval_model(batch, compute_forces=False)[K.ENERGY]
        scale = (batch[K.HAS_ENERGY] * batch[K.WEIGHT]).sqrt() / batch[K.N_ATOMS].to(residual.dtype)
        design = (eval_model.shift_design(batch) * scale[:, None]).double()
        normal += design.T @ design
        rhs += design.T @ (residual * scale).double()
    eval_model.train(was_training)
    # Only directions the data determine: with one composition the design's columns differ only through the
    # small per-structure variation of the gates (eigenvalues ~1e-8 of the largest for BOTNet ethanol),
    # and inverting those turned energy noise into shifts of tens of eV of opposite sign per element, which
    # left bonded structures unchanged but wrecked every geometry with other gates (dimers, H removal).
    delta = (torch.linalg.pinv(normal, rtol=REFIT_RTOL, hermitian=True) @ rhs).to(dtype)
    for model in models:
        model.shift_correction += delta


def _hessian_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one step's random Hessian vectors: fixed by the run's seed, the step and the rank (so an exact
    resume draws the same ones), and apart from the shuffling stream, which every rank must draw alike."""
    return (seed * 1_000_003 + step * 9_973 + rank * 104_729 + 17) % (2**63)


def _check_finite_loss(value: float, which: str, epoch: int, last_saved: int, out: Path) -> None:
    """Stop a diverged run at once: a NaN loss is never "better", so no best model would ever be written, and
    every further epoch only overwrites the last good checkpoint with NaN weights."""
    if math.isfinite(value):
        return
    kept = f"the last checkpoint in {out}, before it, is kept" if last_saved else "no checkpoint was written"
    raise TrainingError(f"training diverged in epoch {epoch}: the {which} loss is {value} ({kept}); lower "
                        "training.lr or raise training.warmup_steps, and check the labels' units and data.e0s")


def _stage_two_weights(training: TrainingConfig) -> dict[str, float]:
    stage = training.stage_two
    assert stage is not None
    return {"energy": stage.energy_weight,
            "forces": training.forces_weight if stage.forces_weight is None else stage.forces_weight,
            "stress": training.stress_weight if stage.stress_weight is None else stage.stress_weight}


def _fit(model: Potential, train_graphs: Sequence[Graph], valid_graphs: Sequence[Graph], training: TrainingConfig,
         out: Path, device: torch.device, dtype: torch.dtype, ranks: distributed.Ranks, *, resume: bool,
         checkpoint_every: int, progress: bool | None, extra: dict[str, Any],
         epoch_callback: EpochCallback | None, workers: int) -> dict[str, Any]:
    model = model.to(device=device, dtype=dtype)
    # the module whose forward gives energies/forces/stress for the loss: the model, or its compiled graph
    core: torch.nn.Module = CompiledForces(model, training.compile_backend) if training.compile else model
    net: torch.nn.Module = core
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        # DDP's reducer says once when a gradient's memory layout differs from its bucket's (it then copies it):
        # a performance note printed with a source line that reads like a crash, not a problem of the run
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        net = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    optimizer = build_optimizer(model, training)
    schedule = build_schedule(training)
    ema = EMA(model, training.ema_decay) if training.ema_decay > 0 else None
    loss_fn = WeightedLoss(training.energy_weight, training.forces_weight, training.stress_weight,
                           kind=training.loss, huber_delta=training.huber_delta,
                           hessian_weight=training.hessian_weight)
    generator = torch.Generator().manual_seed(training.seed)
    state: dict[str, Any] = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "best_metrics": {},
                             "epochs_without_improvement": 0, "stopped_early": False, "train_loss": None,
                             "elapsed": 0.0, "out_of_time": False, "step": 0, "stage": 1}
    ckpt_path, log_path = out / CHECKPOINT, out / METRICS_LOG
    resumed_from = None
    data_digests = {name: {"sha256": graphs_sha256(graphs), "structures": len(graphs)}
                    for name, graphs in (("training", train_graphs), ("validation", valid_graphs))}
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        before = ckpt.get("training", {})
        # what decides the course of training (and what the saved optimizer state and schedule are bound to:
        # parameter groups, precision, the rate): a resumed run that changed it would be neither run
        now = training.model_dump(mode="json")
        changed = [f"training.{key}: {before[key]!r:.40} → {now.get(key)!r:.40}" for key in sorted(before)
                   if key not in RESUMABLE_TRAINING_KEYS and before[key] != now.get(key)]
        if changed:
            raise ConfigError(f"{ckpt_path} was trained with {'; '.join(changed[:4])}"
                              f"{f'; and {len(changed) - 4} more' if len(changed) > 4 else ''}; only "
                              f"{', '.join(sorted(RESUMABLE_TRAINING_KEYS))} may change on resume. Set them as they "
                              "were, use another output directory, or output.resume: false")
        for name, digest in data_digests.items():
            saved_digest = ckpt.get("data", {}).get(name)
            if saved_digest is not None and saved_digest["sha256"] != digest["sha256"]:
                repacked = (" or a pack made again with another --shard-mb or --dtype"
                            if isinstance(train_graphs, GraphStore) else "")
                raise ConfigError(f"{ckpt_path} was trained on other {name} data ({saved_digest['structures']} "
                                  f"structures then, {digest['structures']} now, contents differ{repacked}); give "
                                  "the same files, use another output directory, or output.resume: false")
        saved = ModelSpec.model_validate_json(ckpt["spec"])
        if saved != model.spec:
            raise ConfigError(f"{ckpt_path} was written for a different model ({spec_difference(saved, model.spec)}); "
                              "set those in the config as they were, use another output directory, or set "
                              "output.resume: false")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        _set_rng_state(generator, ckpt["rng"])
        state.update(ckpt["progress"])
        resumed_from = state["epoch"]
        if ranks.main:
            _truncate_log(log_path, state["epoch"])
            promote_best(out, state["best_epoch"])  # a kill after the checkpoint / before a redone epoch's best
    elif ranks.main:
        log_path.unlink(missing_ok=True)
    if state["stage"] == 2:
        weights = _stage_two_weights(training)
        loss_fn.energy_weight, loss_fn.forces_weight, loss_fn.stress_weight = (
            weights["energy"], weights["forces"], weights["stress"])

    def checkpoint() -> None:
        if not ranks.main:
            return
        eval_model = ema.model if ema is not None else model
        save_model(eval_model, out / LAST_MODEL, extra={**extra, "training": {"epoch": state["epoch"]}})
        save_checkpoint(ckpt_path, {
            "format": "equiforce-training", "spec": model.spec.model_dump_json(), "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "progress": state, "rng": _rng_state(generator),
            "training": training.model_dump(mode="json"), "data": data_digests, "extra": extra})
        promote_best(out, state["best_epoch"])

    def progress_at(epoch_float: float, in_epoch: float) -> float:
        """Training progress after ``in_epoch`` seconds of the current epoch (on rank 0's clock)."""
        done = epoch_float / training.epochs
        if training.max_time is not None:
            done = max(done, (state["elapsed"] + in_epoch) / training.max_time)
        return min(done, 1.0)

    def out_of_time(in_epoch: float) -> bool:
        budget = training.max_time
        return budget is not None and state["elapsed"] + in_epoch >= budget

    def clock(epoch_start: float) -> float:
        return distributed.shared_clock(time.perf_counter() - epoch_start, ranks, device)

    if state["stopped_early"] or state["epoch"] >= training.epochs or out_of_time(0.0):
        return _result(state, out, resumed_from)

    def labelled(graphs: Sequence[Graph], key: str) -> bool:
        if isinstance(graphs, GraphStore):  # from its summary, without reading the structures
            return graphs.labelled(key)
        return any(float(g[key].sum()) > 0 for g in graphs)

    train_forces = training.forces_weight > 0 and labelled(train_graphs, K.HAS_FORCES)
    train_stress = training.stress_weight > 0 and labelled(train_graphs, K.HAS_STRESS)
    valid_forces = labelled(valid_graphs, K.HAS_FORCES)
    valid_stress = labelled(valid_graphs, K.HAS_STRESS)
    train_hessian = training.hessian_weight > 0 and labelled(train_graphs, K.HAS_HESSIAN)
    valid_hessian_vectors = training.hessian_vectors if labelled(valid_graphs, K.HAS_HESSIAN) else 0
    if valid_graphs and training.select_by != "loss":  # else no epoch would ever be "best" (no best.eqf)
        quantity = training.select_by.split("_")[0]
        has = {"energy": K.HAS_ENERGY, "forces": K.HAS_FORCES, "stress": K.HAS_STRESS}[quantity]
        if not labelled(valid_graphs, has):
            raise ConfigError(f"training.select_by: {training.select_by} needs {quantity} labels in the validation "
                              f"set, and none of its {len(valid_graphs)} structures has them; select by a labelled "
                              "quantity or by loss")
    if train_hessian and training.compile:
        raise ValueError("training on Hessians needs compile: false (the compiled graph gives forces, not their "
                         "derivatives); or set hessian_weight: 0")
    n_valid = len(valid_graphs)
    if ranks.active and len(valid_graphs) >= ranks.world:  # each rank validates its share; sums are reduced
        valid_graphs = valid_graphs[ranks.rank::ranks.world]
    # an in-memory data set is moved to the device once, and batches are assembled there without host round
    # trips; a packed one (GraphStore) stays on disk, and each batch is read, collated and moved as it is needed
    streamed = isinstance(train_graphs, GraphStore)
    if not streamed:
        train_graphs = [to_device(g, device, dtype) for g in train_graphs]
    if not isinstance(valid_graphs, GraphStore):
        valid_graphs = [to_device(g, device, dtype) for g in valid_graphs]
    n_train = len(train_graphs)
    if streamed:
        with_energy = np.flatnonzero(train_graphs.column(K.HAS_ENERGY))
        chosen = with_energy[:: max(1, len(with_energy) // training.refit_structures)][: training.refit_structures]
        refit_graphs = [to_device(g, device, dtype) for g in train_graphs.subset(chosen)]
        atom_counts = train_graphs.column("n_atoms").tolist()
        edge_counts = train_graphs.column("n_edges").tolist()
    else:
        with_energy = [g for g in train_graphs if float(g[K.HAS_ENERGY].sum()) > 0]
        refit_graphs = with_energy[:: max(1, len(with_energy) // training.refit_structures)][
            : training.refit_structures]
        atom_counts = [int(g[K.POSITIONS].shape[0]) for g in train_graphs]
        edge_counts = [int(g[K.EDGE_INDEX].shape[1]) for g in train_graphs]
    params = [p for p in model.parameters() if p.requires_grad]
    reader = BatchReader(train_graphs, device, dtype, workers)
    with _Reporter(progress, training.epochs, state["epoch"]) as reporter:
        if resumed_from is not None:
            reporter.info(f"resuming {out} after epoch {resumed_from}")
        for epoch in range(state["epoch"] + 1, training.epochs + 1):
            start = time.perf_counter()
            if (training.stage_two is not None and state["stage"] == 1
                    and progress_at(epoch - 1, 0.0) >= training.stage_two.start):
                state["stage"] = 2
                weights = _stage_two_weights(training)
                loss_fn.energy_weight, loss_fn.forces_weight, loss_fn.stress_weight = (
                    weights["energy"], weights["forces"], weights["stress"])
                stage_lr = training.stage_two.lr if training.stage_two.lr is not None else 0.1 * training.lr
                schedule.restart(stage_lr, progress_at(epoch - 1, 0.0), epoch - 1)
                if training.select_by == "loss":  # the loss changed meaning: compare stage-two models only
                    state["best_loss"] = math.inf
                reporter.info(f"stage two from epoch {epoch}: energy weight {weights['energy']:g}, "
                              f"forces weight {weights['forces']:g}, lr {stage_lr:g}")
            model.train()
            order = torch.randperm(n_train, generator=generator).tolist()
            batches = distributed.shard(make_batches(order, training.batch_by, training.batch_size, atom_counts,
                                                     edge_counts, training.max_batch_atoms, training.max_batch_edges),
                                        ranks)
            loss_sum = torch.zeros((), dtype=dtype, device=device)
            part_sums: dict[str, torch.Tensor] = {}
            n_seen = 0  # structures stepped on (a wrapped-around batch of a DDP shard counts again)
            lr = schedule(state["step"], progress_at(epoch - 1, 0.0), epoch - 1)
            first_lr = lr
            for k, (chunk, batch) in enumerate(zip(batches, reader.epoch(batches))):
                in_epoch = clock(start)
                if n_seen and out_of_time(in_epoch):  # the budget ends mid-epoch: validate what we have
                    break
                lr = schedule(state["step"], progress_at(epoch - 1 + k / len(batches), in_epoch), epoch - 1)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                hessian_step = train_hessian and batch_has_hessians(batch)
                if hessian_step:  # H·v is the derivative of F·v with respect to these positions
                    batch[K.POSITIONS] = batch[K.POSITIONS].detach().requires_grad_(True)
                pred = net(batch, compute_forces=train_forces or hessian_step, compute_stress=train_stress,
                           create_graph=True)
                if hessian_step:  # vectors from their own stream: the shuffling stream stays the same on every rank
                    vectors = torch.Generator().manual_seed(_hessian_seed(training.seed, state["step"], ranks.rank))
                    pred = {**pred, **hessian_vector_products(pred[K.FORCES], batch[K.POSITIONS], batch,
                                                              training.hessian_vectors, vectors)}
                loss, parts = loss_fn(pred, batch)
                loss.backward()
                if training.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, training.clip_grad)
                optimizer.step()
                state["step"] += 1
                if ema is not None:
                    ema.update(model)
                loss_sum += loss.detach() * len(chunk)
                n_seen += len(chunk)
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value * len(chunk)
            n_stepped = n_seen
            if ranks.active:  # every rank reports the whole epoch: one all-reduce of the same vector on every rank
                # [loss sum, each term's sum, whether this rank computed the term (Hessians: only some do), count]
                local = [loss_sum, *(part_sums.get(k, 0.0) for k in LOSS_TERMS),
                         *(float(k in part_sums) for k in LOSS_TERMS), float(n_seen)]
                total = distributed.all_sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                                         for v in local]), ranks)
                n_terms = len(LOSS_TERMS)
                loss_sum = total[0]
                part_sums = {k: total[1 + i] for i, k in enumerate(LOSS_TERMS) if total[1 + n_terms + i] > 0}
                n_stepped = int(round(float(total[-1])))
                n_seen = min(n_stepped, n_train)  # wrapped-around batches are seen twice, counted once
            # the mean over what was stepped on (a wrapped-around batch's loss is in the sum: so is its count)
            record: dict[str, Any] = {"epoch": epoch, "lr": first_lr, "lr_end": lr, "stage": state["stage"],
                                      "train_loss": float(loss_sum) / n_stepped}
            record.update({f"train_loss_{k}": float(v) / n_stepped for k, v in part_sums.items()})
            _check_finite_loss(record["train_loss"], "training", epoch, state["epoch"], out)
            # the training steps alone (float() above waited for the device): what peers report as throughput;
            # "time" below adds the shift refit, validation and saving the best model
            record["train_time"] = clock(start)
            if n_seen < n_train:
                record["partial_epoch"] = n_seen / n_train

            eval_model = ema.model if ema is not None else model
            if training.refit_shift and refit_graphs:
                refit_shift(eval_model, [model] + ([ema.model] if ema is not None else []), refit_graphs,
                            training.valid_batch_size)
            metrics = ErrorMetrics()
            if valid_graphs:
                valid_loss = LossSums(loss_fn)  # a whole-set loss: the same for any batching or sharding
                run_batches(eval_model, valid_graphs, training.valid_batch_size, device, Fanout(metrics, valid_loss),
                            compute_forces=valid_forces, compute_stress=valid_stress,
                            hessian_vectors=valid_hessian_vectors)
                if ranks.active and len(valid_graphs) < n_valid:  # sharded: reduce the sums of all ranks
                    valid_loss.reduce(lambda t: distributed.all_sum(t, ranks))
                    metrics.reduce_sums(lambda t: distributed.all_sum(t, ranks))
                record["valid_loss"] = valid_loss.value()
                record.update({f"valid_{k}": v for k, v in metrics.compute().items()})
                _check_finite_loss(record["valid_loss"], "validation", epoch, state["epoch"], out)
            prefix = "valid_" if valid_graphs else "train_"
            if training.select_by == "loss" or not valid_graphs:
                criterion = record[f"{prefix}loss"]
            else:
                criterion = record.get(f"valid_{training.select_by}", math.inf)
            schedule.epoch_end(record.get("valid_loss", record["train_loss"]))

            state["epoch"], state["train_loss"] = epoch, record["train_loss"]
            if criterion < state["best_loss"]:
                state.update(best_loss=criterion, best_epoch=epoch, epochs_without_improvement=0,
                             best_metrics={k.removeprefix("valid_"): v for k, v in record.items()
                                           if k.startswith("valid_")})
                if ranks.main:  # pending until the checkpoint that records it (promote_best)
                    save_model(eval_model, out / BEST_PENDING, extra={**extra, "training": {
                        "epoch": epoch, "train_loss": record["train_loss"], "valid": state["best_metrics"]}})
            else:
                state["epochs_without_improvement"] += 1
            patience = training.max_epochs_without_improvement
            state["stopped_early"] = patience is not None and state["epochs_without_improvement"] >= patience
            record["time"] = clock(start)
            state["elapsed"] += record["time"]
            record["elapsed"] = state["elapsed"]
            record["configs_per_s"] = n_seen / record["time"]
            if isinstance(core, CompiledForces):
                record.update(core.report())
            state["out_of_time"] = out_of_time(0.0)
            if ranks.main:
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())  # durable before the checkpoint that follows counts it
            if (epoch % checkpoint_every == 0 or epoch == training.epochs or state["stopped_early"]
                    or state["out_of_time"]):
                checkpoint()
            reporter.epoch(record, state["best_epoch"])
            if epoch_callback is not None:
                epoch_callback(record)
            if state["out_of_time"]:
                reporter.info(f"time budget of {training.max_time:.0f} s spent after epoch {epoch} (best: epoch "
                              f"{state['best_epoch']})")
                break
            if state["stopped_early"]:
                reporter.info(f"stopping early: no improvement in {patience} epochs (best: epoch "
                              f"{state['best_epoch']})")
                break
    return _result(state, out, resumed_from)


# ----------------------------------------------------------------------------------------------- data → model
def _isolated_e0s(configs: Sequence[Configuration]) -> dict[int, float]:
    """E0 of each element from its isolated-atom frames (the mean when there are several)."""
    from equiforce.data.stats import is_isolated_atom

    found: dict[int, list[float]] = {}
    for c in configs:
        if is_isolated_atom(c) and c.n_atoms == 1 and c.energy is not None:
            found.setdefault(int(c.numbers[0]), []).append(float(c.energy))
    return {z: float(np.mean(v)) for z, v in found.items()}


def resolve_e0s(e0s: str | dict[int, float], configs: Sequence[Configuration], elements: Sequence[int]
                ) -> dict[int, float]:
    """``"fit"`` → least squares over the training energies; ``"isolated"`` → isolated-atom frames; or given."""
    if e0s == "fit":
        from equiforce.data.stats import fit_e0s

        return {int(z): float(v) for z, v in fit_e0s(configs, list(elements)).items()}
    return chosen_e0s(e0s, _isolated_e0s(configs) if e0s == "isolated" else {}, elements)


def chosen_e0s(e0s: str | dict[int, float], isolated: dict[int, float], elements: Sequence[int]
               ) -> dict[int, float]:
    """The E0 of each element for ``e0s: isolated`` (from ``isolated``, per element) or given values; an error
    naming the elements without one."""
    from ase.data import chemical_symbols

    values = isolated if e0s == "isolated" else {int(z): float(v) for z, v in e0s.items()}
    missing = [z for z in elements if z not in values]
    if missing:
        names = ", ".join(chemical_symbols[z] for z in missing)
        how = ("no isolated-atom frame with an energy (add one per element: a single atom in vacuum, or config_type "
               "IsolatedAtom; or set data.e0s: fit, or values)" if e0s == "isolated"
               else "not given in data.e0s (add them, or set data.e0s: fit)")
        raise ConfigError(f"E0s for {names}: {how}")
    return {z: values[z] for z in elements}


def train_configs(train: Sequence[Configuration], valid: Sequence[Configuration] | None,
                  model_cfg: ModelConfig | dict[str, Any], training_cfg: TrainingConfig | dict[str, Any],
                  output_dir: str | os.PathLike, *, e0s: str | dict[int, float] = "fit",
                  valid_fraction: float = 0.1, split_seed: int = 0,
                  test: Sequence[Configuration] | GraphStore | None = None,
                  resume: bool = True, checkpoint_every: int = 1, progress: bool | None = None,
                  extra: dict[str, Any] | None = None, epoch_callback: EpochCallback | None = None
                  ) -> dict[str, Any]:
    """Train on in-memory configurations (no YAML): the demo's and benchmarks' entry point.

    With ``valid=None`` a ``valid_fraction`` of ``train`` is held out (fixed ``split_seed``, independent
    of the training seed so runs with different seeds validate on the same structures).
    """
    from equiforce.data.stats import closest_pairs, dataset_statistics, is_isolated_atom
    model_cfg = _validated(ModelConfig, model_cfg, "model")
    training_cfg = _validated(TrainingConfig, training_cfg, "training")
    # isolated atoms define E0s (in "fit" too, where they pin their element's E0); they are not training
    # targets: an atom without neighbours only sees E0 + shift + a constant, which would fight the shift
    isolated = [c for c in train if is_isolated_atom(c)]
    train, valid = split_train_valid(train, valid, valid_fraction, split_seed)
    check_validation_elements({int(z) for c in train for z in c.numbers}, valid)
    found = sorted({int(z) for c in [*train, *valid, *isolated] for z in c.numbers})
    elements = sorted(model_cfg.elements) if model_cfg.elements else found
    unknown = sorted(set(found) - set(elements))
    if unknown:
        raise ConfigError(f"model.elements {elements} lacks elements present in the data: {unknown}")
    e0_values = resolve_e0s(e0s, [*train, *isolated], elements)

    dtype = DTYPES[training_cfg.dtype]
    check_before_training(training_cfg, [*train, *valid], test, elements, model_cfg.cutoff, dtype)
    train_graphs = labelled_graphs(train, model_cfg.cutoff, dtype, training_cfg.config_type_weights)
    valid_graphs = labelled_graphs(valid, model_cfg.cutoff, dtype, training_cfg.config_type_weights)
    stats = dataset_statistics(train_graphs, e0_values)
    model = model_for_data(model_cfg, training_cfg, elements, e0_values, stats,
                           lambda: closest_pairs([*train_graphs, *valid_graphs]))
    return fit_and_test(model, train_graphs, valid_graphs, training_cfg, output_dir, stats=stats, test=test,
                        resume=resume, checkpoint_every=checkpoint_every, progress=progress, extra=extra,
                        epoch_callback=epoch_callback)


def model_for_data(model_cfg: ModelConfig, training_cfg: TrainingConfig, elements: Sequence[int],
                   e0_values: dict[int, float], stats: dict[str, Any],
                   closest: Callable[[], dict[tuple[int, int], float]]) -> Potential:
    """The model a config describes, normalised by the training data's statistics (scale: force RMS; shift: mean
    per-atom energy after E0s) and, for ``short_range_fade: auto``, faded where the data end at short range
    (``closest()``: the shortest distance of each element pair; called only then)."""
    scale = float(stats.get("force_rms", 0.0) or 0.0)
    shift = float(stats.get("energy_shift", 0.0))  # gated by coordination: isolated atoms keep their E0
    architecture = model_cfg.spec_kwargs()
    if architecture.get("short_range_fade") == "auto":  # where the data end at short range (train and valid)
        architecture["short_range_fade"] = fade_from_closest(closest()) if architecture.get("zbl") else None
    try:
        spec = ModelSpec(**architecture, elements=list(elements), e0s=e0_values,
                         avg_num_neighbors=max(float(stats["avg_num_neighbors"]), 1e-6),
                         energy_scale=scale if scale > 0 else 1.0, energy_shift=shift)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "model")) from None
    torch.manual_seed(training_cfg.seed)
    return build_model(spec, dtype=DTYPES[training_cfg.dtype])


def fit_and_test(model: Potential, train_graphs: Sequence[Graph], valid_graphs: Sequence[Graph],
                 training_cfg: TrainingConfig, output_dir: str | os.PathLike, *, stats: dict[str, Any],
                 test: Sequence[Configuration] | GraphStore | None, resume: bool, checkpoint_every: int,
                 progress: bool | None, extra: dict[str, Any] | None, epoch_callback: EpochCallback | None,
                 workers: int = 0) -> dict[str, Any]:
    """:func:`fit`, then the best model's errors on ``test`` (when given)."""
    n_train, n_valid = len(train_graphs), len(valid_graphs)
    extra = {"statistics": _jsonable(stats), "n_train": n_train, "n_valid": n_valid, **(extra or {})}
    result = fit(model, train_graphs, valid_graphs, training_cfg, output_dir, resume=resume,
                 checkpoint_every=checkpoint_every, progress=progress, extra=extra, epoch_callback=epoch_callback,
                 workers=workers)
    result.update(n_train=n_train, n_valid=n_valid)
    if test:
        device = resolve_device(training_cfg.device)
        best = load_model(result["best_model"], device=device)
        result["test"] = evaluate(best, test, training_cfg.valid_batch_size, device)
    return result


def split_train_valid(train: Sequence[Configuration], valid: Sequence[Configuration] | None,
                      valid_fraction: float, split_seed: int) -> tuple[list[Configuration], list[Configuration]]:
    """Training structures and the validation set, both without isolated atoms (their energy is E0 exactly, by
    construction): ``valid`` when given, else a fixed ``valid_fraction`` of ``train`` (``split_seed``,
    independent of the training seed)."""
    from equiforce.data.stats import is_isolated_atom, split_indices

    train = [c for c in train if not is_isolated_atom(c)]
    if valid is not None:
        valid = [c for c in valid if not is_isolated_atom(c)]
    if valid is None:
        if valid_fraction > 0 and len(train) > 1:
            train_idx, valid_idx = split_indices(len(train), valid_fraction, split_seed)
            train, valid = [train[i] for i in train_idx], [train[i] for i in valid_idx]
        else:
            valid = []
    if not train:
        raise DataError("no training structures left (after removing isolated atoms / the validation split)")
    return list(train), list(valid)


def check_before_training(training: TrainingConfig, labelled: Sequence[Configuration],
                          test: Sequence[Configuration] | GraphStore | None, elements: Sequence[int], cutoff: float,
                          dtype: torch.dtype) -> None:
    """What would otherwise go wrong silently, or only after the whole budget is spent: config-type weights
    that name no structure's ``config_type`` (a typo leaves every weight at 1), and a test set with an element
    the model will not know or a geometry no graph can be built for (found by the evaluation at the end)."""
    check_type_weights(training, {c.config_type for c in labelled})
    check_test_set(test, elements, cutoff, dtype)


def check_validation_elements(trained: set[int], valid: Sequence[Configuration] | GraphStore) -> None:
    """Every element of the validation structures occurs in a training structure: one that does not would enter
    the model untrained (its E0 0, its weights random) and be validated as such."""
    from ase.data import chemical_symbols

    if isinstance(valid, GraphStore):
        missing = sorted(set(valid.elements_present()) - trained)
        first = valid.configuration(int(valid.holding(missing[0])[0])) if missing else None
    else:
        first = next((c for c in valid if {int(z) for z in c.numbers} - trained), None)
        missing = sorted({int(z) for c in valid for z in c.numbers} - trained)
    if first is not None:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in missing)
        raise DataError(f"element(s) {names} occur in validation structures but in no training structure, so the "
                        "model would never learn them: move such structures into the training set (with "
                        "data.valid_fraction, another data.split_seed)", source=first.source, frame=first.frame,
                        field="numbers")


def check_type_weights(training: TrainingConfig, present: set[str]) -> None:
    unused = sorted(set(training.config_type_weights) - present)
    if unused:
        raise ConfigError(f"training.config_type_weights names config types that no training or validation "
                          f"structure has: {unused} (the data have {sorted(present)})")


def check_test_set(test: Sequence[Configuration] | GraphStore | None, elements: Sequence[int], cutoff: float,
                   dtype: torch.dtype) -> None:
    """Before training: the test set's elements are the model's, and its structures make graphs (a test pack: its
    cutoff holds the model's)."""
    if isinstance(test, GraphStore):
        test.within(cutoff)
        test.check_readable()
        for z in sorted(set(test.elements_present()) - set(elements)):
            first = test.configuration(int(test.holding(z)[0]))
            raise DataError(f"element {z} not in the model's elements {sorted(elements)} (the test set is checked "
                            "before training)", source=first.source, frame=first.frame, field="numbers")
        return
    for config in test or ():
        unknown = sorted({int(z) for z in config.numbers} - set(elements))
        if unknown:
            raise DataError(f"element(s) {unknown} not in the model's elements {sorted(elements)} (the test set is "
                            "checked before training)", source=config.source, frame=config.frame, field="numbers")
        config_to_graph(config, cutoff, dtype)  # raises a DataError naming the file and frame


def labelled_graphs(configs: Sequence[Configuration], cutoff: float, dtype: torch.dtype,
                    type_weights: dict[str, float], weight: float = 1.0) -> list[Graph]:
    """Training graphs, each loss weight times its ``config_type``'s weight (and ``weight``)."""
    graphs = []
    for config in configs:
        g = config_to_graph(config, cutoff, dtype)
        factor = type_weights.get(config.config_type, 1.0) * weight
        if factor != 1.0:
            g[K.WEIGHT] = g[K.WEIGHT] * factor
        graphs.append(g)
    return graphs


def _validated(cls: type[BaseModel], value: Any, section: str) -> Any:
    """Accept a config section object or a plain dict; a bad dict is a ConfigError naming its keys."""
    if isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value.model_dump() if isinstance(value, BaseModel) else dict(value))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, section)) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value).tolist()
    return value


def train(config: TrainConfig, *, progress: bool | None = None,
          epoch_callback: EpochCallback | None = None) -> dict[str, Any]:
    """Run ``equiforce train``: read the files named in ``config.data``, train, evaluate on the test set."""
    from equiforce.data.io import open_pack, read_configurations
    from equiforce.train.data_files import read_labelled, reader_options

    data = config.data
    keys = reader_options(data)
    check_output_directory(config.output.directory, "output.directory")
    if config.finetune is not None:
        model_option(config.finetune.start, "finetune.start")
    if is_pack(data.train):
        if config.finetune is None:
            return _train_pack(config, progress=progress, epoch_callback=epoch_callback)
        # fine-tuning sets are small: the pack is read into memory, the other files with its label keys
        _, keys = packed_reader_keys(data)
    train_set = read_labelled(data.train, data, config.training)
    valid_set = read_configurations(data.valid, **keys) if data.valid is not None else None
    test_set = _test_set(data.test, keys)
    extra = {"data": {"train": str(data.train), "train_sha256": data_sha256(data.train)},
             "config": config.model_dump(mode="json")}
    common = dict(valid_fraction=data.valid_fraction, split_seed=data.split_seed, test=test_set,
                  resume=config.output.resume, checkpoint_every=config.output.checkpoint_every, progress=progress,
                  extra=extra, epoch_callback=epoch_callback)
    if config.finetune is not None:
        from equiforce.train.finetune import fine_tune

        tune = config.finetune
        replay = None
        if tune.replay is not None:  # a pretraining set as a pack: only the sampled replay structures are read
            replay = (open_pack(tune.replay, ":", keys)
                      if is_pack(tune.replay) else read_configurations(tune.replay, **keys))
        return fine_tune(tune.start, train_set, valid_set, config.training, config.output.directory, replay=replay,
                         replay_frames=tune.replay_frames, replay_weight=tune.replay_weight,
                         replay_holdout=tune.replay_holdout, e0s=data.e0s, **common)
    return train_configs(train_set, valid_set, config.model, config.training, config.output.directory,
                         e0s=data.e0s, **common)


def model_option(path: str | os.PathLike, option: str) -> dict[str, Any]:
    """The header of the model file a config option names, checked before any work; errors name the option."""
    try:
        return read_header(path)
    except ModelFileError as err:
        raise ModelFileError(f"{option}: {err}") from None


def _test_set(path: str | None, keys: dict[str, Any]) -> GraphStore | list[Configuration] | None:
    """The test structures: a pack is left on disk and evaluated batch by batch, a file is read."""
    from equiforce.data.io import open_pack, read_configurations

    if path is None:
        return None
    if is_pack(path):
        return open_pack(path, ":", keys)
    return read_configurations(path, **keys, require_energy=False)


@dataclasses.dataclass
class PackedData:
    """The data sets of a run whose ``data.train`` is a pack (see :func:`open_packed_data`)."""

    train: GraphStore
    valid: GraphStore | list[Configuration] | None
    test: GraphStore | list[Configuration] | None


def open_packed_data(data: DataConfig) -> PackedData:
    """``data.train`` as a pack, with the validation and test sets (packs or files) its label keys go with.

    Label keys set in the config must be those the pack was made with (they were read then, so another would
    silently not apply), so validation and test files are read with the pack's keys (and ``data.format``);
    validation and test packs must share the training pack's keys (another key is another quantity)."""
    from equiforce.data.io import read_configurations

    store, keys = packed_reader_keys(data)
    valid: GraphStore | list[Configuration] | None = None
    if data.valid is not None:
        valid = GraphStore.open(data.valid) if is_pack(data.valid) else read_configurations(data.valid, **keys)
    test = _test_set(data.test, keys)  # a test pack's keys were checked to be the training pack's
    return PackedData(store, valid, test)


def packed_reader_keys(data: DataConfig) -> tuple[GraphStore, dict[str, Any]]:
    """The training pack and the label keys its validation, test and replay files are read with (the pack's, and
    ``data.format``); see :func:`open_packed_data` for the checks."""
    from equiforce.train.data_files import reader_options

    store = GraphStore.open(data.train)
    packed_with = store.index["reader"]
    given = {key: value for key, value in reader_options(data).items() if key in data.model_fields_set}
    differ = [f"data.{key}: {value!r} (packed with {packed_with.get(key)!r})" for key, value in given.items()
              if key != "format" and key in packed_with and value != packed_with[key]]
    if differ:
        raise ConfigError(f"{data.train} is a pack, whose labels were read when it was packed; {'; '.join(differ)}. "
                          "Pack again with those keys, or leave them out of the config")
    keys = {**packed_with, "format": None, **given}
    for other in (data.valid, data.test):
        if other is not None and is_pack(other):
            theirs = GraphStore.open(other).index["reader"]
            differ = [f"{k} {theirs.get(k)!r} against {v!r}" for k, v in packed_with.items()
                      if k != "format" and theirs.get(k) != v]
            if differ:
                raise ConfigError(f"{other} was packed with other label keys than {data.train} ({'; '.join(differ)});"
                                  " pack both with the keys of the same quantities")
    return store, keys


def _train_pack(config: TrainConfig, *, progress: bool | None, epoch_callback: EpochCallback | None
                ) -> dict[str, Any]:
    """``equiforce train`` with ``data.train`` a packed dataset: validation and test sets may be packs or files."""
    from equiforce.train.packed_training import train_store

    data = config.data
    packed = open_packed_data(data)
    extra = {"data": {"train": str(data.train), "train_sha256": packed.train.index["content_sha256"]},
             "config": config.model_dump(mode="json")}
    return train_store(packed.train, packed.valid, config.model, config.training, config.output.directory,
                       e0s=data.e0s, valid_fraction=data.valid_fraction, split_seed=data.split_seed, test=packed.test,
                       resume=config.output.resume, checkpoint_every=config.output.checkpoint_every,
                       progress=progress, extra=extra, epoch_callback=epoch_callback, workers=data.workers)
