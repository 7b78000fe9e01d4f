"""Model files of UQ models: the core format (safetensors + JSON header) with their own class tag.

* ``EnsemblePotential``: tensors ``members.<weight>`` stacked ``[M, ...]``; header ``uq.members`` lists
  each member's spec and provenance (seed, bootstrap); loading refuses members whose specs differ or
  whose tensors do not stack.
* ``UQPotential``: tensors ``backbone.<weight>`` and ``heads.<weight>``; header ``uq.heads`` holds the
  head sizes.
Both store ``uq.calibration`` and ``uq.seen_elements``.  ``equiforce.load_model`` dispatches here on the
header's ``model_class``, so a UQ model loads wherever a model loads.  Never unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from equiforce.errors import ModelFileError
from equiforce.models.file import METADATA_KEY, check_weight_shapes, model_header, saved_dtype
from equiforce.models.potential import build_model
from equiforce.models.spec import ModelSpec
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import Calibration, CalibrationError
from equiforce.uq.ensemble import EnsemblePotential, MemberMismatchError
from equiforce.uq.heads import UQHeads, UQPotential
from equiforce.utils.atomic_io import atomic_write

UQ_CLASSES = ("EnsemblePotential", "UQPotential")


def _header(model: UQModel, extra: dict[str, Any] | None) -> dict[str, Any]:
    template = model.member(0) if isinstance(model, EnsemblePotential) else model.backbone
    header = model_header(template, extra)
    header["model_class"] = type(model).__name__
    uq: dict[str, Any] = {"calibration": model.calibration.to_json(), "seen_elements": model.seen_elements}
    if isinstance(model, EnsemblePotential):
        uq["n_members"] = model.n_members
        uq["members"] = [{"spec": json.loads(model.spec.model_dump_json()), **info} for info in model.members_info]
    else:
        heads = model.heads
        uq["heads"] = {"channels": heads.channels, "n_heads": heads.n_heads, "hidden": heads.hidden,
                       "n_elements": heads.n_elements, "stress_trained": heads.stress_trained}
    header["uq"] = uq
    return header


def save_uq_model(model: UQModel, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write a UQ model (weights, calibration, provenance) to one file, atomically."""
    if isinstance(model, EnsemblePotential):
        tensors = {f"members.{k}": v for k, v in model.stacked_state().items()}
    elif isinstance(model, UQPotential):
        tensors = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
        tensors.update({f"heads.{k}": v for k, v in model.heads.state_dict().items()})
    else:
        raise TypeError(f"not a UQ model: {type(model).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {METADATA_KEY: json.dumps(_header(model, extra))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Path(path)


def _spec(value: Any, where: str) -> ModelSpec:
    try:
        return ModelSpec.model_validate(value)
    except Exception as err:
        raise ModelFileError(f"{where}: invalid model spec: {err}") from None


def load_uq_model(path: str | os.PathLike, header: dict[str, Any], device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> UQModel:
    """Load a UQ model file whose header was already read (see :func:`equiforce.models.file.read_header`)."""
    model_class = header.get("model_class")
    if model_class not in UQ_CLASSES:
        raise ModelFileError(f"{path}: unknown model class {model_class!r}")
    uq = header.get("uq")
    if not isinstance(uq, dict):
        raise ModelFileError(f"{path}: {model_class} file without its `uq` header section")
    spec = _spec(header.get("spec"), str(path))
    weights_dtype = saved_dtype(header, path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    try:
        calibration = Calibration.from_json(uq.get("calibration"))
    except (CalibrationError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: invalid calibration: {err}") from None
    seen = uq.get("seen_elements")
    if model_class == "EnsemblePotential":
        members = uq.get("members") or []
        n_members = int(uq.get("n_members", len(members)))
        if len(members) != n_members:
            raise MemberMismatchError(f"{path}: header lists {len(members)} members but says n_members={n_members}")
        for i, info in enumerate(members):
            member_spec = _spec(info.get("spec"), f"{path}: member {i}")
            if member_spec != spec:
                fields = sorted(k for k, v in spec.model_dump().items() if member_spec.model_dump().get(k) != v)
                raise MemberMismatchError(f"{path}: ensemble member {i} differs from the ensemble spec in "
                                          f"{', '.join(fields)}; members must share architecture and statistics")
        stacked = {k.removeprefix("members."): v for k, v in tensors.items() if k.startswith("members.")}
        if len(stacked) != len(tensors):
            raise ModelFileError(f"{path}: unexpected tensors in an ensemble file")
        if any(t.dim() == 0 or t.shape[0] != n_members for t in stacked.values()):
            bad = next(k for k, t in stacked.items() if t.dim() == 0 or t.shape[0] != n_members)
            raise MemberMismatchError(f"{path}: weight {bad} holds {tuple(stacked[bad].shape)[:1]} members, the "
                                      f"header lists {n_members}")
        check_weight_shapes(spec, {k: tuple(v.shape) for k, v in tensors.items()}, path, prefix="members.",
                            leading=(n_members,))
        info = [{k: v for k, v in m.items() if k != "spec"} for m in members]
        model: UQModel = EnsemblePotential(spec, stacked, weights_dtype, calibration=calibration, seen_elements=seen,
                                           members_info=info)
    else:
        heads_cfg = uq.get("heads") or {}
        check_weight_shapes(spec, {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("backbone.")},
                            path, prefix="backbone.")
        backbone = build_model(spec, dtype=weights_dtype)
        try:
            backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items()
                                      if k.startswith("backbone.")}, strict=True)
            heads = UQHeads(int(heads_cfg["channels"]), int(heads_cfg["n_heads"]), int(heads_cfg["hidden"]),
                            int(heads_cfg["n_elements"]))
            heads = heads.to(weights_dtype)
            heads.load_state_dict({k.removeprefix("heads."): v for k, v in tensors.items() if k.startswith("heads.")},
                                  strict=True)
        except (KeyError, RuntimeError) as err:
            raise ModelFileError(f"{path}: weights do not match the spec: {err}") from None
        heads.stress_trained = bool(heads_cfg.get("stress_trained", False))
        model = UQPotential(backbone, heads, calibration=calibration, seen_elements=seen)
    model.header = header
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device).eval()
