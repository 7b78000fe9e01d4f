"""Fitting uncertainty: heads on a frozen backbone (Gaussian NLL) and calibration on held-out data.

The backbone is frozen while the heads train, so its node features and residuals are computed once and
the heads train on cached tensors in seconds — no change to the potential's training loop and the
backbone's predictions stay exactly those of the plain model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from equiforce.data import keys as K
from equiforce.data.graph import Graph, collate, to_device
from equiforce.data.packed import GraphStore
from equiforce.errors import DataError, TrainingError
from equiforce.evaluate import has_labels
from equiforce.models.potential import Potential
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import MIN_STRUCTURES, Calibration, CalibrationError, fit_quantity
from equiforce.uq.heads import SIGMA_FLOOR, UQHeads, UQPotential, check_backbone
from equiforce.uq.predict import UQPredictions, predict

log = logging.getLogger(__name__)


def _cache(backbone: Potential, graphs: Sequence[Graph], batch_size: int, device: torch.device
           ) -> dict[str, torch.Tensor]:
    """Head inputs and the backbone's residuals (reference − prediction) for every graph, concatenated."""
    dtype = next(backbone.parameters()).dtype
    parts: dict[str, list[torch.Tensor]] = {}
    with_stress = has_labels(graphs, K.HAS_STRESS)
    offset = 0
    backbone.eval()
    with torch.enable_grad():
        for start in range(0, len(graphs), batch_size):
            batch = to_device(collate(list(graphs[start:start + batch_size])), device, dtype)
            out = backbone(batch, compute_forces=True, compute_stress=with_stress, return_features=True)
            x, v = UQHeads.inputs([f.detach() for f in out[K.NODE_FEATURES]])
            values = {"x": x, "v": v, "r_forces": batch[K.FORCES] - out[K.FORCES].detach(),
                      "has_forces": batch[K.HAS_FORCES][batch[K.BATCH]],
                      "r_energy": batch[K.ENERGY] - out[K.ENERGY].detach(),
                      "has_energy": batch[K.HAS_ENERGY], "batch": batch[K.BATCH] + offset, "cell": batch[K.CELL],
                      "numbers": batch[K.NUMBERS]}
            if with_stress:
                values["r_stress"] = batch[K.STRESS] - out[K.STRESS].detach()
                values["has_stress"] = batch[K.HAS_STRESS]
            for name, value in values.items():
                parts.setdefault(name, []).append(value.detach())
            offset += int(batch[K.N_ATOMS].shape[0])
    return {name: torch.cat(value) for name, value in parts.items()}


def fit_extrapolation(heads: UQHeads, x: torch.Tensor, v: torch.Tensor, species: torch.Tensor,
                      ridge: float = 1e-3, quantile: float = 0.99) -> None:
    """Per-element precision of the training atoms' invariants and the distance ``quantile`` of them stay below."""
    with torch.no_grad():
        raw = torch.cat([x, v.square().sum(-1).sqrt()], dim=-1)
        heads.r_mean.copy_(raw.mean(0))
        heads.r_std.copy_(raw.std(0).clamp_min(1e-6))
        z = heads.rigidity_features(x, v)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        for e in range(heads.n_elements):
            mine = z[species == e]
            if mine.shape[0] == 0:  # never seen: not a seen element of the model (build_uq_potential), so refused
                continue
            heads.r_precision[e] = torch.linalg.inv(mine.T @ mine / mine.shape[0] + ridge * eye)
            d = ((mine @ heads.r_precision[e]) * mine).sum(-1)
            heads.r_reference[e] = torch.quantile(d, quantile).clamp_min(1e-12)


def _nll(residual: torch.Tensor, variance: torch.Tensor, mask: torch.Tensor, dims: int) -> torch.Tensor:
    """Mean Gaussian NLL per component over masked samples; ``variance`` is per component."""
    sq = residual.square().reshape(residual.shape[0], -1).sum(-1)
    per_sample = 0.5 * (sq / variance + dims * torch.log(variance)) / dims
    return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)


