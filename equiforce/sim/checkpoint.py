"""Checkpoints of a running MD simulation: the state, the stop flags and the random stream, without pickle.

Long runs (100 ps of a batch of molecules takes hours on a CPU) must survive a killed job or a scheduler's
time limit.  A checkpoint holds everything the next step depends on — positions, momenta, cells, the step
counter, which systems are frozen and when they stopped, and the thermostat's generator state — plus any
arrays and JSON metadata the caller accumulates (histograms, settings), in one safetensors file written
atomically (temporary file, fsync, rename), so a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from equiforce.errors import DataError
from equiforce.sim.state import SimState
from equiforce.utils.atomic_io import atomic_write

FORMAT = "equiforce-md-checkpoint/1"
_STATE_FIELDS = ("positions", "momenta", "masses", "numbers", "cell", "pbc", "system", "ptr", "dof")
_FLAG_FIELDS = ("frozen", "stopped_step", "nonfinite_step")


@dataclass
class MDCheckpoint:
    """What :func:`load_md_checkpoint` returns: a state to continue, the driver's flags, the thermostat's
    generator state (or ``None``), the caller's arrays and metadata."""

    state: SimState
    flags: dict[str, torch.Tensor]
    generator_state: torch.Tensor | None
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def save_md_checkpoint(path: str | os.PathLike, state: SimState, flags: dict[str, torch.Tensor] | None = None,
                       generator: torch.Generator | None = None, arrays: dict[str, torch.Tensor] | None = None,
                       meta: dict[str, Any] | None = None) -> None:
    """Write ``state`` (and the rest) to ``path`` atomically; ``flags`` as in
    :class:`~equiforce.sim.md.MolecularDynamics` (``frozen``, ``stopped_step``, ``nonfinite_step``)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name in _STATE_FIELDS:
        tensors[f"state.{name}"] = getattr(state, name).detach()
    if state.fixed is not None:
        tensors["state.fixed"] = state.fixed.detach()
    for name, value in (flags or {}).items():
        if value is not None:
            tensors[f"flags.{name}"] = value.detach()
    if generator is not None:
        tensors["generator"] = generator.get_state()
    for name, value in (arrays or {}).items():
        tensors[f"array.{name}"] = torch.as_tensor(value)
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    header = {"format": FORMAT, "step": int(state.step), "meta": meta or {}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"equiforce": json.dumps(header)}))


def load_md_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> MDCheckpoint:
    """Read a checkpoint written by :func:`save_md_checkpoint`; floating tensors of the state go to ``dtype``
    (default: as saved).  A file that is not such a checkpoint is a :class:`DataError` naming it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("equiforce", "{}"))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"{path}: not a readable MD checkpoint ({exc})") from exc
    if header.get("format") != FORMAT:
        raise DataError(f"{path}: not an equiforce MD checkpoint (format {header.get('format')!r}, "
                        f"expected {FORMAT!r})")
    missing = [name for name in _STATE_FIELDS if f"state.{name}" not in tensors]
    if missing:
        raise DataError(f"{path}: MD checkpoint lacks state field(s) {', '.join(missing)}")

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    state = SimState(**{name: place(tensors[f"state.{name}"]) for name in _STATE_FIELDS}, step=int(header["step"]),
                     fixed=tensors["state.fixed"].to(device) if "state.fixed" in tensors else None)
    flags = {name: tensors[f"flags.{name}"].to(device) for name in _FLAG_FIELDS if f"flags.{name}" in tensors}
    arrays = {key[len("array."):]: value for key, value in tensors.items() if key.startswith("array.")}
    return MDCheckpoint(state=state, flags=flags, generator_state=tensors.get("generator"), arrays=arrays,
                        meta=header.get("meta", {}))
