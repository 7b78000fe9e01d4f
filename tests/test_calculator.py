"""The ASE calculator: properties, consistency with the model, MD and optimisation, element errors."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_stress
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

import equiforce
from equiforce.errors import UnknownElementError
from tests.conftest import make_model


@pytest.fixture
def calc(tmp_path):
    path = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    return equiforce.Calculator(path, device="cpu", dtype="float64")


def test_properties_periodic(calc):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.numbers[:2] = 28
    atoms.rattle(0.05, seed=0)
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    assert energy == pytest.approx(atoms.get_potential_energies().sum(), rel=1e-12)
    assert atoms.get_forces().shape == (len(atoms), 3)
    assert atoms.get_stress().shape == (6,)
    assert atoms.get_stress(voigt=False).shape == (3, 3)
    assert calc.results["free_energy"] == energy


def test_stress_matches_numerical(calc):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = calc
    numerical = calculate_numerical_stress(atoms, eps=1e-5, force_consistent=False)
    np.testing.assert_allclose(atoms.get_stress(), numerical, atol=1e-7)


def test_molecule_has_no_stress(calc):
    atoms = molecule("CH4")
    atoms.calc = calc
    atoms.get_forces()
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()


def test_unknown_element_is_named(calc):
    atoms = Atoms("CuAu", positions=[[0, 0, 0], [2.5, 0, 0]])
    atoms.calc = calc
    with pytest.raises(UnknownElementError, match=r"Au \(Z=79\)"):
        atoms.get_potential_energy()


def test_nve_md_conserves_energy(calc):
    """Velocity Verlet with exact forces: the energy error is O(dt²), so halving dt divides it by ~4.

    (A random model has huge forces, so an absolute tolerance says little; forces that were not the exact
    gradient of the energy would leave a drift that does not shrink with dt.)"""

    def max_error(dt_fs: float) -> float:
        atoms = molecule("CH3CH2OH")
        atoms.calc = calc
        start = atoms.get_total_energy()
        errors = []
        dyn = VelocityVerlet(atoms, dt_fs * units.fs)
        dyn.attach(lambda: errors.append(abs(atoms.get_total_energy() - start)), interval=1)
        dyn.run(int(round(2.0 / dt_fs)))
        return max(errors)

    coarse, fine = max_error(0.1), max_error(0.05)
    assert coarse < 1e-2
    assert 3.5 < coarse / fine < 4.5


def test_optimizer_lowers_energy(calc):
    # an untrained model has no meaningful minimum; check the optimiser gets consistent forces
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc
    start = atoms.get_potential_energy()
    BFGS(atoms, logfile=None, maxstep=0.01).run(fmax=1e-3, steps=5)
    assert atoms.get_potential_energy() < start


def test_float32_calculator(tmp_path):
    model = make_model("L1-corr3")
    calc32 = equiforce.Calculator(model, dtype="float32")
    atoms = molecule("CH3CH2OH")
    atoms.calc = calc32
    assert np.isfinite(atoms.get_potential_energy())
