"""Pickle-free training checkpoints: one safetensors file, its structure as JSON in the header.

``torch.save`` checkpoints are pickles, and loading a pickle from someone else runs their code.  Here a
nested state (model, EMA, optimiser and scheduler state dicts, RNG states, counters, the config) is split
into tensors, stored by safetensors under their path (``optimizer/state/0/exp_avg``), and everything
else — ints, floats (inf included), strings, None, lists, tuples, dicts with int keys — kept as JSON
that refers to those tensors.  Writing is atomic, so a crash mid-save leaves the previous checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from equiforce.errors import ModelFileError
from equiforce.utils.atomic_io import atomic_write

FORMAT = "equiforce-checkpoint"
FORMAT_VERSION = 1
_TENSOR, _ARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
_MARKERS = (_TENSOR, _ARRAY, _TUPLE, _DICT)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``obj`` with tensors moved into ``tensors`` and replaced by references."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        marker = _TENSOR if isinstance(obj, torch.Tensor) else _ARRAY
        tensor = obj.detach().cpu() if isinstance(obj, torch.Tensor) else torch.from_numpy(np.array(obj))
        key = path or "root"
        while key in tensors:
            key += "#"
        tensors[key] = tensor.clone().contiguous()  # a copy: safetensors refuses shared storage
        return {marker: key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and k not in _MARKERS for k in obj)
        if plain:
            return {k: _encode(v, f"{path}/{k}" if path else k, tensors) for k, v in obj.items()}
        return {_DICT: [[_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{k}" if path else str(k),
                                                                       tensors)]
                        for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"checkpoint entry {path or '<root>'} has type {type(obj).__name__}, which is not storable "
                    "(tensors, arrays, numbers, strings, None, lists, tuples and dicts are)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (marker, value), = obj.items()
            if marker == _TENSOR:
                return tensors[value]
            if marker == _ARRAY:
                return tensors[value].numpy()
            if marker == _TUPLE:
                return tuple(_decode(v, tensors) for v in value)
            if marker == _DICT:
                return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list | tuple) else key


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Atomically write a nested ``state`` (see the module doc for what it may hold)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(dict(state), "", tensors)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "structure": json.dumps(structure)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Path(path)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise ModelFileError(f"{path} is not an equiforce checkpoint (not a valid safetensors file: {err}); "
                             "equiforce never unpickles checkpoints") from None
    if metadata.get("format") != FORMAT or "structure" not in metadata:
        raise ModelFileError(f"{path} is a safetensors file but not an equiforce checkpoint")
    if int(metadata.get("format_version", "0")) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: checkpoint format version {metadata['format_version']} is newer than "
                             f"this equiforce supports ({FORMAT_VERSION}); upgrade equiforce")
    try:
        structure = json.loads(metadata["structure"])
        return _decode(structure, tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{path}: corrupt checkpoint structure ({err})") from None
