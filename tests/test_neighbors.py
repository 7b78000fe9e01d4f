"""equiforce's vesin-backed neighbour list must give exactly ASE's pairs, shifts and distances."""

from __future__ import annotations

import numpy as np
import pytest
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.data.neighbors import neighbor_list

SEEDS = range(5)


def random_cell(rng: np.random.Generator, scale: float = 6.0) -> np.ndarray:
    """A triclinic cell with condition number small enough that the geometry stays sensible."""
    while True:
        cell = scale * (np.eye(3) + 0.35 * rng.uniform(-1, 1, (3, 3)))
        if np.linalg.cond(cell) < 4 and np.linalg.det(cell) > 0:
            return cell


def assert_same_pairs(positions, cell, pbc, cutoff):
    from ase import Atoms

    atoms = Atoms("H" * len(positions), positions=positions, cell=cell, pbc=pbc)
    ai, aj, a_s, a_d = ase_neighbor_list("ijSd", atoms, cutoff)
    ei, ej, e_s = neighbor_list(positions, cell, pbc, cutoff)
    assert ei.dtype == np.int64 and e_s.shape == (len(ei), 3)
    np.testing.assert_array_equal(e_s, np.round(e_s))
    ours = sorted(zip(ei.tolist(), ej.tolist(), map(tuple, e_s.astype(int).tolist())))
    theirs = sorted(zip(ai.tolist(), aj.tolist(), map(tuple, a_s.astype(int).tolist())))
    assert ours == theirs
    e_d = np.linalg.norm(positions[ej] - positions[ei] + e_s @ cell, axis=1)
    order_ours = np.lexsort((e_s[:, 2], e_s[:, 1], e_s[:, 0], ej, ei))
    order_ase = np.lexsort((a_s[:, 2], a_s[:, 1], a_s[:, 0], aj, ai))
    np.testing.assert_allclose(e_d[order_ours], a_d[order_ase], rtol=0, atol=1e-10)
    assert np.all(e_d <= cutoff + 1e-12)
    return len(ei)


@pytest.mark.parametrize("seed", SEEDS)
def test_non_periodic(seed):
    rng = np.random.default_rng(seed)
    positions = rng.uniform(0, 6, (12, 3))
    n = assert_same_pairs(positions, np.zeros((3, 3)), [False] * 3, 3.0)
    assert n > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_fully_periodic_triclinic(seed):
    rng = np.random.default_rng(100 + seed)
    cell = random_cell(rng)
    positions = rng.uniform(0, 1, (8, 3)) @ cell
    assert_same_pairs(positions, cell, [True] * 3, 3.5)


@pytest.mark.parametrize("seed", SEEDS)
def test_positions_outside_cell(seed):
    rng = np.random.default_rng(200 + seed)
    cell = random_cell(rng, 5.0)
    positions = rng.uniform(-1.5, 2.5, (6, 3)) @ cell  # not wrapped into the cell
    assert_same_pairs(positions, cell, [True] * 3, 3.0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("zero_open_vector", [True, False])
def test_partly_periodic(seed, zero_open_vector):
    rng = np.random.default_rng(300 + seed)
    cell = random_cell(rng, 5.0)
    open_axis = seed % 3
    pbc = [axis != open_axis for axis in range(3)]
    positions = rng.uniform(0, 1, (8, 3)) @ cell
    positions += rng.normal(0, 2.0, 3)  # a slab/wire not starting at the origin
    if zero_open_vector:
        cell[open_axis] = 0.0
    assert_same_pairs(positions, cell, pbc, 3.5)


@pytest.mark.parametrize("seed", SEEDS)
def test_one_periodic_axis(seed):
    rng = np.random.default_rng(400 + seed)
    cell = random_cell(rng, 4.0)
    axis = seed % 3
    pbc = [a == axis for a in range(3)]
    positions = rng.uniform(0, 1, (6, 3)) @ cell
    assert_same_pairs(positions, cell, pbc, 4.5)


@pytest.mark.parametrize("seed", SEEDS)
def test_cell_smaller_than_cutoff(seed):
    rng = np.random.default_rng(500 + seed)
    cell = random_cell(rng, 2.0)
    positions = rng.uniform(0, 1, (2, 3)) @ cell
    n = assert_same_pairs(positions, cell, [True] * 3, 5.0)
    i, j, shifts = neighbor_list(positions, cell, [True] * 3, 5.0)
    # many periodic images of the same neighbour, each its own pair, including self-images
    assert n > 50
    assert np.sum((i == 0) & (j == 0)) > 10
    assert not np.any((i == j) & np.all(shifts == 0, axis=1))


def test_single_atom_and_empty():
    i, j, s = neighbor_list(np.zeros((1, 3)), np.zeros((3, 3)), [False] * 3, 5.0)
    assert len(i) == len(j) == len(s) == 0
    i, j, s = neighbor_list(np.zeros((0, 3)), np.eye(3) * 3, [True] * 3, 5.0)
    assert len(i) == 0 and s.shape == (0, 3)


def test_edge_vectors_of_a_batch_use_each_systems_cell():
    """Two periodic systems with different triclinic cells in one batch: every edge vector (and so every
    length) must be that of its own system, as ASE gives it."""
    import torch
    from ase import Atoms

    from equiforce.data import keys as K
    from equiforce.data.graph import atoms_to_graph, collate, edge_vectors

    rng = np.random.default_rng(7)
    systems = []
    for scale in (4.5, 6.0):
        cell = random_cell(rng, scale)
        systems.append(Atoms("H" * 6, positions=rng.uniform(0, 1, (6, 3)) @ cell, cell=cell, pbc=True))
    batch = collate([atoms_to_graph(a, 3.0) for a in systems])
    vectors = edge_vectors(batch[K.POSITIONS], batch[K.EDGE_INDEX], batch[K.SHIFTS], batch[K.CELL], batch[K.BATCH])
    lengths = torch.linalg.vector_norm(vectors, dim=-1).numpy()
    expected = np.concatenate([np.sort(ase_neighbor_list("d", a, 3.0)) for a in systems])
    centre_system = batch[K.BATCH][batch[K.EDGE_INDEX][0]].numpy()
    ours = np.concatenate([np.sort(lengths[centre_system == s]) for s in range(len(systems))])
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-10)
