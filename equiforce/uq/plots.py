"""PNG plots of uncertainty quality: the calibration curve and error vs σ (matplotlib Figure API, no pyplot)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from equiforce.uq.metrics import calibration_curve, force_arrays, miscalibration_area
from equiforce.uq.predict import UQPredictions
from equiforce.utils.atomic_io import atomic_write


def _panels(pred: UQPredictions) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(label, residuals, per-component σ, unit) for forces (components) and energy (structures)."""
    panels = []
    forces = force_arrays(pred)
    if forces["error"].size:
        comp = np.repeat(forces["sigma"][:, None] / math.sqrt(3.0), 3, axis=1)
        panels.append(("force components", forces["residual"], comp, "eV/Å"))
    if pred.has_energy.any():
        has = pred.has_energy
        panels.append(("energy", (pred.energy_ref - pred.energy_pred)[has], pred.energy_sigma[has], "eV"))
    return panels


def _save(fig, path: str | os.PathLike, axes, any_panel: bool, title: str | None) -> Path:
    if not any_panel:
        axes[0].text(0.5, 0.5, "no labelled data", ha="center", va="center")
        axes[0].set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return Path(path)


def calibration_plot(pred: UQPredictions, path: str | os.PathLike, title: str | None = None) -> Path:
    """Observed vs expected share of errors inside the Gaussian central intervals; the diagonal is perfect."""
    from matplotlib.figure import Figure

    panels = _panels(pred)
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 4.2))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (label, residual, sigma, _) in zip(axes, panels):
        expected, observed = calibration_curve(residual, sigma)
        area = miscalibration_area(residual, sigma)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1)
        ax.fill_between(expected, expected, observed, alpha=0.25)
        ax.plot(expected, observed, lw=1.5)
        ax.set_title(f"{label}: miscalibration area {area:.3f}", fontsize=9)
        ax.set_xlabel("expected proportion in interval")
        ax.set_ylabel("observed proportion in interval")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    return _save(fig, path, axes, bool(panels), title)


def error_vs_sigma_plot(pred: UQPredictions, path: str | os.PathLike, title: str | None = None) -> Path:
    """|error| against σ (log–log), with the RMS error in σ bins; calibrated points follow the diagonal."""
    from matplotlib.figure import Figure

    panels = []
    forces = force_arrays(pred)
    if forces["error"].size:
        panels.append(("force per atom", forces["sigma"], forces["error"], "eV/Å"))
    if pred.has_energy.any():
        has = pred.has_energy
        panels.append(("energy per structure", pred.energy_sigma[has],
                       np.abs(pred.energy_ref - pred.energy_pred)[has], "eV"))
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 4.2))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (label, sigma, error, unit) in zip(axes, panels):
        keep = np.isfinite(sigma) & (sigma > 0) & np.isfinite(error)
        sigma, error = sigma[keep], np.maximum(error[keep], 1e-12)
        if not sigma.size:
            continue
        ax.scatter(sigma, error, s=4, alpha=0.4, edgecolors="none", label="samples")
        lo, hi = float(min(sigma.min(), error.min())), float(max(sigma.max(), error.max()))
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, label="|error| = σ")
        edges = np.quantile(sigma, np.linspace(0, 1, 11))
        centres, rms = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            inside = (sigma >= a) & (sigma <= b)
            if inside.any():
                centres.append(float(np.sqrt(np.mean(sigma[inside] ** 2))))
                rms.append(float(np.sqrt(np.mean(error[inside] ** 2))))
        ax.plot(centres, rms, "o-", color="C3", lw=1.5, ms=4, label="RMS error per σ bin")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted σ ({unit})")
        ax.set_ylabel(f"|error| ({unit})")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path, axes, bool(panels), title)
