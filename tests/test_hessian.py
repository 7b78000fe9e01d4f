"""Analytic Hessian equals finite differences of the forces; frequencies agree with ase.vibrations."""

from __future__ import annotations

import numpy as np
from ase.build import molecule
from ase.vibrations import Vibrations

import equiforce
from equiforce.sim.hessian import hessian, vibrational_frequencies
from tests.conftest import make_model


def test_hessian_matches_finite_differences(tmp_path):
    model = make_model("L1-corr3")
    atoms = molecule("H2O")
    atoms.rattle(0.05, seed=0)
    h = hessian(model, atoms)
    assert h.shape == (9, 9)
    np.testing.assert_allclose(h, h.T, atol=1e-10)
    atoms.calc = equiforce.Calculator(model)
    eps = 1e-5
    fd = np.zeros((9, 9))
    for k in range(9):
        a, x = divmod(k, 3)
        plus, minus = atoms.copy(), atoms.copy()
        plus.calc = minus.calc = atoms.calc
        plus.positions[a, x] += eps
        f_plus = plus.get_forces().reshape(-1)
        minus.positions[a, x] -= eps
        f_minus = minus.get_forces().reshape(-1)
        fd[k] = -(f_plus - f_minus) / (2 * eps)
    np.testing.assert_allclose(h, 0.5 * (fd + fd.T), atol=1e-6 * max(1.0, np.abs(h).max()))

    freqs = np.sort(vibrational_frequencies(model, atoms))
    vib = Vibrations(atoms, name=str(tmp_path / "vib"), delta=1e-4, nfree=2)
    vib.run()
    ase_freqs = np.sort(np.real(vib.get_frequencies()) - np.imag(vib.get_frequencies()))
    np.testing.assert_allclose(freqs[-3:], ase_freqs[-3:], rtol=1e-3, atol=1.0)
    path = equiforce.save_model(model, tmp_path / "m.eqf")  # a model file does as well as the model
    np.testing.assert_allclose(hessian(path, atoms), h, rtol=0, atol=1e-12)
    np.testing.assert_allclose(vibrational_frequencies(str(path), atoms), vibrational_frequencies(model, atoms))


def test_hessian_with_edge_chunks_is_unchanged():
    """Row after row of backward passes through checkpointed chunks (each recomputed) give the same Hessian."""
    model = make_model("L1-corr3")
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    reference = hessian(model, atoms)
    model.set_edge_chunk(5)
    try:
        np.testing.assert_allclose(hessian(model, atoms), reference, rtol=0, atol=1e-10)
    finally:
        model.set_edge_chunk("auto")


def test_an_ensembles_hessian_is_the_mean_of_its_members():
    from tests.uq_helpers import ensemble

    model = ensemble(3)
    atoms = molecule("H2O")
    atoms.rattle(0.02, seed=1)
    members = [hessian(model.member(m), atoms) for m in range(3)]
    np.testing.assert_allclose(hessian(model, atoms), np.mean(members, axis=0), atol=1e-12)


def test_a_float32_calculator_leaves_the_callers_float64_model_alone():
    """Module.to works in place: the calculator must take a copy, not change the model its caller (and every other
    calculator on it) still uses."""
    import torch

    model = make_model("L1-corr3")
    atoms = molecule("CH3CH2OH")
    atoms.calc = equiforce.Calculator(model)
    before = atoms.get_potential_energy()
    other = atoms.copy()
    other.calc = equiforce.Calculator(model, dtype="float32")
    assert abs(other.get_potential_energy() - before) < 1e-3
    assert next(model.parameters()).dtype == torch.float64
    atoms.rattle(0.01, seed=2)  # the first calculator still works, in float64
    assert atoms.get_potential_energy() != before
