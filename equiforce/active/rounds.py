"""One round's model: train (warm-started from the previous round), add calibrated uncertainty, rate it.

Warm start: from round 2 on, the previous round's backbone (or each ensemble member) continues training
on all labels so far, for ``training.max_time``.  It keeps its architecture *and* its normalisation
statistics (E0s, scale, neighbour count) from round 1 — they describe the chemistry, not the sample, and
keeping them is what lets the weights carry over.  Only ``short_range_fade: auto`` follows the data (not a
weight: it moves to shorter distances as new labels come closer).  Training runs in ``ROUND/train`` (or ``ROUND/mK``)
with the ordinary trainer, whose checkpoints make a killed round resume mid-training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiforce.active.config import LearnConfig
from equiforce.data.graph import Graph, config_to_graph
from equiforce.data.stats import closest_pairs
from equiforce.data.structure import Configuration
from equiforce.evaluate import resolve_device
from equiforce.models.file import load_model
from equiforce.models.potential import Potential, with_short_range_fade
from equiforce.models.spec import fade_from_closest
from equiforce.train.trainer import DTYPES, EpochCallback, fit, train_configs
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import MIN_STRUCTURES
from equiforce.uq.ensemble import EnsemblePotential
from equiforce.uq.file import save_uq_model
from equiforce.uq.fit import calibrate, fit_heads
from equiforce.uq.heads import UQPotential
from equiforce.uq.metrics import force_arrays, spearman
from equiforce.uq.predict import predict

MODEL = "model.eqf"


def _graphs(configs: Sequence[Configuration], cutoff: float, dtype: torch.dtype) -> list[Graph]:
    return [config_to_graph(c, cutoff, dtype) for c in configs]


def _train_one(directory: Path, train: Sequence[Configuration], valid: Sequence[Configuration], cfg: LearnConfig,
               previous: Potential | None, seed: int, progress: bool | None, callback: EpochCallback | None
               ) -> Potential:
    """Train one potential in ``directory`` (from scratch, or continuing ``previous``); its best model."""
    first = previous is None
    budget = cfg.first_round_max_time if (first and cfg.first_round_max_time) else cfg.training.max_time
    training = cfg.training.model_copy(update={"seed": seed, "max_time": budget})
    device = resolve_device(training.device)
    extra = {"active_learning": {"round_dir": directory.parent.name, "n_train": len(train), "n_valid": len(valid)}}
    if first:
        result = train_configs(list(train), list(valid), cfg.model, training, directory, e0s=cfg.e0s, resume=True,
                               progress=progress, extra=extra, epoch_callback=callback)
    else:
        dtype = DTYPES[training.dtype]
        model = previous.to(dtype=dtype)
        train_graphs, valid_graphs = _graphs(train, model.cutoff, dtype), _graphs(valid, model.cutoff, dtype)
        if cfg.model.short_range_fade == "auto" and cfg.model.zbl:  # new labels may come closer than any before
            model = with_short_range_fade(model, fade_from_closest(closest_pairs([*train_graphs, *valid_graphs])))
        result = fit(model, train_graphs, valid_graphs, training, directory, resume=True, progress=progress,
                     extra=extra, epoch_callback=callback)
    return load_model(result["best_model"], device=device)


def _previous_members(path: Path | None, n: int) -> list[Potential | None]:
    if path is None:
        return [None] * n
    model = load_model(path)
    if isinstance(model, UQPotential):
        return [model.backbone]
    if isinstance(model, EnsemblePotential):
        return [model.member(k) for k in range(model.n_members)]
    return [model]


def train_round(directory: Path, train: Sequence[Configuration], valid: Sequence[Configuration], cfg: LearnConfig,
                previous: Path | None, seed: int, progress: bool | None = None,
                callback: EpochCallback | None = None) -> Path:
    """Train this round's uncertainty-aware model; write ``directory/model.eqf`` (atomically) and return it."""
    device = resolve_device(cfg.training.device)
    dtype = DTYPES[cfg.training.dtype]
    uq = cfg.uq
    # The loop's first rounds have few validation labels: it calibrates on what it has (in-sample below 3)
    # instead of stopping at train-uq's minimum of 10, and the model file says which and how many.
    calibration_set = list(valid) if len(valid) >= 3 else list(train)
    if uq.method == "heads":
        backbone = _train_one(directory / "train", train, valid, cfg, _previous_members(previous, 1)[0], seed,
                              progress, callback)
        cutoff = backbone.cutoff
        heads = fit_heads(backbone, _graphs(train, cutoff, dtype), n_heads=uq.n_heads, steps=uq.heads_steps,
                          seed=seed, device=device)
        seen = sorted({int(z) for c in [*train, *valid] for z in c.numbers})
        model: UQModel = UQPotential(backbone, heads, seen_elements=seen).to(device)
    else:
        previous_members = _previous_members(previous, uq.members)
        members = [_train_one(directory / f"m{k}", train, valid, cfg, previous_members[k], seed + k, progress,
                              callback)
                   for k in range(uq.members)]
        seen = sorted({int(z) for c in [*train, *valid] for z in c.numbers})
        model = EnsemblePotential.from_members(members, seen_elements=seen).to(device)
    calibrate(model, _graphs(calibration_set, model.cutoff, dtype), method=uq.calibration, device=device,
              min_structures=min(MIN_STRUCTURES, len(calibration_set)))
    path = directory / MODEL
    save_uq_model(model, path, extra={"active_learning": {"n_train": len(train), "n_valid": len(valid),
                                                          "calibrated_on": "valid" if len(valid) >= 3 else "train",
                                                          "calibration_structures": len(calibration_set)}})
    return path


def rate(model: UQModel, configs: Sequence[Configuration], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Errors and σ of ``model`` on labelled structures: MAEs (meV/Å, meV/atom), mean σ, Spearman, and the
    per-structure RMS force σ / RMS force error pairs (eV/Å) for the σ-vs-error plot."""
    if not configs:
        return {}
    pred = predict(model, _graphs(configs, model.cutoff, next(model.parameters()).dtype), device=device)
    forces = force_arrays(pred)
    has_e = pred.has_energy
    e_err = np.abs(pred.energy_pred - pred.energy_ref)[has_e] / pred.n_atoms[has_e]
    max_sigma = np.zeros(pred.n_structures)
    np.maximum.at(max_sigma, pred.structure, np.nan_to_num(pred.forces_sigma, nan=0.0))
    return {"n": pred.n_structures,
            "forces_mae": 1000.0 * float(np.mean(np.abs(forces["residual"]))) if forces["residual"].size else None,
            "forces_rmse": 1000.0 * float(np.sqrt(np.mean(forces["residual"] ** 2))) if forces["residual"].size
            else None,
            "energy_per_atom_mae": 1000.0 * float(e_err.mean()) if e_err.size else None,
            "mean_force_sigma": float(np.mean(forces["sigma"])) if forces["sigma"].size else None,
            "mean_max_force_sigma": float(max_sigma.mean()),
            "median_max_force_sigma": float(np.median(max_sigma)),
            "spearman": spearman(forces["struct_sigma"], forces["struct_error"]),
            "struct_sigma": [float(x) for x in forces["struct_sigma"]],
            "struct_error": [float(x) for x in forces["struct_error"]]}
