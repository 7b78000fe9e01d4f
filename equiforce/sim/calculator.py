"""ASE calculator: energy, forces, stress and per-atom energies from an equiforce model.

A model with uncertainty (:mod:`equiforce.uq`) also fills ``energy_std`` (eV), ``forces_std`` (eV/Å, one
per atom) and, for periodic cells, ``stress_std`` (eV/Å³, Voigt order like ``stress``) in ``results``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import PropertyNotImplementedError, all_changes

from equiforce.data import keys as K
from equiforce.data.graph import collate, to_device
from equiforce.data.neighbors import neighbor_list
from equiforce.data.structure import full_to_voigt
from equiforce.models.file import load_for_inference
from equiforce.models.potential import Potential
from equiforce.uq import keys as UK


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "float64": torch.float64}[str(dtype)]


def inference_graph(atoms, cutoff: float, device: str | torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The batch of one structure, for inference (no label checks: MD may legitimately bring atoms close)."""
    i, j, shifts = neighbor_list(atoms.positions, np.asarray(atoms.cell), atoms.pbc, cutoff)
    graph = {
        K.POSITIONS: torch.as_tensor(atoms.positions),
        K.NUMBERS: torch.as_tensor(atoms.numbers, dtype=torch.long),
        K.CELL: torch.as_tensor(np.asarray(atoms.cell)).unsqueeze(0),
        K.PBC: torch.as_tensor(atoms.pbc).unsqueeze(0),
        K.EDGE_INDEX: torch.as_tensor(np.stack([i, j])),
        K.SHIFTS: torch.as_tensor(shifts),
        K.N_ATOMS: torch.tensor([len(atoms)]),
    }
    return to_device(collate([graph]), device, dtype)


class Calculator(AseCalculator):
    """Use a trained potential from ASE (MD, optimisers, NEB, vibrations).

    ``model_or_path`` is a :class:`Potential` or the path of a model file; ``device`` e.g. ``"cuda"``;
    ``dtype`` ``"float32"`` or ``"float64"`` (default: as saved).  A model with uncertainty (an ensemble or
    a :class:`~equiforce.uq.heads.UQPotential`) adds calibrated ``energy_std``, ``forces_std`` and
    ``stress_std`` to ``results`` (see :mod:`equiforce.uq.keys` for their meaning).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]
    uncertainty_properties = ["energy_std", "forces_std", "stress_std"]

    def __init__(self, model_or_path: Potential | str | os.PathLike, device: str = "cpu",
                 dtype: str | torch.dtype | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        # a model object elsewhere or in another dtype is copied, never moved under its other users
        self.model = load_for_inference(model_or_path, device=device, dtype=_resolve_dtype(dtype))
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype
        self.has_uncertainty = not isinstance(self.model, Potential) and hasattr(self.model, "calibration")
        if self.has_uncertainty:
            self.implemented_properties = [*type(self).implemented_properties, *self.uncertainty_properties]

    def _graph(self, atoms) -> dict[str, torch.Tensor]:
        return inference_graph(atoms, self.model.cutoff, self.device, self.dtype)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        self.model.check_elements(atoms.numbers)
        periodic = bool(atoms.pbc.any()) and abs(atoms.cell.volume) > 1e-8
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a periodic cell with non-zero volume")
        out = self.model(self._graph(atoms), compute_forces=True, compute_stress=periodic)
        energy = float(out[K.ENERGY].detach().sum().cpu())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out[K.FORCES].detach().cpu().double().numpy(),
            "energies": out[K.NODE_ENERGY].detach().cpu().double().numpy(),
        }
        if periodic:
            self.results["stress"] = full_to_voigt(out[K.STRESS][0].detach().cpu().double().numpy())
        if UK.ENERGY_STD in out:
            self.results["energy_std"] = float(out[UK.ENERGY_STD].detach().sum().cpu())
        if UK.FORCES_STD in out:
            self.results["forces_std"] = out[UK.FORCES_STD].detach().cpu().double().numpy()
        if periodic and UK.STRESS_STD in out:
            self.results["stress_std"] = full_to_voigt(out[UK.STRESS_STD][0].detach().cpu().double().numpy())
