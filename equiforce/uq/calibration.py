"""Calibration of predicted σ on held-out data: a scale factor (default) or a monotone (isotonic) map.

Raw σ from an ensemble's spread or from uncertainty heads has the right *ranking* but rarely the right
*size*; calibration fixes the size on structures the model was not trained on.  A calibration is plain
JSON (stored in the model file header) and is applied with a few tensor ops (no host sync), so MD can
read calibrated σ every step.

* ``scale``: σ = s·σ_raw, s by maximum likelihood of the residuals under a Gaussian (closed form).
* ``isotonic``: σ² = g(σ_raw) with g non-decreasing, fitted by pool-adjacent-violators on binned squared
  errors; beyond the fitted range g extrapolates *proportionally* (σ_raw × the end ratio), so a structure
  far outside the calibration data keeps a large σ instead of being capped at the largest one seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from equiforce.errors import EquiforceError

MIN_STRUCTURES = 10
"""Fewer calibration structures than this is refused: one scale from a handful of structures is noise."""
METHODS = ("scale", "isotonic")
MAX_KNOTS = 64
TINY = 1e-12


class CalibrationError(EquiforceError, ValueError):
    """Calibration cannot be fitted (too few structures, no labels, non-finite σ)."""


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression by pool-adjacent-violators."""
    values, weights, counts = [], [], []
    for yi, wi in zip(y.tolist(), w.tolist()):
        values.append(yi)
        weights.append(wi)
        counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            wsum = weights[-2] + weights[-1]
            merged = (values[-2] * weights[-2] + values[-1] * weights[-1]) / wsum
            count = counts[-2] + counts[-1]
            del values[-1], weights[-1], counts[-1]
            values[-1], weights[-1], counts[-1] = merged, wsum, count
    return np.repeat(values, counts)


@dataclass
class QuantityCalibration:
    """The calibration of one quantity's σ (``energy``, ``forces`` or ``stress``)."""

    method: str = "none"  # "none" (uncalibrated, scale 1), "scale" or "isotonic"
    scale: float = 1.0
    knots_x: list[float] = field(default_factory=list)  # raw σ (isotonic only)
    knots_y: list[float] = field(default_factory=list)  # calibrated σ at knots_x
    n_structures: int = 0
    n_samples: int = 0
    _knots: dict = field(default_factory=dict, compare=False, repr=False)  # (device, dtype) → knot tensors

    @property
    def fitted(self) -> bool:
        return self.method != "none"

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "scale": self.scale, "knots_x": self.knots_x, "knots_y": self.knots_y,
                "n_structures": self.n_structures, "n_samples": self.n_samples}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantityCalibration:
        if data.get("method", "none") not in ("none", *METHODS):
            raise CalibrationError(f"unknown calibration method {data.get('method')!r}")
        return cls(method=data.get("method", "none"), scale=float(data.get("scale", 1.0)),
                   knots_x=[float(x) for x in data.get("knots_x", [])],
                   knots_y=[float(y) for y in data.get("knots_y", [])],
                   n_structures=int(data.get("n_structures", 0)), n_samples=int(data.get("n_samples", 0)))

    def apply(self, sigma: torch.Tensor) -> torch.Tensor:
        """Calibrated σ from raw σ (any shape; differentiable, no host sync)."""
        if self.method != "isotonic":
            return sigma * self.scale
        key = (sigma.device, sigma.dtype)
        if key not in self._knots:  # built once per device: no host-to-device copy per MD step
            self._knots[key] = (torch.tensor(self.knots_x, dtype=sigma.dtype, device=sigma.device),
                                torch.tensor(self.knots_y, dtype=sigma.dtype, device=sigma.device))
        x, y = self._knots[key]
        flat = sigma.reshape(-1)
        idx = torch.searchsorted(x, flat.contiguous()).clamp(1, len(x) - 1)
        x0, x1, y0, y1 = x[idx - 1], x[idx], y[idx - 1], y[idx]
        inside = y0 + (y1 - y0) * (flat - x0) / (x1 - x0).clamp_min(TINY)
        below = flat * (y[0] / x[0].clamp_min(TINY))
        above = flat * (y[-1] / x[-1].clamp_min(TINY))
        out = torch.where(flat < x[0], below, torch.where(flat > x[-1], above, inside))
        return out.reshape(sigma.shape)


