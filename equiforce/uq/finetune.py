"""Fine-tuning a model that carries its uncertainty: the potential(s) inside are fine-tuned, then the σ is
rebuilt for the new model and calibrated again, so the file that comes out says what it does not know.

An ensemble fine-tunes each member (seeds ``training.seed + m``, each in ``members/m{m}`` with its own
checkpoints) and stacks them again; a model with heads fine-tunes its backbone (``backbone/``) and fits new
heads on it (the old heads were fitted to the old backbone's features).  Both are calibrated on the
validation structures, as ``equiforce train-uq`` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from equiforce.data import keys as K
from equiforce.data.graph import Graph
from equiforce.models.file import load_model
from equiforce.models.potential import Potential
from equiforce.train import distributed
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import MIN_STRUCTURES, CalibrationError
from equiforce.uq.ensemble import EnsemblePotential
from equiforce.uq.file import save_uq_model
from equiforce.uq.fit import build_uq_potential, calibrate
from equiforce.uq.heads import UQPotential
from equiforce.uq.train import UQ_MODEL

TuneOne = Callable[[Potential, int, Path], dict[str, Any]]
"""Fine-tunes one potential: ``(start, seed, directory) -> the trainer's result`` (best model in ``best_model``)."""


def calibration_method(model: UQModel) -> str:
    """The old model's force calibration (``scale`` or ``isotonic``), ``scale`` where it had none."""
    forces = model.calibration.quantities.get("forces")
    return forces.method if forces is not None and forces.method != "none" else "scale"


def fine_tune_uq(model: UQModel, tune_one: TuneOne, train_graphs: Sequence[Graph], valid_graphs: Sequence[Graph],
                 output_dir: str | os.PathLike, *, seed: int, device: torch.device,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune the potential(s) of ``model`` with ``tune_one``; write the recalibrated model to
    ``output_dir/uq.eqf`` and return ``{"best_model": it, "parts": [each trainer result], "epochs": ...}``."""
    if len(valid_graphs) < MIN_STRUCTURES:  # found now, not after every member has trained
        raise CalibrationError(f"fine-tuning a model with uncertainty recalibrates it on the validation structures: "
                               f"it needs at least {MIN_STRUCTURES}, got {len(valid_graphs)} (raise "
                               "data.valid_fraction or give data.valid)")
    out = Path(output_dir)
    method = calibration_method(model)
    data_elements = {int(z) for g in [*train_graphs, *valid_graphs] for z in g[K.NUMBERS].tolist()}
    seen = sorted(set(model.seen_elements) | data_elements)
    if isinstance(model, EnsemblePotential):
        parts = [tune_one(model.member(m), seed + m, out / "members" / f"m{m}") for m in range(model.n_members)]
        members = [load_model(p["best_model"], device=device) for p in parts]
        info = [{"seed": seed + m, "source": p["best_model"], "fine_tuned": True} for m, p in enumerate(parts)]
        tuned: UQModel = EnsemblePotential.from_members(members, seen_elements=seen, members_info=info).to(device)
        calibrate(tuned, valid_graphs, method=method, device=device)
    elif isinstance(model, UQPotential):
        parts = [tune_one(model.backbone, seed, out / "backbone")]
        backbone = load_model(parts[0]["best_model"], device=device)
        heads = model.heads
        tuned = build_uq_potential(backbone, train_graphs, valid_graphs, method=method, device=device, seed=seed,
                                   n_heads=heads.n_heads, hidden=heads.hidden)
        # seen: the elements the new heads were fitted on (an old element missing from the new training data
        # has no extrapolation statistics any more, so it is refused rather than given a σ without them)
    else:
        raise TypeError(f"no fine-tuning for uncertainty models of type {type(model).__name__}")
    kind = "ensemble" if isinstance(tuned, EnsemblePotential) else "heads"
    path = out / UQ_MODEL  # under torchrun rank 0 alone writes the file, the others wait for it
    distributed.write_on_main(lambda: save_uq_model(tuned, path, extra={**(extra or {}), "uq_method": kind}))
    return {"best_model": str(path), "uq_method": kind, "parts": parts,
            "epochs": sum(p["epochs"] for p in parts) / len(parts),
            "calibration": tuned.calibration.to_json(), "output_dir": str(out)}
