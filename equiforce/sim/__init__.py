"""Simulation: the ASE calculator (batched MD, relaxations and analyses build on it)."""

from equiforce.sim.calculator import Calculator

__all__ = ["Calculator"]
