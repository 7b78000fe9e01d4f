"""Trajectory and log output for batched simulations.

* extxyz / ASE ``.traj``: one frame per system per write, interleaved, each tagged ``info["system"]``
  (read one system back with :func:`read_system_frames`);
* HDF5 (``.h5``/``.hdf5``): flat, append-only datasets for long runs — ``positions [T, N, 3]``,
  ``momenta``, ``cell [T, B, 3, 3]``, ``energy [T, B]``, ``step [T]``, ``time_ps [T]`` with ``ptr``,
  ``numbers``, ``masses``, ``pbc`` stored once; flushed after every frame so a crash loses at most one;
* a thermo log (``.csv`` or ``.jsonl``), one line per system per record, flushed per record.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from equiforce.data import keys as K
from equiforce.data.structure import full_to_voigt
from equiforce.errors import ConfigError
from equiforce.sim.state import SimState
from equiforce.utils.atomic_io import fsync_path

HDF5_SUFFIXES = {".h5", ".hdf5"}
ASE_SUFFIXES = {".xyz", ".extxyz", ".traj"}


class TrajectoryWriter:
    """Base class: ``write(state, outputs, time_ps)`` then ``close()``."""

    def write(self, state: SimState, outputs: dict[str, torch.Tensor], time_ps: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def sync(self) -> None:
        """Make what was written durable (before a checkpoint records how far it got)."""

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


class AseTrajectoryWriter(TrajectoryWriter):
    """extxyz or ``.traj`` through ASE, with energy, forces and (periodic) stress attached to each frame."""

    def __init__(self, path: str | os.PathLike, resume_at: int | None = None) -> None:
        """``resume_at``: continue a file cut back to this :meth:`position` (a resumed run; extxyz only)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix == ".traj":
            if resume_at is not None:
                raise ConfigError(f"{self.path}: an ASE .traj trajectory cannot be continued after a checkpoint; "
                                  "use .h5 or .extxyz for resumable runs")
            from ase.io.trajectory import Trajectory

            self._traj = Trajectory(str(self.path), "w")
        else:
            self._traj = None
            if resume_at is None:
                self.path.write_text("")
            else:
                _cut_back(self.path, resume_at)

    def sync(self) -> None:
        if self._traj is None and self.path.exists():
            fsync_path(self.path)

    def position(self) -> int | None:
        """Bytes written so far (extxyz), where a resumed run continues; ``None`` for ``.traj``."""
        return None if self._traj is not None else self.path.stat().st_size

    def write(self, state: SimState, outputs: dict[str, torch.Tensor], time_ps: float) -> None:
        frames = state.to_atoms()
        energy, forces = _numpy(outputs[K.ENERGY]), _numpy(outputs[K.FORCES])
        stress = _numpy(outputs[K.STRESS]) if K.STRESS in outputs else None
        ptr = state.ptr.tolist()
        for b, atoms in enumerate(frames):
            results: dict[str, Any] = {"energy": float(energy[b]), "forces": forces[ptr[b]:ptr[b + 1]]}
            if stress is not None and atoms.pbc.all() and atoms.cell.volume > 1e-8:
                results["stress"] = full_to_voigt(stress[b])
            atoms.calc = SinglePointCalculator(atoms, **results)
            atoms.info.update({"system": b, "step": state.step, "time_ps": time_ps})
            if self._traj is not None:
                self._traj.write(atoms)
            else:
                from ase.io import write

                write(str(self.path), atoms, format="extxyz", append=True)

    def close(self) -> None:
        if self._traj is not None:
            self._traj.close()


def _cut_back(path: Path, size: int) -> None:
    """Truncate ``path`` to ``size`` bytes: what a checkpoint saw written (later lines belong to steps that
    will be run again).  A file shorter than that was not written by the checkpointed run."""
    if not path.exists():
        raise ConfigError(f"{path}: missing; the checkpoint saw {size} bytes of it written")
    if path.stat().st_size < size:
        raise ConfigError(f"{path}: has {path.stat().st_size} bytes, the checkpoint saw {size}; it is not that run's "
                          "output")
    with open(path, "r+b") as handle:
        handle.truncate(size)


def read_system_frames(path: str | os.PathLike, system: int = 0) -> list[Atoms]:
    """Frames of one system from an extxyz/.traj trajectory written by :class:`AseTrajectoryWriter`."""
    from ase.io import read

    return [a for a in read(str(path), index=":") if int(a.info.get("system", 0)) == system]


