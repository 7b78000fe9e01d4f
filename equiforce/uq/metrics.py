"""How good is σ: ranking (Spearman ρ), calibration (miscalibration area, curve) and NLL.

All functions take residuals ``r`` (reference − prediction) and σ of a Gaussian per component:
``r ~ N(0, σ²)``.  :func:`uq_report` turns :class:`~equiforce.uq.predict.UQPredictions` into the numbers
``equiforce eval --uq`` and ``benchmarks/uq.py`` report, with the force σ converted from the per-atom
norm convention (``forces_std``) to per-component (``forces_std / √3``) where a Gaussian per component
is needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import ndtri
from scipy.stats import spearmanr

from equiforce.uq.predict import UQPredictions

PROPORTIONS = np.linspace(0.0, 1.0, 101)


def spearman(sigma: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation of σ and |error|; nan with fewer than 3 samples or a constant input."""
    sigma, error = np.ravel(sigma), np.ravel(error)
    keep = np.isfinite(sigma) & np.isfinite(error)
    sigma, error = sigma[keep], error[keep]
    if sigma.size < 3 or np.ptp(sigma) == 0 or np.ptp(error) == 0:
        return float("nan")
    return float(spearmanr(sigma, error)[0])


def calibration_curve(residuals: np.ndarray, sigma: np.ndarray, proportions: np.ndarray = PROPORTIONS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Expected vs observed share of residuals inside the central Gaussian interval of each probability."""
    r, s = np.abs(np.ravel(residuals)), np.ravel(sigma)
    with np.errstate(divide="ignore", invalid="ignore"):  # σ = 0 with r = 0 (isolated atoms) is inside
        z = np.where((s == 0) & (r == 0), 0.0, r / s)
    z = z[~np.isnan(z)]
    half_width = ndtri(0.5 + 0.5 * np.clip(proportions, 0.0, 1.0))  # inf at p = 1
    observed = np.array([np.mean(z <= w) if z.size else np.nan for w in half_width])
    return proportions, observed


def miscalibration_area(residuals: np.ndarray, sigma: np.ndarray) -> float:
    """Area between the calibration curve and the diagonal (0: perfect, 0.5: worst)."""
    expected, observed = calibration_curve(residuals, sigma)
    return float(np.trapezoid(np.abs(observed - expected), expected))


def gaussian_nll(residuals: np.ndarray, sigma: np.ndarray) -> float:
    """Mean negative log-likelihood per component, ``½ log(2πσ²) + r²/(2σ²)``."""
    r, s = np.ravel(residuals), np.ravel(sigma)
    keep = np.isfinite(r) & np.isfinite(s) & (s > 0)
    r, s = r[keep], s[keep]
    return float(np.mean(0.5 * np.log(2 * math.pi * s**2) + 0.5 * (r / s) ** 2)) if r.size else float("nan")


def per_structure_rms(values: np.ndarray, structure: np.ndarray, n_structures: int) -> np.ndarray:
    """Root mean square of per-atom values within each structure (nan for structures without atoms)."""
    counts = np.bincount(structure, minlength=n_structures).astype(np.float64)
    sums = np.bincount(structure, weights=values**2, minlength=n_structures)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt(sums / counts)


def force_arrays(pred: UQPredictions) -> dict[str, np.ndarray]:
    """Labelled atoms' residual vectors, |r|, σ (norm convention), and per-structure RMS |r| and σ."""
    mask = pred.has_forces & np.isfinite(pred.forces_sigma)
    residual = (pred.forces_ref - pred.forces_pred)[mask]
    error = np.linalg.norm(residual, axis=1)
    sigma = pred.forces_sigma[mask]
    structure = pred.structure[mask]
    labelled = np.unique(structure)
    struct_error = per_structure_rms(error, structure, pred.n_structures)[labelled]
    struct_sigma = per_structure_rms(sigma, structure, pred.n_structures)[labelled]
    return {"residual": residual, "error": error, "sigma": sigma, "struct_error": struct_error,
            "struct_sigma": struct_sigma}


def uq_report(pred: UQPredictions) -> dict[str, Any]:
    """The metrics of ``equiforce eval --uq`` (eV, eV/Å; σ calibrated as the model gives it).

    Force-based entries need force labels.  ``spearman_struct``, ``miscalibration_area`` and ``nll`` are
    force-based when the data has force labels and energy-based otherwise (``basis`` says which); the
    energy-based ones are always given with an ``energy_`` prefix.  ``mean_force_sigma`` and
    ``mean_force_error`` are means over atoms of σ (norm convention) and of the error vector's length.
    """
    out: dict[str, Any] = {"n_structures": pred.n_structures, "n_atoms": int(pred.numbers.size)}
    all_sigma = pred.forces_sigma[np.isfinite(pred.forces_sigma)]
    out["mean_force_sigma"] = float(all_sigma.mean()) if all_sigma.size else None
    has_e = pred.has_energy
    if has_e.any():
        r = (pred.energy_ref - pred.energy_pred)[has_e]
        s = pred.energy_sigma[has_e]
        out.update(energy_spearman=spearman(s, np.abs(r)), energy_miscalibration_area=miscalibration_area(r, s),
                   energy_nll=gaussian_nll(r, s), energy_mae=float(np.mean(np.abs(r))),
                   mean_energy_sigma=float(np.mean(s)), n_energy=int(has_e.sum()))
    forces = force_arrays(pred)
    if forces["error"].size:
        comp_sigma = np.repeat(forces["sigma"][:, None] / math.sqrt(3.0), 3, axis=1)
        out.update(
            basis="forces",
            spearman_struct=spearman(forces["struct_sigma"], forces["struct_error"]),
            spearman_atom=spearman(forces["sigma"], forces["error"]),
            miscalibration_area=miscalibration_area(forces["residual"], comp_sigma),
            nll=gaussian_nll(forces["residual"], comp_sigma),
            mean_force_error=float(forces["error"].mean()),
            force_mae=float(np.mean(np.abs(forces["residual"]))),
            mean_force_sigma_labelled=float(forces["sigma"].mean()),
            n_force_structures=int(forces["struct_error"].size))
    elif has_e.any():
        out.update(basis="energy", spearman_struct=out["energy_spearman"], spearman_atom=None,
                   miscalibration_area=out["energy_miscalibration_area"], nll=out["energy_nll"],
                   mean_force_error=None)
    if pred.stress and pred.stress["has"].any():
        has = pred.stress["has"]
        r, s = (pred.stress["ref"] - pred.stress["pred"])[has], pred.stress["sigma"][has]
        out.update(stress_miscalibration_area=miscalibration_area(r, s), stress_nll=gaussian_nll(r, s),
                   stress_spearman=spearman(np.sqrt((s**2).mean((1, 2))), np.sqrt((r**2).mean((1, 2)))))
    return out
