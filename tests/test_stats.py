"""E0 fitting, normalisation statistics and the train/validation split."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from ase.build import bulk

from equiforce.data.graph import config_to_graph
from equiforce.data.stats import dataset_statistics, fit_e0s, split_indices
from equiforce.data.structure import Configuration
from equiforce.errors import DataError

TRUE_E0 = {1: -13.6, 6: -1029.8, 8: -2041.9}


def synthetic(rng: np.random.Generator, n: int, e0s: dict[int, float], noise: float = 1e-6) -> list[Configuration]:
    """Random molecules whose energy is exactly Σ n_e E0_e (+ tiny noise)."""
    configs = []
    elements = sorted(e0s)
    for k in range(n):
        numbers = rng.choice(elements, size=rng.integers(2, 9))
        positions = rng.uniform(0, 10, (len(numbers), 3))
        energy = sum(e0s[int(z)] for z in numbers) + rng.normal(0, noise)
        configs.append(Configuration(numbers=numbers, positions=positions, energy=energy, frame=k))
    return configs


def test_least_squares_recovers_e0s():
    configs = synthetic(np.random.default_rng(0), 30, TRUE_E0)
    e0s = fit_e0s(configs, [1, 6, 8])
    assert list(e0s) == [1, 6, 8]
    for z, value in TRUE_E0.items():
        assert e0s[z] == pytest.approx(value, abs=1e-4)
        assert type(e0s[z]) is float


def test_isolated_atoms_take_precedence():
    rng = np.random.default_rng(1)
    configs = synthetic(rng, 20, TRUE_E0)
    # isolated H disagrees with the bulk fit on purpose: the isolated value must win, C and O are still fitted
    configs.append(Configuration(numbers=[1], positions=[[0, 0, 0]], energy=-13.0))
    # a periodic single atom is isolated only when labelled so
    configs.append(Configuration(numbers=[8], positions=[[0, 0, 0]], cell=np.eye(3) * 20, pbc=True,
                                 energy=-2000.0, config_type="IsolatedAtom"))
    e0s = fit_e0s(configs, [1, 6, 8])
    assert e0s[1] == -13.0
    assert e0s[8] == -2000.0
    # C absorbs the H/O mismatch in least squares; check it is the fit given the fixed values
    counts = np.array([[np.sum(c.numbers == z) for z in (1, 6, 8)] for c in configs[:20]])
    energies = np.array([c.energy for c in configs[:20]])
    residual = energies - counts[:, 0] * -13.0 - counts[:, 2] * -2000.0
    expected = float(counts[:, 1] @ residual / (counts[:, 1] @ counts[:, 1]))
    assert e0s[6] == pytest.approx(expected, rel=1e-9)


def test_absent_element_gets_zero_with_warning():
    configs = synthetic(np.random.default_rng(2), 10, {1: -13.6, 8: -2041.9})
    with pytest.warns(UserWarning, match=r"\[29\]"):
        e0s = fit_e0s(configs, [1, 8, 29])
    assert e0s[29] == 0.0
    assert e0s[8] == pytest.approx(-2041.9, abs=1e-4)


def test_only_isolated_atoms_no_warning():
    configs = [Configuration(numbers=[z], positions=[[0, 0, 0]], energy=e) for z, e in TRUE_E0.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_e0s(configs, [1, 6, 8]) == TRUE_E0


def test_underdetermined_composition_warns():
    # every configuration is ethanol-like C2H6O: the split between elements is not determined
    configs = [Configuration(numbers=[6, 6, 8] + [1] * 6, positions=np.random.default_rng(k).uniform(0, 5, (9, 3)),
                             energy=-4200.0 + k) for k in range(4)]
    with pytest.warns(UserWarning, match="not uniquely determined"):
        e0s = fit_e0s(configs, [1, 6, 8])
    assert 6 * e0s[1] + 2 * e0s[6] + e0s[8] == pytest.approx(-4198.5)


def test_unknown_element_is_a_data_error():
    configs = [Configuration(numbers=[1, 29], positions=[[0, 0, 0], [2, 0, 0]], energy=-1.0, source="x.xyz",
                             frame=3)]
    with pytest.raises(DataError, match="x.xyz, frame 3"):
        fit_e0s(configs, [1])


def test_dataset_statistics_by_hand():
    # H2 with 1.0 Å bond and a 3-atom chain 0-1-2 with 1.5 Å spacing, cutoff 2.0:
    # edges 2 + 4 = 6, atoms 2 + 3 = 5
    h2 = Configuration(numbers=[1, 1], positions=[[0, 0, 0], [1, 0, 0]], energy=-27.0,
                       forces=[[1.0, 0, 0], [-1.0, 0, 0]])
    chain = Configuration(numbers=[1, 8, 1], positions=[[0, 0, 0], [1.5, 0, 0], [3.0, 0, 0]], energy=-33.0,
                          forces=[[0, 2.0, 0], [0, 0, 0], [0, -2.0, 0]])
    unlabelled = Configuration(numbers=[8], positions=[[0, 0, 0]])
    e0s = {1: -13.0, 8: -5.0}
    graphs = [config_to_graph(c, cutoff=2.0) for c in (h2, chain, unlabelled)]
    stats = dataset_statistics(graphs, e0s)
    assert stats["avg_num_neighbors"] == pytest.approx(6 / 6)
    # forces only from h2 and chain: squares sum 1+1+4+4 = 10 over 15 components
    assert stats["force_rms"] == pytest.approx(np.sqrt(10 / 15))
    # (E - ΣE0)/n: h2 (-27 + 26)/2 = -0.5; chain (-33 + 31)/3 = -2/3
    per_atom = np.array([-0.5, -2 / 3])
    assert stats["energy_shift"] == pytest.approx(per_atom.mean())
    assert stats["energy_per_atom_std"] == pytest.approx(per_atom.std())
    assert stats["n_configs"] == 3 and stats["n_atoms"] == 6
    assert all(type(v) in (float, int) for v in stats.values())


def test_dataset_statistics_without_forces_periodic():
    cu = bulk("Cu", "fcc", a=3.6)  # primitive fcc: 12 nearest neighbours at a/√2 ≈ 2.55 Å
    config = Configuration.from_atoms(cu, energy=-3.0)
    stats = dataset_statistics([config_to_graph(config, cutoff=3.0)], {29: -1.0})
    assert stats["avg_num_neighbors"] == pytest.approx(12.0)
    assert stats["force_rms"] == 1.0
    assert stats["energy_shift"] == pytest.approx(-2.0)
    with pytest.raises(DataError, match="29"):
        dataset_statistics([config_to_graph(config, cutoff=3.0)], {1: 0.0})


def test_split_indices():
    train, valid = split_indices(100, 0.1, seed=7)
    assert len(valid) == 10 and len(train) == 90
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(range(100))
    again = split_indices(100, 0.1, seed=7)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(valid, again[1])
    assert not np.array_equal(valid, split_indices(100, 0.1, seed=8)[1])
    # tiny sets still get one of each; zero fraction gives no validation set
    train, valid = split_indices(3, 0.01, seed=0)
    assert len(valid) == 1 and len(train) == 2
    train, valid = split_indices(5, 0.0, seed=0)
    assert len(valid) == 0 and len(train) == 5
    with pytest.raises(ValueError):
        split_indices(5, 1.0, seed=0)


def test_isolated_atoms_of_other_elements_are_ignored():
    configs = synthetic(np.random.default_rng(3), 10, {1: -13.6, 8: -2041.9})
    configs.append(Configuration(numbers=[7], positions=[[0, 0, 0]], energy=-1479.0, config_type="isolated_atom"))
    e0s = fit_e0s(configs, [1, 8])
    assert sorted(e0s) == [1, 8] and e0s[1] == pytest.approx(-13.6, abs=1e-4)
