"""Model files: one safetensors file whose header metadata carries the JSON spec.

Loading parses the safetensors header (JSON) and raw tensor bytes only: no pickle, so a model file
from a stranger cannot run code.  Anything that is not a valid safetensors file is refused.
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
from equiforce.models.potential import Potential, build_model
from equiforce.models.spec import ModelSpec
from equiforce.utils.atomic_io import atomic_write

FORMAT = "equiforce-model"
FORMAT_VERSION = 1
METADATA_KEY = "equiforce"


def model_header(model: Potential, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    from equiforce import __version__

    dtype = next(model.parameters()).dtype
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "equiforce_version": __version__,
        "model_class": "Potential",
        "spec": json.loads(model.spec.model_dump_json()),
        "dtype": str(dtype).replace("torch.", ""),
        "units": {"energy": "eV", "length": "Angstrom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"},
        "extra": extra or {},
    }


def save_model(model: Potential, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (architecture spec + weights) to one file, atomically."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(model_header(model, extra))}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Path(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a model file (spec, version, units, extra), without loading weights."""
    path = Path(path)
    if not path.is_file():
        if (path / "index.json").is_file() or (path / "progress.json").is_file():
            raise ModelFileError(f"model file {path} is a packed dataset (equiforce pack), not a model file")
        raise ModelFileError(f"model file {path} is a directory, not a model file (e.g. {path}/best.eqf)"
                             if path.is_dir() else f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path} is not an equiforce model file (not a valid safetensors file: {err}); "
                             "equiforce never unpickles model files") from None
    if METADATA_KEY not in metadata:
        raise ModelFileError(f"{path} is a safetensors file but carries no equiforce model header")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: model header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: model header is not a JSON object (got {type(header).__name__})")
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: unknown model format {header.get('format')!r}")
    version = header.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path}: model format version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version} is newer than this "
                             f"equiforce supports ({FORMAT_VERSION}); upgrade equiforce")
    saved_dtype(header, path)  # checked here, so every loader can rely on it
    return header


SAVED_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_weight_shapes(spec: ModelSpec, shapes: dict[str, tuple[int, ...]], path: str | os.PathLike,
                        prefix: str = "", leading: tuple[int, ...] = ()) -> None:
    """Refuse a file whose weights do not fit its spec *before* the model is built: the spec alone says how
    large the model is, so a damaged or hostile header (``channels: 100000``) must not get memory it then fills.
    The expected shapes come from the model built on the ``meta`` device (no memory); ``prefix`` selects the
    file's tensors of this model, ``leading`` the dimensions stacked in front (an ensemble's members)."""
    with torch.device("meta"):
        template = build_model(spec).state_dict()
    expected = {prefix + name: leading + tuple(value.shape) for name, value in template.items()}
    found = {name: shape for name, shape in shapes.items() if name.startswith(prefix)}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    if missing or extra or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 "; ".join(f"{name} is {found[name]}, the spec needs {expected[name]}" for name in wrong[:3])]
        raise ModelFileError(f"{path}: weights do not match the spec ({'; '.join(p for p in parts if p)})")


def saved_dtype(header: dict[str, Any], path: str | os.PathLike) -> torch.dtype:
    """The weights' dtype a header names: only the floating types equiforce writes (never an arbitrary
    ``torch`` attribute looked up by name)."""
    name = header.get("dtype", "float64")
    if name not in SAVED_DTYPES:
        raise ModelFileError(f"{path}: unknown weight dtype {name!r} (expected one of {sorted(SAVED_DTYPES)})")
    return SAVED_DTYPES[name]


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> Potential:
    """Load a model file.  ``dtype`` casts the weights (default: as saved).

    A file of a model with uncertainty (``model_class`` of :mod:`equiforce.uq`) loads as that wrapper,
    which has the same interface as :class:`Potential` plus σ outputs.
    """
    header = read_header(path)
    if header.get("model_class", "Potential") != "Potential":
        from equiforce.uq.file import load_uq_model  # wrappers around Potential live in equiforce.uq

        return load_uq_model(path, header, device=device, dtype=dtype)
    try:
        spec = ModelSpec.model_validate(header["spec"])
    except Exception as err:
        raise ModelFileError(f"{path}: invalid model spec: {err}") from None
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    check_weight_shapes(spec, {k: tuple(v.shape) for k, v in tensors.items()}, path)
    model = build_model(spec, dtype=saved_dtype(header, path))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ModelFileError(f"{path}: weights do not match the spec: {err}") from None
    model.header = header
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.to(device).eval()


def load_for_inference(model_or_path: torch.nn.Module | str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model object or model file on ``device`` in ``dtype`` (default: as it is), in eval mode.

    A model object already there is used as it is; otherwise a *copy* is moved (``Module.to`` works in place, so
    a float32 calculator made from a float64 model would change the caller's model under every other user).
    """
    if not isinstance(model_or_path, torch.nn.Module):
        return load_model(model_or_path, device=device, dtype=dtype).eval()
    model, wanted = model_or_path, torch.device(device)
    reference = next(iter(model.parameters()), None)
    elsewhere = reference is not None and (reference.device.type != wanted.type
                                           or (wanted.index is not None and reference.device.index != wanted.index))
    if elsewhere or (reference is not None and dtype is not None and reference.dtype != dtype):
        import copy

        model = copy.deepcopy(model).to(device=device)
        if dtype is not None:
            model = model.to(dtype=dtype)
    return model.eval()
