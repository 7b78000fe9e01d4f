"""Rattled ethanols labelled by ASE's EMT (which knows H, C and O): smooth, consistent labels for benchmark
smoke tests that need a real-looking molecule without a quantum code."""

from __future__ import annotations

from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator


def emt_ethanols(count: int, rattle: float = 0.05, seed: int = 0) -> list[Atoms]:
    """``count`` ethanols rattled by ``rattle`` Å (seeds ``seed``, ``seed + 1``, ...), with EMT energy and forces."""
    frames = []
    for n in range(count):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(rattle, seed=seed + n)
        atoms.calc = EMT()
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    return frames