@dataclass
class Calibration:
    """Per-quantity calibrations; quantities absent or ``method="none"`` pass σ through unchanged."""

    quantities: dict[str, QuantityCalibration] = field(default_factory=dict)

    def apply(self, quantity: str, sigma: torch.Tensor) -> torch.Tensor:
        cal = self.quantities.get(quantity)
        return sigma if cal is None else cal.apply(sigma)

    def fitted(self, quantity: str) -> bool:
        cal = self.quantities.get(quantity)
        return cal is not None and cal.fitted

    def to_json(self) -> dict[str, Any]:
        return {name: cal.to_json() for name, cal in sorted(self.quantities.items())}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Calibration:
        return cls({name: QuantityCalibration.from_json(value) for name, value in (data or {}).items()})


def _squared_error_and_variance(quantity: str, residuals: np.ndarray, sigma: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-sample squared error and the raw σ it should match, plus the number of Gaussian dimensions.

    Forces: one sample per atom, ``|r|²`` against the norm-convention σ (3 dimensions).  Energy: one per
    structure.  Stress: one per tensor component.
    """
    residuals, sigma = np.asarray(residuals, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if quantity == "forces":
        return np.sum(residuals.reshape(-1, 3) ** 2, axis=1), sigma.reshape(-1), 3
    return residuals.reshape(-1) ** 2, sigma.reshape(-1), 1


def fit_quantity(quantity: str, residuals: np.ndarray, sigma: np.ndarray, n_structures: int,
                 method: str = "scale", min_structures: int = MIN_STRUCTURES) -> QuantityCalibration:
    """Fit the calibration of one quantity from residuals (reference − prediction) and raw σ.

    ``residuals`` and ``sigma`` follow the output shapes: forces ``[n, 3]`` and ``[n]``; energy ``[n]`` and
    ``[n]``; stress ``[n, 3, 3]`` and ``[n, 3, 3]``.  Raises :class:`CalibrationError` below
    ``min_structures`` structures or for unusable σ.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if n_structures < min_structures:
        raise CalibrationError(f"{quantity}: calibration needs at least {min_structures} labelled held-out "
                               f"structures, got {n_structures}; give a larger validation set")
    sq, raw, dims = _squared_error_and_variance(quantity, residuals, sigma)
    if sq.shape != raw.shape:
        raise CalibrationError(f"{quantity}: {sq.size} residuals but {raw.size} σ values")
    if not (np.all(np.isfinite(raw)) and np.all(np.isfinite(sq))):
        raise CalibrationError(f"{quantity}: non-finite σ or residuals in the calibration set")
    positive = raw > TINY
    if positive.sum() < min_structures:
        raise CalibrationError(f"{quantity}: raw σ is zero for (almost) every calibration sample; nothing to scale")
    sq, raw = sq[positive], raw[positive]
    # Gaussian MLE of s in σ = s·σ_raw: s² = mean(|r|² / σ_raw²) (σ_raw already sums the `dims` components)
    scale = math.sqrt(max(float(np.mean(sq / raw**2)), TINY))
    cal = QuantityCalibration(method="scale", scale=scale, n_structures=int(n_structures), n_samples=int(sq.size))
    if method == "scale":
        return cal
    order = np.argsort(raw, kind="stable")
    raw, sq = raw[order], sq[order]
    n_bins = int(min(MAX_KNOTS, max(2, sq.size // 20)))
    edges = np.linspace(0, sq.size, n_bins + 1).astype(int)
    bx = np.array([raw[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    by = np.array([sq[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])
    bw = np.diff(edges).astype(np.float64)
    variance = np.maximum(_pav(by, bw), TINY)
    keep = np.concatenate([[True], np.diff(bx) > TINY * max(1.0, float(bx[-1]))])
    cal.method = "isotonic"
    cal.knots_x = bx[keep].tolist()
    cal.knots_y = np.sqrt(variance[keep]).tolist()
    if len(cal.knots_x) < 2:  # every raw σ equal: isotonic degenerates to a scale
        cal.method, cal.knots_x, cal.knots_y = "scale", [], []
    return cal
