"""The on-the-fly EMT Cu/Ni demo data: reproducible, complete, and labelled consistently with EMT."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT

from equiforce.demo.emt_data import generate_cu_ni_dataset, generate_cu_ni_test_set, label

N_SMALL = 20


@pytest.fixture(scope="module")
def small_set():
    return generate_cu_ni_dataset(n_configs=N_SMALL, seed=7)


def test_deterministic_for_a_seed(small_set):
    again = generate_cu_ni_dataset(n_configs=N_SMALL, seed=7)
    assert len(again) == len(small_set) == N_SMALL
    for a, b in zip(small_set, again):
        assert a.config_type == b.config_type
        np.testing.assert_array_equal(a.numbers, b.numbers)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell, b.cell)
        assert a.energy == b.energy
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_array_equal(a.stress, b.stress)


def test_different_seed_gives_different_data(small_set):
    other = generate_cu_ni_test_set(n_configs=3)
    assert not np.allclose(other[0].positions, small_set[0].positions)


def test_contents_and_metadata(small_set):
    assert {c.config_type for c in small_set} == {"bulk", "surface", "vacancy"}
    assert [c.frame for c in small_set] == list(range(N_SMALL))
    assert all(c.source == "emt:cu-ni" for c in small_set)
    assert set(np.concatenate([c.numbers for c in small_set]).tolist()) <= {28, 29}
    # MD frames are not just copies of the ideal structure
    temps = {c.info["temperature_K"] for c in small_set}
    assert 0.0 in temps and len(temps) > 1


def test_labels_finite_and_shaped(small_set):
    for c in small_set:
        assert np.isfinite(c.energy)
        assert c.forces.shape == (c.n_atoms, 3) and np.isfinite(c.forces).all()
        if c.pbc.all():
            assert c.stress is not None and c.stress.shape == (3, 3) and np.isfinite(c.stress).all()
            np.testing.assert_allclose(c.stress, c.stress.T, atol=1e-12)


def test_bulk_forces_sum_to_zero(small_set):
    bulk = [c for c in small_set if c.config_type in ("bulk", "vacancy")]
    assert bulk
    for c in bulk:
        np.testing.assert_allclose(c.forces.sum(axis=0), 0.0, atol=1e-8)


def test_labels_match_fresh_emt(small_set):
    calc = EMT()
    for c in (small_set[0], small_set[len(small_set) // 2], small_set[-1]):
        atoms = c.to_atoms()
        atoms.calc = calc
        assert atoms.get_potential_energy() == pytest.approx(c.energy, abs=1e-9)
        np.testing.assert_allclose(atoms.get_forces(), c.forces, atol=1e-9)
        np.testing.assert_allclose(atoms.get_stress(voigt=False), c.stress, atol=1e-10)


def test_label_copies_arrays():
    """A labelled configuration must not change when the source atoms move on (e.g. next MD step)."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.rattle(0.05, seed=1)
    c = label(atoms, EMT())
    before = c.positions.copy()
    atoms.positions += 0.1
    np.testing.assert_array_equal(c.positions, before)
