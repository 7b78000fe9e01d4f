"""Batched FIRE: ASE's FIRE path step for step, the same minima as ASE's BFGS, cell relaxation."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.filters import UnitCellFilter
from ase.optimize import BFGS, FIRE

import equiforce
from equiforce.sim.relax import relax
from tests.conftest import make_model
from tests.sim_models import LennardJones, TorchCalculator, argon_fcc, single_thread  # noqa: F401


def test_fire_follows_ase_fire_with_the_calculator():
    model = make_model("L1-corr3")
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    reference = atoms.copy()
    reference.calc = equiforce.Calculator(model)
    FIRE(reference, logfile=None).run(fmax=1e-6, steps=12)
    mine = relax(model, atoms, fmax=1e-6, max_steps=12)
    np.testing.assert_allclose(mine.atoms[0].positions, reference.positions, atol=1e-9)


def test_fire_with_cell_follows_ase_unit_cell_filter():
    model = LennardJones()
    atoms = argon_fcc(1, a=5.0, rattle=0.1, seed=1)
    atoms.set_cell(atoms.cell @ np.array([[1.0, 0.05, 0.0], [0.0, 1.0, 0.02], [0.0, 0.0, 1.03]]), scale_atoms=True)
    reference = atoms.copy()
    reference.calc = TorchCalculator(model)
    FIRE(UnitCellFilter(reference, scalar_pressure=0.0), logfile=None).run(fmax=1e-8, steps=15)
    mine = relax(model, atoms, fmax=1e-8, max_steps=15, relax_cell=True)
    np.testing.assert_allclose(mine.atoms[0].cell.array, reference.cell.array, atol=1e-9)
    np.testing.assert_allclose(mine.atoms[0].positions, reference.positions, atol=1e-9)


def test_batched_fire_reaches_bfgs_minima():
    """LJ clusters of different sizes relaxed together land where ASE's BFGS puts each alone."""
    model = LennardJones()
    clusters = []
    for n, seed in ((4, 0), (7, 1), (10, 2)):
        rng = np.random.default_rng(seed)
        positions = []
        while len(positions) < n:  # random, not overlapping
            trial = rng.uniform(0, 2.2 * n ** (1 / 3), 3) * 3.0
            if all(np.linalg.norm(trial - p) > 3.3 for p in positions):
                positions.append(trial)
        clusters.append(Atoms(f"Ar{n}", positions=positions))
    result = relax(model, [c.copy() for c in clusters], fmax=3e-4, max_steps=2000)
    assert result.converged.all(), result.steps
    for b in range(len(clusters)):
        reference = result.atoms[b].copy()  # start BFGS from FIRE's answer perturbed: same basin
        reference.rattle(0.02, seed=b)
        reference.calc = TorchCalculator(model)
        BFGS(reference, logfile=None).run(fmax=1e-5, steps=500)
        assert result.energy[b] == pytest.approx(reference.get_potential_energy(), abs=1e-5)
        assert np.max(np.linalg.norm(reference.get_forces(), axis=1)) < 1e-5


def test_cell_relaxation_reaches_zero_stress_and_pressure():
    model = LennardJones()
    atoms = argon_fcc(1, a=5.6)
    result = relax(model, atoms, fmax=1e-5, max_steps=1000, relax_cell=True, hydrostatic=True)
    assert result.converged.all()
    relaxed = result.atoms[0]
    relaxed.calc = TorchCalculator(model)
    assert np.abs(relaxed.get_stress()).max() < 1e-5 * len(relaxed) / relaxed.get_volume() * 10
    squeezed = relax(model, argon_fcc(1, a=5.6), fmax=1e-5, max_steps=1000, relax_cell=True, hydrostatic=True,
                     scalar_pressure_bar=5000.0)
    assert squeezed.atoms[0].get_volume() < relaxed.get_volume()


def test_fixed_atoms_stay_put_and_the_rest_follows_ase_fire():
    """A slab's bottom layer under FixAtoms: held in place (ASE's FIRE with the same constraint takes the same
    path), and the constraint travels with the relaxed structures; a cell relaxation with it is refused."""
    from ase.constraints import FixAtoms

    model = LennardJones()
    atoms = argon_fcc(1, rattle=0.15, seed=4)
    atoms.pbc = False
    atoms.set_constraint(FixAtoms(indices=[0, 1]))
    ours = relax(model, atoms.copy(), fmax=0.01, max_steps=300)
    reference = atoms.copy()
    reference.calc = TorchCalculator(model)
    FIRE(reference, logfile=None).run(fmax=0.01, steps=300)
    np.testing.assert_allclose(ours.atoms[0].positions[:2], atoms.positions[:2], atol=0)
    np.testing.assert_allclose(ours.atoms[0].positions, reference.positions, atol=1e-8)
    assert isinstance(ours.atoms[0].constraints[0], FixAtoms)
    with pytest.raises(ValueError, match="relax_cell with fixed atoms"):
        periodic = argon_fcc(1, rattle=0.05)
        periodic.set_constraint(FixAtoms(indices=[0]))
        relax(model, periodic, relax_cell=True)


def test_constraints_the_engine_cannot_keep_are_refused_by_name():
    from ase.constraints import FixBondLength

    atoms = molecule("H2O")
    atoms.set_constraint(FixBondLength(0, 1))
    with pytest.raises(ValueError, match="constraint FixBondLengths? is not supported"):
        relax(make_model("L1-corr3"), atoms)
