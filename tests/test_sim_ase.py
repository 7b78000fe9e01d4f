"""The ASE path: the calculator in ASE's Langevin MD, climbing-image NEB, cell filters, and periodic Hessians."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.mep import NEB, NEBTools
from ase.optimize import FIRE

import equiforce
from equiforce.sim.hessian import hessian
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401


def test_ase_langevin_md_with_calculator():
    model = make_model("L1-corr3")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = equiforce.Calculator(model)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.02, rng=np.random.default_rng(0))
    dyn.run(10)
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_temperature() > 0


def _water(angle_deg: float) -> Atoms:
    half = np.radians(angle_deg) / 2
    return Atoms("OH2", positions=[[0, 0, 0], [0.96 * np.sin(half), 0.96 * np.cos(half), 0],
                                   [-0.96 * np.sin(half), 0.96 * np.cos(half), 0]])


def _band(model, n_images: int = 5):
    start, end = _water(104.5), _water(360 - 104.5)  # mirror images: equal energies by symmetry
    images = [start] + [start.copy() for _ in range(n_images)] + [end]
    neb = NEB(images, climb=True, method="improvedtangent")
    neb.interpolate()
    for image in images:
        image.calc = equiforce.Calculator(model)
    return neb, images


def test_climbing_image_neb_with_calculator():
    """Water bent up → bent down through linear: CI-NEB with the calculator converges; the climbing image
    is a maximum along the band with no force along the path."""
    for seed in range(20):  # a random model with a barrier on this path (the landscape is arbitrary)
        model = make_model("L1-corr3", seed=seed)
        neb, images = _band(model)
        energies = np.array([image.get_potential_energy() for image in images])
        if 0 < int(np.argmax(energies)) < len(images) - 1 and energies.max() - energies[0] > 0.05:
            break
    else:
        pytest.skip("no random model with a barrier on this path")
    assert FIRE(neb, logfile=None).run(fmax=0.01, steps=600)
    energies = np.array([image.get_potential_energy() for image in images])
    climbing = 1 + int(np.argmax(energies[1:-1]))  # ASE climbs with the highest interior image
    assert energies[climbing] >= max(energies[climbing - 1], energies[climbing + 1])
    tangent = images[climbing + 1].positions - images[climbing - 1].positions
    tangent /= np.linalg.norm(tangent)
    assert abs(float(np.vdot(images[climbing].get_forces(), tangent))) < 0.05  # a maximum along the path
    barrier, _ = NEBTools(images).get_barrier(fit=False)
    assert barrier == pytest.approx(energies.max() - energies[0], abs=1e-8)


def test_frechet_cell_filter_relaxation_with_calculator():
    model = make_model("L1-corr3")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = equiforce.Calculator(model)
    start = atoms.get_potential_energy()
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.05, steps=6)  # scipy expm: slow per step
    assert atoms.get_potential_energy() <= start


def test_periodic_hessian_matches_finite_differences():
    model = make_model("L2-corr2-zbl")
    atoms = bulk("Cu", "fcc", a=3.6)  # one atom, many periodic images within the cutoff
    atoms = atoms.repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    h = hessian(model, atoms)
    atoms.calc = equiforce.Calculator(model)
    eps = 1e-5
    fd = np.zeros_like(h)
    for k in range(h.shape[0]):
        a, x = divmod(k, 3)
        plus, minus = atoms.copy(), atoms.copy()
        plus.calc = minus.calc = atoms.calc
        plus.positions[a, x] += eps
        minus.positions[a, x] -= eps
        fd[k] = -(plus.get_forces() - minus.get_forces()).reshape(-1) / (2 * eps)
    np.testing.assert_allclose(h, 0.5 * (fd + fd.T), atol=1e-6 * max(1.0, np.abs(h).max()))
    # translations are zero modes of a periodic crystal: the Hessian's rows sum to zero per direction
    np.testing.assert_allclose(h.reshape(2, 3, 2, 3).sum(2), 0.0, atol=1e-8 * max(1.0, np.abs(h).max()))