class HDF5TrajectoryWriter(TrajectoryWriter):
    """Append-only HDF5 trajectory (needs ``h5py``); ``precision`` float32 halves the file size."""

    def __init__(self, path: str | os.PathLike, precision: str = "float64", resume_at: int | None = None) -> None:
        """``resume_at``: continue the file with its first ``resume_at`` frames kept (a resumed run)."""
        import h5py

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dtype = np.dtype(precision)
        self._initialised = False
        if resume_at is None:
            self._file = h5py.File(self.path, "w")
            return
        if not self.path.exists():
            raise ConfigError(f"{self.path}: missing; the checkpoint saw {resume_at} frames written")
        self._file = h5py.File(self.path, "a")
        frames = self.position()
        if frames < resume_at:
            self._file.close()
            raise ConfigError(f"{self.path}: has {frames} frames, the checkpoint saw {resume_at}; it is not that "
                              "run's output")
        if "step" in self._file:
            for name in ("positions", "momenta", "forces", "cell", "energy", "step", "time_ps"):
                self._file[name].resize(resume_at, axis=0)
            self._dtype = self._file["positions"].dtype
            self._initialised = True

    def position(self) -> int:
        """Frames written so far (where a resumed run continues)."""
        return int(self._file["step"].shape[0]) if "step" in self._file else 0

    def sync(self) -> None:
        self._file.flush()
        fsync_path(self.path)

    def _create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        chunk = (1,) + shape if int(np.prod(shape, dtype=np.int64)) > 0 else None
        self._file.create_dataset(name, shape=(0,) + shape, maxshape=(None,) + shape, dtype=dtype, chunks=chunk)

    def _init(self, state: SimState) -> None:
        f = self._file
        f.attrs["format"] = "equiforce-trajectory-1"
        f.attrs["units"] = "Å, eV, amu, ps; momenta amu·Å/(ASE time)"
        f.create_dataset("ptr", data=state.ptr.cpu().numpy())
        f.create_dataset("numbers", data=state.numbers.cpu().numpy())
        f.create_dataset("masses", data=_numpy(state.masses))
        f.create_dataset("pbc", data=state.pbc.cpu().numpy())
        n, b = state.positions.shape[0], state.n_systems
        self._create("positions", (n, 3), self._dtype)
        self._create("momenta", (n, 3), self._dtype)
        self._create("forces", (n, 3), self._dtype)
        self._create("cell", (b, 3, 3), np.dtype("float64"))
        self._create("energy", (b,), np.dtype("float64"))
        self._create("step", (), np.dtype("int64"))
        self._create("time_ps", (), np.dtype("float64"))
        self._initialised = True

    def write(self, state: SimState, outputs: dict[str, torch.Tensor], time_ps: float) -> None:
        if not self._initialised:
            self._init(state)
        values = {"positions": state.positions, "momenta": state.momenta, "forces": outputs[K.FORCES],
                  "cell": state.cell, "energy": outputs[K.ENERGY]}
        for name, value in values.items():
            self._append(name, _numpy(value))
        self._append("step", np.asarray(state.step))
        self._append("time_ps", np.asarray(time_ps))
        self._file.flush()

    def _append(self, name: str, value: np.ndarray) -> None:
        dataset = self._file[name]
        dataset.resize(dataset.shape[0] + 1, axis=0)
        dataset[-1] = value

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


def read_hdf5_system(path: str | os.PathLike, system: int = 0) -> list[Atoms]:
    """Frames of one system from an HDF5 trajectory, as ASE ``Atoms`` with momenta, energy and forces."""
    import h5py

    with h5py.File(path, "r") as f:
        ptr = f["ptr"][:]
        s = slice(int(ptr[system]), int(ptr[system + 1]))
        numbers, masses, pbc = f["numbers"][s], f["masses"][s], f["pbc"][system]
        positions, momenta, forces = f["positions"][:, s], f["momenta"][:, s], f["forces"][:, s]
        cells, energies, time_ps = f["cell"][:, system], f["energy"][:, system], f["time_ps"][:]
    frames = []
    for t in range(len(time_ps)):
        atoms = Atoms(numbers=numbers, positions=positions[t], cell=cells[t], pbc=pbc, masses=masses)
        atoms.set_momenta(momenta[t], apply_constraint=False)
        atoms.calc = SinglePointCalculator(atoms, energy=float(energies[t]), forces=forces[t])
        atoms.info["time_ps"] = float(time_ps[t])
        frames.append(atoms)
    return frames


def open_trajectory(path: str | os.PathLike, precision: str = "float64",
                    resume_at: int | None = None) -> TrajectoryWriter:
    """A writer chosen by file suffix: ``.h5``/``.hdf5``, ``.xyz``/``.extxyz`` or ``.traj``; ``resume_at``
    continues a file from a writer's earlier ``position()`` (a run resumed from a checkpoint)."""
    suffix = Path(path).suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return HDF5TrajectoryWriter(path, precision, resume_at)
    if suffix in ASE_SUFFIXES:
        return AseTrajectoryWriter(path, resume_at)
    raise ValueError(f"unknown trajectory format {suffix!r} for {path}: use .h5, .extxyz, .xyz or .traj")


class ThermoLog:
    """One row per system per record (``.csv`` or ``.jsonl``), flushed each time so a crash keeps the log."""

    def __init__(self, path: str | os.PathLike, resume_at: int | None = None) -> None:
        """``resume_at``: continue a log cut back to this :meth:`position` (a run resumed from a checkpoint)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix.lower() not in {".csv", ".jsonl"}:
            raise ValueError(f"thermo log must be .csv or .jsonl, got {self.path}")
        self._writer: csv.DictWriter | None = None
        if resume_at is None:
            self._handle = open(self.path, "w", encoding="utf-8", newline="")
            return
        _cut_back(self.path, resume_at)
        header = ""
        if self.path.suffix.lower() == ".csv" and resume_at > 0:
            with open(self.path, encoding="utf-8", newline="") as handle:
                header = handle.readline()
        self._handle = open(self.path, "a", encoding="utf-8", newline="")
        if header:  # the columns are already there: go on below them
            self._writer = csv.DictWriter(self._handle, fieldnames=next(csv.reader([header])))

    def position(self) -> int:
        """Bytes written so far (where a resumed run continues)."""
        self._handle.flush()
        return self._handle.tell()

    def sync(self) -> None:
        """Make the rows written so far durable (before a checkpoint records how far the log got)."""
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def write(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self.path.suffix.lower() == ".jsonl":
            for row in rows:
                self._handle.write(json.dumps(row) + "\n")
        else:
            if self._writer is None:
                self._writer = csv.DictWriter(self._handle, fieldnames=list(rows[0]))
                self._writer.writeheader()
            self._writer.writerows(rows)
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
