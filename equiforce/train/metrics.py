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

    def __init__(self, keep: bool = False, keep_max: int | None = None) -> None:
        self.keep = keep
        # at most ``keep_max`` rows per quantity: past it only every 2nd, 4th, ... row is kept (a parity plot of a
        # million-structure pack shows an even sample, and its values do not fill the memory)
        if keep_max is not None and keep_max < 1:
            raise ValueError(f"keep_max must be at least 1 (or None: keep every row), got {keep_max}")
        self.keep_max = keep_max
        self._sums: dict[str, torch.Tensor] = {}
        self._kept: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self._seen: dict[str, int] = {}
        self._every: dict[str, int] = {}

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
            self._keep_rows(name, pred[selected].cpu().numpy(), ref[selected].cpu().numpy())

    def _keep_rows(self, name: str, pred: np.ndarray, ref: np.ndarray) -> None:
        """Keep the rows whose running number is a multiple of the quantity's stride (1 until ``keep_max`` rows are
        kept, then doubled: the rows kept so far are the multiples of the old stride, so every other one of them
        is a multiple of the new one)."""
        every, seen = self._every.get(name, 1), self._seen.get(name, 0)
        lists = self._kept.setdefault(name, ([], []))
        first = (-seen) % every
        lists[0].append(pred[first::every])
        lists[1].append(ref[first::every])
        self._seen[name] = seen + len(pred)
        kept = sum(len(part) for part in lists[0])
        while self.keep_max is not None and kept > self.keep_max:
            thinned = (np.concatenate(lists[0])[::2], np.concatenate(lists[1])[::2])
            lists[0][:], lists[1][:] = [thinned[0]], [thinned[1]]
            every *= 2
            kept = len(thinned[0])
        self._every[name] = every

    def kept_every(self) -> dict[str, int]:
        """Per quantity, 1 in how many labelled rows :meth:`values` holds (1: all of them)."""
        return {name: self._every.get(name, 1) for name in self._kept}

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
