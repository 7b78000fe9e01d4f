"""Whole potentials assembled from :mod:`equiforce.nn`, their specs, priors and model files."""

from equiforce.models.potential import Potential, build_model
from equiforce.models.spec import ModelSpec

__all__ = ["ModelSpec", "Potential", "build_model"]
