"""Run a UQ model over labelled structures and keep predictions, references and σ side by side.

Calibration, ``equiforce eval --uq`` and ``benchmarks/uq.py`` all read the same arrays, so the σ that is
calibrated is the σ that is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from equiforce.data import keys as K
from equiforce.data.graph import Graph, collate, to_device
from equiforce.errors import EquiforceError
from equiforce.uq import keys as UK


@dataclass
class UQPredictions:
    """Per-structure (``S``) and per-atom (``A``) arrays in eV, eV/Å, eV/Å³; σ as in :mod:`equiforce.uq.keys`."""

    energy_pred: np.ndarray  # [S]
    energy_ref: np.ndarray  # [S]
    energy_sigma: np.ndarray  # [S]
    has_energy: np.ndarray  # [S] bool
    n_atoms: np.ndarray  # [S]
    forces_pred: np.ndarray  # [A, 3]
    forces_ref: np.ndarray  # [A, 3]
    forces_sigma: np.ndarray  # [A] (nan when the model gave none)
    has_forces: np.ndarray  # [A] bool
    structure: np.ndarray  # [A] index of each atom's structure
    numbers: np.ndarray  # [A]
    stress: dict[str, np.ndarray] = field(default_factory=dict)  # pred/ref/sigma [S,3,3], has [S]

    @property
    def n_structures(self) -> int:
        return int(self.energy_pred.shape[0])

    def subset(self, structures: np.ndarray) -> UQPredictions:
        """The predictions of the given structure indices (in that order)."""
        structures = np.asarray(structures, dtype=np.int64)
        remap = -np.ones(self.n_structures, dtype=np.int64)
        remap[structures] = np.arange(len(structures))
        atoms = np.concatenate([np.flatnonzero(self.structure == s) for s in structures]) if len(structures) else \
            np.zeros(0, dtype=np.int64)
        stress = {k: v[structures] for k, v in self.stress.items()}
        return UQPredictions(self.energy_pred[structures], self.energy_ref[structures], self.energy_sigma[structures],
                             self.has_energy[structures], self.n_atoms[structures], self.forces_pred[atoms],
                             self.forces_ref[atoms], self.forces_sigma[atoms], self.has_forces[atoms],
                             remap[self.structure[atoms]], self.numbers[atoms], stress)

    @staticmethod
    def concatenate(parts: Sequence[UQPredictions]) -> UQPredictions:
        offsets = np.cumsum([0] + [p.n_structures for p in parts])[:-1]
        stress_keys = set.intersection(*(set(p.stress) for p in parts)) if parts else set()
        return UQPredictions(
            *(np.concatenate([getattr(p, name) for p in parts]) for name in
              ("energy_pred", "energy_ref", "energy_sigma", "has_energy", "n_atoms", "forces_pred", "forces_ref",
               "forces_sigma", "has_forces")),
            structure=np.concatenate([p.structure + o for p, o in zip(parts, offsets)]),
            numbers=np.concatenate([p.numbers for p in parts]),
            stress={k: np.concatenate([p.stress[k] for p in parts]) for k in stress_keys})


def has_uncertainty(model: torch.nn.Module) -> bool:
    from equiforce.uq.base import UQModel

    return isinstance(model, UQModel)


class UQCollector:
    """Keeps each batch's predictions, labels and σ as a :class:`UQPredictions` is built from them.

    It takes batches as :class:`~equiforce.train.metrics.ErrorMetrics` does (``update(out, batch)``), so
    ``equiforce eval --uq`` gathers σ in the same pass over the data as the MAE/RMSE metrics.
    """

    def __init__(self) -> None:
        self._rows: dict[str, list[np.ndarray]] = {}
        self._structures = 0

    def _keep(self, name: str, value: torch.Tensor) -> None:
        self._rows.setdefault(name, []).append(value.detach().cpu().double().numpy())

    def update(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        if UK.ENERGY_STD not in out or UK.FORCES_STD not in out:
            raise EquiforceError("the model gave no σ for this batch (a model without uncertainty?)")
        self._keep("energy_pred", out[K.ENERGY])
        self._keep("energy_ref", batch[K.ENERGY])
        self._keep("energy_sigma", out[UK.ENERGY_STD])
        self._keep("has_energy", batch[K.HAS_ENERGY] > 0)
        self._keep("n_atoms", batch[K.N_ATOMS])
        self._keep("forces_pred", out[K.FORCES])
        self._keep("forces_ref", batch[K.FORCES])
        self._keep("forces_sigma", out[UK.FORCES_STD])
        self._keep("has_forces", batch[K.HAS_FORCES][batch[K.BATCH]] > 0)
        self._keep("structure", batch[K.BATCH] + self._structures)
        self._keep("numbers", batch[K.NUMBERS])
        if K.STRESS in out and UK.STRESS_STD in out:
            self._keep("stress_pred", out[K.STRESS])
            self._keep("stress_ref", batch[K.STRESS])
            self._keep("stress_sigma", out[UK.STRESS_STD])
            self._keep("stress_has", batch[K.HAS_STRESS] > 0)
        self._structures += int(batch[K.CELL].shape[0])

    def result(self) -> UQPredictions:
        if not self._structures:
            raise EquiforceError("no structures to predict")
        arrays = {name: np.concatenate(parts) for name, parts in self._rows.items()}
        stress = {name.removeprefix("stress_"): arrays.pop(name) for name in list(arrays)
                  if name.startswith("stress_")}
        for name in ("has_energy", "has_forces"):
            arrays[name] = arrays[name].astype(bool)
        for name in ("n_atoms", "structure", "numbers"):
            arrays[name] = arrays[name].astype(np.int64)
        if "has" in stress:
            stress["has"] = stress["has"].astype(bool)
        return UQPredictions(**arrays, stress=stress)


def predict(model: torch.nn.Module, graphs: Sequence[Graph], batch_size: int = 16,
            device: str | torch.device = "cpu", calibrated: bool = True,
            compute_stress: bool | None = None) -> UQPredictions:
    """Predictions, labels and σ for every graph (in order).  ``calibrated=False`` gives raw σ."""
    if not has_uncertainty(model):
        raise EquiforceError("this model carries no uncertainty (train one with `equiforce train-uq`)")
    if not graphs:
        raise EquiforceError("no structures to predict")
    if compute_stress is None:
        from equiforce.evaluate import has_labels

        compute_stress = has_labels(graphs, K.HAS_STRESS)
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    collector = UQCollector()
    try:
        with torch.enable_grad():
            for start in range(0, len(graphs), batch_size):
                batch = to_device(collate(list(graphs[start:start + batch_size])), device, dtype)
                collector.update(model(batch, compute_forces=True, compute_stress=compute_stress,
                                       calibrated=calibrated), batch)
    finally:
        model.train(was_training)
    return collector.result()
