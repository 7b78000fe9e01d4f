"""Error metrics accumulated over batches: MAE and RMSE in the units people quote (meV/atom, meV/Å).

Sums stay on the device until :meth:`ErrorMetrics.compute`, so validation costs no host sync per batch.
Only labelled entries count (the ``has_*`` masks); the per-configuration loss weights do not apply —
metrics describe the model, not the training objective.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from equiforce.data import keys as K

UNITS = {"energy_per_atom": "meV/atom", "energy": "meV", "forces": "meV/Å", "stress": "meV/Å³",
         "hessian_vp": "meV/Å²", "hessian": "meV/Å²"}
"""Reported quantity → unit of its ``_mae``/``_rmse`` values (model outputs are eV-based; × 1000).  ``hessian_vp``:
components of H·v for random Gaussian v (training and validation); ``hessian``: entries of full Hessians
(``equiforce eval``, :func:`equiforce.evaluate.hessian_errors`)."""


class ErrorMetrics:
    """Accumulate absolute and squared errors; ``keep=True`` also keeps the values for parity plots."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self._sums: dict[str, torch.Tensor] = {}
        self._kept: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}

    def _add(self, name: str, pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        pred, ref = pred.detach(), ref.detach()
        mask = mask.to(pred.dtype)
        while mask.dim() < pred.dim():
            mask = mask.unsqueeze(-1)
        mask = mask.expand_as(pred)
        err = (pred - ref) * mask
        stats = torch.stack([err.abs().sum(), err.square().sum(), mask.sum()])
        self._sums[name] = self._sums[name] + stats if name in self._sums else stats
        if self.keep:
            selected = mask.reshape(mask.shape[0], -1)[:, 0].bool()
            lists = self._kept.setdefault(name, ([], []))
            lists[0].append(pred[selected].cpu().numpy())
            lists[1].append(ref[selected].cpu().numpy())

    def update(self, pred: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch of predictions (from :class:`~equiforce.models.Potential`) and labels."""
        has_e = batch[K.HAS_ENERGY]
        n_atoms = batch[K.N_ATOMS].to(pred[K.ENERGY].dtype)
        self._add("energy", pred[K.ENERGY], batch[K.ENERGY], has_e)
        self._add("energy_per_atom", pred[K.ENERGY] / n_atoms, batch[K.ENERGY] / n_atoms, has_e)
        if K.FORCES in pred:
            self._add("forces", pred[K.FORCES], batch[K.FORCES], batch[K.HAS_FORCES][batch[K.BATCH]])
        if K.STRESS in pred:
            self._add("stress", pred[K.STRESS], batch[K.STRESS], batch[K.HAS_STRESS])
        if K.HESSIAN_VP in pred:  # components of H·v for random Gaussian v: ≈ √(3N) × the entry-wise error
            vp = pred[K.HESSIAN_VP].transpose(0, 1)
            self._add("hessian_vp", vp, pred[K.HESSIAN_VP_REF].transpose(0, 1), pred[K.HESSIAN_VP_MASK])

    def reduce_sums(self, reduce) -> None:
        """Replace the accumulated sums by ``reduce(sums)`` (e.g. an all-reduce over training processes)."""
        self._sums = {name: reduce(value) for name, value in sorted(self._sums.items())}

    def compute(self) -> dict[str, float]:
        """``{quantity}_mae`` and ``{quantity}_rmse`` in :data:`UNITS` for each quantity with labels."""
        out: dict[str, float] = {}
        for name in UNITS:
            if name not in self._sums:
                continue
            abs_sum, sq_sum, count = self._sums[name].tolist()
            if count == 0:
                continue
            out[f"{name}_mae"] = 1000.0 * abs_sum / count
            out[f"{name}_rmse"] = 1000.0 * math.sqrt(sq_sum / count)
        return out

    def values(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Kept ``(pred, ref)`` arrays in eV units, labelled entries only (needs ``keep=True``)."""
        if not self.keep:
            raise RuntimeError("ErrorMetrics(keep=True) is needed to get the values back")
        return {name: (np.concatenate(p), np.concatenate(r)) for name, (p, r) in self._kept.items()}