def fit_heads(backbone: Potential, graphs: Sequence[Graph], *, n_heads: int = 8, hidden: int = 32,
              steps: int = 1000, lr: float = 3e-3, weight_decay: float = 1e-4, batch_structures: int = 256,
              seed: int = 0, batch_size: int = 32, ridge: float = 1e-3, quantile: float = 0.99,
              max_time: float | None = None, device: str | torch.device = "cpu") -> UQHeads:
    """Train uncertainty heads on the residuals of a frozen ``backbone`` over ``graphs`` (Gaussian NLL).

    ``graphs`` should be the backbone's training structures (the calibration set stays held out).  The
    NLL fit sees the samples without the extrapolation factor (it is 1 on almost all training atoms).
    ``max_time`` (seconds, counted from the start, feature caching included) ends the fit early.
    """
    start = time.perf_counter()
    check_backbone(backbone)
    if not graphs:
        raise DataError("no structures to train uncertainty heads on")
    device = torch.device(device)
    dtype = next(backbone.parameters()).dtype
    data = _cache(backbone, graphs, batch_size, device)
    if float(data["has_forces"].sum()) == 0 and float(data["has_energy"].sum()) == 0:
        raise DataError("uncertainty heads need energy or force labels in their training structures")
    torch.manual_seed(seed)
    heads = UQHeads(backbone.spec.channels, n_heads=n_heads, hidden=hidden, n_elements=len(backbone.spec.elements))
    heads = heads.to(device=device, dtype=dtype)
    with torch.no_grad():
        heads.x_mean.copy_(data["x"].mean(0))
        heads.x_std.copy_(data["x"].std(0).clamp_min(1e-6))
        heads.v_scale.copy_(data["v"].square().sum(-1).mean(0).sqrt().clamp_min(1e-6))
    fit_extrapolation(heads, data["x"], data["v"], backbone.z_to_index[data["numbers"]], ridge, quantile)
    with_stress = "r_stress" in data and float(data["has_stress"].sum()) > 0
    heads.stress_trained = bool(with_stress)
    n_graphs = int(data["r_energy"].shape[0])
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * 0.05)
    generator = torch.Generator().manual_seed(seed)
    heads.train()
    for _ in range(steps):
        if max_time is not None and time.perf_counter() - start > max_time:
            log.warning("uncertainty heads: time budget of %.0f s spent before %d steps", max_time, steps)
            break
        if n_graphs > batch_structures:
            chosen = torch.randperm(n_graphs, generator=generator)[:batch_structures].sort().values.to(device)
            picked = torch.zeros(n_graphs, dtype=torch.bool, device=device)
            picked[chosen] = True
            atoms = torch.nonzero(picked[data["batch"]]).squeeze(-1)
            remap = torch.full((n_graphs,), -1, dtype=torch.long, device=device)
            remap[chosen] = torch.arange(len(chosen), device=device)
        else:
            chosen = torch.arange(n_graphs, device=device)
            atoms = torch.arange(int(data["batch"].shape[0]), device=device)
            remap = chosen
        graph = {K.BATCH: remap[data["batch"][atoms]], K.NUMBERS: data["numbers"][atoms],
                 K.CELL: data["cell"][chosen]}
        samples = heads.samples(data["x"][atoms], data["v"][atoms], forces=True, virial=with_stress)
        sigma = UQHeads.sigma(samples, graph, forces=True, stress=with_stress)
        loss = _nll(data["r_forces"][atoms], sigma["forces"].square() / 3, data["has_forces"][atoms], 3)
        loss = loss + _nll(data["r_energy"][chosen], sigma["energy"].square(), data["has_energy"][chosen], 1)
        if with_stress:
            has = data["has_stress"][chosen] * (torch.linalg.det(data["cell"][chosen]).abs() > 0)
            var = sigma["stress"].square().clamp_min(SIGMA_FLOOR**2).reshape(-1, 9)
            r = data["r_stress"][chosen].reshape(-1, 9)
            per = 0.5 * (r.square() / var + torch.log(var)).mean(-1)
            loss = loss + (per * has).sum() / has.sum().clamp_min(1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(heads.parameters(), 10.0)
        optimizer.step()
        schedule.step()
        if not math.isfinite(float(loss.detach())):
            raise TrainingError("uncertainty-head training diverged (non-finite NLL); lower `uq.heads.lr`")
    return heads.eval()


def calibrate(model: UQModel, graphs: Sequence[Graph], method: str = "scale", batch_size: int = 16,
              device: str | torch.device = "cpu", min_structures: int = MIN_STRUCTURES) -> Calibration:
    """Fit ``model.calibration`` on held-out labelled graphs (and return it).

    Each quantity (energy, forces, stress) with labels in at least ``min_structures`` structures is
    calibrated; one with fewer (say, stress in 3 of 200 frames) stays uncalibrated (``method: none``)
    with a warning.  Fewer than ``min_structures`` graphs in all is a :class:`CalibrationError`.
    """
    if len(graphs) < min_structures:
        raise CalibrationError(f"calibration needs at least {min_structures} held-out structures, got {len(graphs)}; "
                               "give a larger validation set")
    raw = predict(model, graphs, batch_size=batch_size, device=device, calibrated=False)
    model.calibration = fit_calibration(raw, method, min_structures)
    return model.calibration


def fit_calibration(raw: UQPredictions, method: str = "scale", min_structures: int = MIN_STRUCTURES) -> Calibration:
    """A :class:`Calibration` from uncalibrated predictions (see :func:`calibrate`)."""
    cal = Calibration()
    has_e = raw.has_energy
    if has_e.sum() >= min_structures:
        cal.quantities["energy"] = fit_quantity("energy", raw.energy_ref[has_e] - raw.energy_pred[has_e],
                                                raw.energy_sigma[has_e], int(has_e.sum()), method, min_structures)
    elif has_e.sum() > 0:
        log.warning("energy σ left uncalibrated: only %d calibration structures have energy", int(has_e.sum()))
    has_f = raw.has_forces & np.isfinite(raw.forces_sigma)
    n_f = len(np.unique(raw.structure[has_f]))
    if n_f >= min_structures:
        cal.quantities["forces"] = fit_quantity("forces", raw.forces_ref[has_f] - raw.forces_pred[has_f],
                                                raw.forces_sigma[has_f], n_f, method, min_structures)
    elif n_f > 0:
        log.warning("force σ left uncalibrated: only %d calibration structures have forces", n_f)
    if raw.stress:
        has_s = raw.stress["has"]
        if has_s.sum() >= min_structures:
            cal.quantities["stress"] = fit_quantity("stress", raw.stress["ref"][has_s] - raw.stress["pred"][has_s],
                                                    raw.stress["sigma"][has_s], int(has_s.sum()), method,
                                                    min_structures)
        elif has_s.sum() > 0:
            log.warning("stress σ left uncalibrated: only %d calibration structures have stress", int(has_s.sum()))
    if not cal.quantities:
        raise CalibrationError(f"no quantity has labels in at least {min_structures} calibration structures "
                               f"({int(has_e.sum())} with energy, {n_f} with forces)")
    return cal


def sampled(graphs: Sequence[Graph], most: int | None, seed: int) -> Sequence[Graph]:
    """At most ``most`` of ``graphs``, a fixed random choice kept in order (all when there are no more)."""
    if most is None or len(graphs) <= most:
        return graphs
    chosen = np.sort(np.random.default_rng(seed).choice(len(graphs), most, replace=False))
    return graphs.subset(chosen) if isinstance(graphs, GraphStore) else [graphs[int(k)] for k in chosen]


def elements_of(graphs: Sequence[Graph]) -> set[int]:
    if isinstance(graphs, GraphStore):  # from the summary
        return set(graphs.elements_present())
    return {int(z) for g in graphs for z in g[K.NUMBERS].tolist()}


def build_uq_potential(backbone: Potential, train_graphs: Sequence[Graph], calibration_graphs: Sequence[Graph], *,
                       method: str = "scale", device: str | torch.device = "cpu", max_structures: int | None = None,
                       **head_kwargs) -> UQPotential:
    """Heads trained on ``train_graphs`` (at most ``max_structures`` of them, a fixed random choice: their
    features are held in memory), calibrated on ``calibration_graphs``: a ready single-model estimator."""
    train_graphs = sampled(train_graphs, max_structures, head_kwargs.get("seed", 0))
    heads = fit_heads(backbone, train_graphs, device=device, **head_kwargs)
    # σ is only meaningful for elements whose extrapolation statistics were fitted, i.e. present in train_graphs;
    # an element seen only in calibration would get a distance of 0 (no out-of-distribution term) however far out
    seen = elements_of(train_graphs) & set(backbone.spec.elements)
    model = UQPotential(backbone, heads, seen_elements=seen)
    if isinstance(calibration_graphs, GraphStore):
        fitted = np.array([z in seen for z in calibration_graphs.elements])
        outside = np.concatenate([chunk[:, ~fitted].any(axis=1) for chunk in calibration_graphs.chunks("composition")]
                                 or [np.zeros(0, dtype=bool)])
        usable = calibration_graphs.subset(np.flatnonzero(~outside))
    else:
        usable = [g for g in calibration_graphs if set(g[K.NUMBERS].tolist()) <= seen]
    if len(usable) < len(calibration_graphs):
        log.warning("%d of %d calibration structures hold elements the heads were not fitted on; calibrated "
                    "without them", len(calibration_graphs) - len(usable), len(calibration_graphs))
    calibrate(model.to(device), usable, method=method, device=device)
    return model
