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
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=300, friction=0.02, fixcm=False, rng=np.random.default_rng(0))
    dyn.run(10)
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_temperature() > 0


def _gate_model():
    """A model whose landscape is known: zero readouts, so the energy is Σ_i shift·(1 - exp(-n_i)) with the
    smooth coordination n_i — an atom squeezing between two others crosses a barrier at the midpoint."""
    import torch

    from equiforce.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec(elements=[1, 29], channels=4, max_l=1, sh_lmax=2, correlation=2,
                                  radial_mlp=[8], cutoff=4.0, energy_shift=1.0))
    with torch.no_grad():
        for readout in model.readouts:
            for p in readout.parameters():
                p.zero_()
    return model.eval()


def _band(model, n_images: int = 7):
    gate = [[0.0, 1.3, 0.0], [0.0, -1.3, 0.0]]
    start = Atoms("HCu2", positions=[[-3.0, 0.4, 0.0], *gate])
    end = Atoms("HCu2", positions=[[3.0, -0.4, 0.0], *gate])
    from ase.constraints import FixAtoms

    images = [start] + [start.copy() for _ in range(n_images)] + [end]
    for image in images:
        image.set_constraint(FixAtoms(indices=[1, 2]))
    neb = NEB(images, climb=True, method="improvedtangent")
    neb.interpolate()
    for image in images:
        image.calc = equiforce.Calculator(model)
    return neb, images


def test_climbing_image_neb_with_calculator():
    """H squeezing through a Cu2 gate: CI-NEB with the calculator converges, the climbing image sits at the
    saddle between the gate atoms (a maximum along the band, no force along the path)."""
    neb, images = _band(_gate_model())
    assert FIRE(neb, logfile=None).run(fmax=0.01, steps=600)
    energies = np.array([image.get_potential_energy() for image in images])
    climbing = 1 + int(np.argmax(energies[1:-1]))
    assert climbing == len(images) // 2  # symmetric path: the middle image climbs
    assert abs(images[climbing].positions[0, 0]) < 0.05  # ... to the midpoint of the gate
    assert energies[climbing] > max(energies[climbing - 1], energies[climbing + 1])
    tangent = images[climbing + 1].positions - images[climbing - 1].positions
    tangent /= np.linalg.norm(tangent)
    assert abs(float(np.vdot(images[climbing].get_forces(), tangent))) < 0.02
    barrier, _ = NEBTools(images).get_barrier(fit=False)
    assert barrier == pytest.approx(energies.max() - energies[0], abs=1e-8) and barrier > 0.1


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
