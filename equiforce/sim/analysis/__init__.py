"""Analyses of trajectories: diffusion (MSD, Arrhenius), structure (g(r), h(r), bonds), spectra (VDOS)."""

from equiforce.sim.analysis.spectra import VDOS, vibrational_dos
from equiforce.sim.analysis.structure import (
    RDF,
    BondCriterion,
    distance_histogram,
    histogram_distance,
    radial_distribution,
)
from equiforce.sim.analysis.transport import (
    ArrheniusFit,
    Diffusion,
    arrhenius_fit,
    diffusion_coefficient,
    mean_squared_displacement,
)

__all__ = ["RDF", "VDOS", "ArrheniusFit", "BondCriterion", "Diffusion", "arrhenius_fit", "diffusion_coefficient",
           "distance_histogram", "histogram_distance", "mean_squared_displacement", "radial_distribution",
           "vibrational_dos"]
