"""``equiforce eval --uq``: σ-quality metrics and plots of a model on labelled structures."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from equiforce.data.structure import Configuration
from equiforce.errors import EquiforceError
from equiforce.uq.metrics import uq_report
from equiforce.uq.plots import calibration_plot, error_vs_sigma_plot
from equiforce.uq.predict import UQPredictions, has_uncertainty, predict

CALIBRATION_PNG = "calibration.png"
ERROR_VS_SIGMA_PNG = "error_vs_sigma.png"


def require_uncertainty(model: torch.nn.Module) -> None:
    """Refuse a model without σ before any pass over the data."""
    if not has_uncertainty(model):
        raise EquiforceError("--uq needs a model with uncertainty (an ensemble or heads file from "
                             "`equiforce train-uq`); this model file carries none")


def evaluate_uncertainty(model: torch.nn.Module, configs: Sequence[Configuration], out_dir: str | os.PathLike,
                         batch_size: int = 16, device: str | torch.device = "cpu",
                         title: str | None = None, predictions: UQPredictions | None = None) -> dict[str, Any]:
    """Metrics of :func:`equiforce.uq.metrics.uq_report`, plus the calibration and error-vs-σ PNGs.

    ``predictions`` (e.g. from a :class:`~equiforce.uq.predict.UQCollector` fed by ``evaluate``'s pass) are
    used as they are; without them the model is run over ``configs`` here.
    """
    from equiforce.evaluate import as_graphs

    require_uncertainty(model)
    pred = predictions if predictions is not None else predict(model, as_graphs(model, configs),
                                                               batch_size=batch_size, device=device)
    out = Path(out_dir)
    metrics = uq_report(pred)
    metrics["plots"] = {"calibration": str(calibration_plot(pred, out / CALIBRATION_PNG, title)),
                        "error_vs_sigma": str(error_vs_sigma_plot(pred, out / ERROR_VS_SIGMA_PNG, title))}
    metrics["calibration"] = model.calibration.to_json()
    return metrics


def uq_table(title: str, metrics: dict[str, Any]):
    """A rich table of the headline numbers."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("basis of struct/area/NLL", "basis", "{}"), ("Spearman ρ per structure", "spearman_struct", "{:.3f}"),
            ("Spearman ρ per atom (forces)", "spearman_atom", "{:.3f}"),
            ("miscalibration area", "miscalibration_area", "{:.3f}"), ("NLL per component", "nll", "{:.3f}"),
            ("mean force σ (eV/Å)", "mean_force_sigma", "{:.4f}"),
            ("mean |force error| (eV/Å)", "mean_force_error", "{:.4f}"),
            ("energy Spearman ρ", "energy_spearman", "{:.3f}"),
            ("energy miscalibration area", "energy_miscalibration_area", "{:.3f}"),
            ("mean energy σ (eV)", "mean_energy_sigma", "{:.4f}"), ("energy MAE (eV)", "energy_mae", "{:.4f}")]
    for label, key, fmt in rows:
        value = metrics.get(key)
        if value is not None:
            table.add_row(label, fmt.format(value))
    return table
