"""Simulation: the ASE calculator, the native batched MD engine, FIRE relaxation and analyses."""

from equiforce.sim.calculator import Calculator
from equiforce.sim.md import MDResult, MolecularDynamics, run_md
from equiforce.sim.relax import relax
from equiforce.sim.state import SimState

__all__ = ["Calculator", "MDResult", "MolecularDynamics", "SimState", "relax", "run_md"]
