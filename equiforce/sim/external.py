"""One structure evaluated over and over by an outside MD engine (OpenMM, LAMMPS): the shared core of the bridges.

The engine owns positions, box and integration; each call hands over positions (Å) and the cell, and gets
energy, forces, stress and σ back as float64 NumPy.  The neighbour list is equiforce's Verlet list, reused
within a skin across calls and rebuilt when positions or the box move too far — its validity depends only on
positions per index, so an engine that rewraps or reorders atoms only triggers a rebuild.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from equiforce.data import keys as K
from equiforce.models.file import load_for_inference
from equiforce.sim.evaluator import BatchEvaluator, model_dtype
from equiforce.sim.state import SimState
from equiforce.uq import keys as UK


class StructureEvaluator:
    """The model on one structure whose positions (and cell, and atom order) an outside engine changes.

    ``pbc``: three flags; the cell passed with each call is used along the periodic directions.
    """

    def __init__(self, model_or_path: torch.nn.Module | str | os.PathLike, numbers: Sequence[int],
                 pbc: Sequence[bool] = (False, False, False), *, device: str = "cpu", dtype: torch.dtype | None = None,
                 skin: float = 0.5, compile: bool = False) -> None:
        self.model = load_for_inference(model_or_path, device, dtype)
        numbers = np.asarray(numbers, dtype=np.int64)
        if numbers.size == 0:
            raise ValueError("no atoms for the model: give the atomic numbers of the atoms it covers")
        self.model.check_elements(sorted(set(numbers.tolist())))  # named here, not mid-run
        self.pbc = [bool(p) for p in pbc]
        self.dtype = model_dtype(self.model)
        atoms = Atoms(numbers=numbers, pbc=self.pbc, cell=np.eye(3) if any(self.pbc) else None)
        self.state = SimState.from_atoms(atoms, device=device, dtype=self.dtype)
        self._numbers = numbers
        self.evaluator = BatchEvaluator(self.model, skin=skin, compile=compile)
        self.calls = 0

    @property
    def n_atoms(self) -> int:
        return int(self._numbers.size)

    def __call__(self, positions: np.ndarray, cell: np.ndarray | None = None, numbers: np.ndarray | None = None,
                 compute_stress: bool = False) -> dict[str, Any]:
        """``energy`` (eV), ``forces`` [N, 3] (eV/Å), ``node_energy`` [N], ``stress`` [3, 3] (eV/Å³, ASE sign)
        when asked, and for a model with uncertainty ``energy_std``, ``forces_std`` [N] and ``max_forces_std``."""
        positions = np.asarray(positions, dtype=np.float64)
        device = self.state.device
        if positions.shape != (self.n_atoms, 3):
            if numbers is None or positions.ndim != 2 or positions.shape[1:] != (3,) or len(numbers) != len(positions):
                raise ValueError(f"the engine passed {positions.shape[0]} atoms but the model covers {self.n_atoms} "
                                 "(an engine that adds or removes atoms must pass their atomic numbers)")
            # atoms added or removed (LAMMPS fix deposit, evaporate): a state for the new set; the neighbour list
            # sees the new atom count and is built afresh
            self.model.check_elements(sorted(set(np.asarray(numbers).tolist())))
            self._numbers = np.asarray(numbers, dtype=np.int64).copy()
            atoms = Atoms(numbers=self._numbers, pbc=self.pbc, cell=np.eye(3) if any(self.pbc) else None)
            self.state = SimState.from_atoms(atoms, device=device, dtype=self.dtype)
        if numbers is not None and not np.array_equal(numbers, self._numbers):  # the engine reordered its atoms
            if sorted(numbers.tolist()) != sorted(self._numbers.tolist()):
                self.model.check_elements(sorted(set(numbers.tolist())))
            self._numbers = np.asarray(numbers, dtype=np.int64).copy()
            self.state.numbers = torch.as_tensor(self._numbers, device=device)
        self.state.positions = torch.as_tensor(positions, dtype=self.dtype, device=device)
        if cell is not None:
            self.state.cell = torch.as_tensor(np.asarray(cell, dtype=np.float64), dtype=self.dtype,
                                              device=device).reshape(1, 3, 3)
        with torch.enable_grad():  # forces are autograd derivatives, whatever the caller's grad mode
            out = self.evaluator(self.state, compute_stress=compute_stress)
        self.calls += 1
        result: dict[str, Any] = {
            "energy": float(out[K.ENERGY].sum()),
            "forces": out[K.FORCES].cpu().double().numpy(),
            "node_energy": out[K.NODE_ENERGY].cpu().double().numpy(),
        }
        if not (np.isfinite(result["energy"]) and np.isfinite(result["forces"]).all()):
            raise FloatingPointError(f"the model gave a non-finite energy or force at call {self.calls} "
                                     "(atoms on top of each other, or a model diverging)")
        if compute_stress:
            result["stress"] = out[K.STRESS][0].cpu().double().numpy()
        if UK.ENERGY_STD in out:
            result["energy_std"] = float(out[UK.ENERGY_STD].sum())
        if UK.FORCES_STD in out:
            result["forces_std"] = out[UK.FORCES_STD].cpu().double().numpy()
            result["max_forces_std"] = float(result["forces_std"].max())
        return result
