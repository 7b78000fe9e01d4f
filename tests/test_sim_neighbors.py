"""Torch-native batched neighbour lists: equal to ASE's, reused within the skin without changing forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from equiforce.data import keys as K
from equiforce.sim import neighbors as nl
from equiforce.sim.evaluator import BatchEvaluator
from equiforce.sim.integrators import StochasticCellRescaling, VelocityVerlet
from equiforce.sim.md import MolecularDynamics
from equiforce.sim.state import SimState, maxwell_boltzmann
from tests.conftest import make_model
from tests.sim_models import LennardJones, argon_fcc, single_thread  # noqa: F401


def _pairs(i, j, shifts) -> list:
    shifts = np.round(np.asarray(shifts)).astype(int).tolist()
    return sorted(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), shifts))


def _random_systems(seed: int, count: int) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    systems = []
    for k in range(count):
        n = int(rng.integers(1, 25))
        cell = np.diag(rng.uniform(2.0, 8.0, 3)) + rng.normal(0, 1.0, (3, 3))
        pbc = rng.random(3) < 0.6
        if k % 4 == 0:
            pbc[:] = False
        if k % 5 == 1:
            cell[~pbc] = 0.0
        basis = cell if abs(np.linalg.det(cell)) > 1e-6 else np.eye(3) * 5
        positions = rng.uniform(-1.5, 2.5, (n, 3)) @ basis  # unwrapped, outside the cell too
        systems.append(Atoms(numbers=[1] * n, positions=positions, cell=cell, pbc=pbc))
    return systems


@pytest.mark.parametrize("budget,device_cell_list", [(nl.BRUTE_FORCE_BUDGET, True), (0, True), (0, False)],
                         ids=["all-pairs", "cell-list", "host-cell-list"])
def test_batched_list_equals_ase(budget, device_cell_list, monkeypatch):
    """Random triclinic, partly periodic, small cells (several images), unwrapped positions, in one batch."""
    if not device_cell_list:
        monkeypatch.setattr(nl, "_TorchNeighborList", None)
        monkeypatch.setattr(nl, "_TORCH_VESIN_TRIED", True)
    systems = _random_systems(0, 12)
    state = SimState.from_atoms(systems)
    cutoff = 3.7
    edges, shifts = nl.build_neighbor_list(state.positions, state.cell, state.pbc, state.ptr, cutoff, budget=budget)
    ptr = state.ptr.tolist()
    for b, atoms in enumerate(systems):
        mine = (edges[0] >= ptr[b]) & (edges[0] < ptr[b + 1])
        got = _pairs(edges[0, mine] - ptr[b], edges[1, mine] - ptr[b], shifts[mine])
        want = _pairs(*ase_neighbor_list("ijS", atoms, cutoff))
        assert got == want, f"system {b}, pbc {atoms.pbc}"


def test_verlet_list_reuse_gives_fresh_list_forces():
    """After NVE steps on the reused list, forces equal those from a list built at the current positions."""
    model = make_model("L1-corr3")
    cu = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    cu.rattle(0.05, seed=0)
    state = SimState.from_atoms([molecule("CH3CH2OH"), cu])
    maxwell_boltzmann(state, 600.0, generator=torch.Generator().manual_seed(0))
    md = MolecularDynamics(model, VelocityVerlet(0.5), skin=0.8)
    md.run(state, 20, keep_thermo=False)
    assert md.evaluate.neighbors.builds < 20  # it was reused
    reused = md.evaluate(state)
    fresh = BatchEvaluator(model, skin=0.0)(state)
    np.testing.assert_allclose(reused[K.FORCES].numpy(), fresh[K.FORCES].numpy(), atol=1e-12)
    np.testing.assert_allclose(reused[K.ENERGY].numpy(), fresh[K.ENERGY].numpy(), atol=1e-12)


def test_verlet_list_valid_while_cell_changes():
    """Under a barostat the list stays exact: the criterion accounts for the cell's deformation."""
    model = LennardJones()
    state = SimState.from_atoms(argon_fcc(2, a=5.0, rattle=0.05))
    maxwell_boltzmann(state, 50.0, generator=torch.Generator().manual_seed(1))
    md = MolecularDynamics(model, StochasticCellRescaling(5.0, 50.0, 0.0, tau_p_fs=100.0, compressibility_per_bar=1e-3,
                                                          generator=torch.Generator().manual_seed(2)), skin=0.6)
    volume0 = float(state.volume()[0])
    for _ in range(6):
        md.run(state, 10, keep_thermo=False)
        reused = md.evaluate(state, compute_stress=True)
        fresh = BatchEvaluator(model, skin=0.0)(state, compute_stress=True)
        np.testing.assert_allclose(reused[K.FORCES].numpy(), fresh[K.FORCES].numpy(), atol=1e-12)
        np.testing.assert_allclose(reused[K.STRESS].numpy(), fresh[K.STRESS].numpy(), atol=1e-12)
    assert abs(float(state.volume()[0]) / volume0 - 1) > 0.01  # the cell did move


def test_rebuild_triggered_by_displacement():
    verlet = nl.VerletNeighborList(cutoff=2.0, skin=0.4, check_interval=1)
    state = SimState.from_atoms(molecule("CH4"))
    verlet.update(state.positions, state.cell, state.pbc, state.ptr, state.system)
    moved = state.positions.clone()
    moved[0, 0] += 0.15
    assert not verlet.update(moved, state.cell, state.pbc, state.ptr, state.system)
    moved[0, 0] += 0.1  # 0.25 > skin / 2
    assert verlet.update(moved, state.cell, state.pbc, state.ptr, state.system)
    assert verlet.builds == 2


def test_edges_in_the_skin_contribute_nothing():
    """On CUDA the skin's extra edges are kept (no trimming sync): they must add exactly zero."""
    model = make_model("L2-corr2-zbl")
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.1, seed=2)
    state = SimState.from_atoms([molecule("CH3CH2OH"), cu])
    padded = BatchEvaluator(model, skin=1.0, trim=False)
    out = padded(state, compute_stress=True)
    exact = BatchEvaluator(model, skin=0.0)
    fresh = exact(state, compute_stress=True)
    assert padded.neighbors.edge_index.shape[1] > exact.neighbors.edge_index.shape[1]
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        np.testing.assert_allclose(out[key].numpy(), fresh[key].numpy(), atol=1e-12)


@pytest.mark.parametrize("ensemble", ["nve-accelerating", "npt-compressing"])
def test_adaptive_checks_never_miss_a_pair_at_any_step(ensemble):
    """"auto" skips tests of the list; every evaluation must still equal one on a fresh list — also for an atom
    pushed from rest (its speed far more than doubles within the skipped steps) and under a compressing
    barostat (the cell shrinks while tests are skipped)."""
    model = LennardJones()
    if ensemble == "nve-accelerating":  # A-B squeezed hard, C at rest just outside cutoff + skin of B
        atoms = Atoms("Ar3", positions=[[0, 0, 0], [2.9, 0, 0], [2.9 + 7.55, 0, 0]])
        integrator, steps = VelocityVerlet(2.0), 60
    else:  # a dilute box at high pressure: the barostat pulls a distant pair into range
        atoms = Atoms("Ar2", positions=[[0, 0, 0], [7.6, 0, 0]], cell=[16.0, 16.0, 16.0], pbc=True)
        integrator = StochasticCellRescaling(1.0, 1.0, 15000.0, tau_p_fs=100.0, compressibility_per_bar=1e-4,
                                             generator=torch.Generator().manual_seed(3))
        steps = 40
    state = SimState.from_atoms([atoms])
    maxwell_boltzmann(state, 1.0, generator=torch.Generator().manual_seed(0))
    md = MolecularDynamics(model, integrator, skin=0.5)
    errors = []
    plain = md.evaluate.__class__.__call__

    def checked(evaluator, st, compute_stress=False, dt=None):
        out = plain(evaluator, st, compute_stress, dt)
        fresh = BatchEvaluator(model, skin=0.0)(st, compute_stress=compute_stress)
        errors.append(float((out[K.FORCES] - fresh[K.FORCES]).abs().max()))
        return out

    md.evaluate.__class__ = type("Checked", (BatchEvaluator,), {"__call__": checked})
    start = float(torch.linalg.vector_norm(state.positions[-1] - state.positions[-2]))
    md.run(state, steps, keep_thermo=False)
    end = float(torch.linalg.vector_norm(state.positions[-1] - state.positions[-2]))
    assert end < model.cutoff < start  # the pair did come into range
    assert max(errors) < 1e-12, f"{sum(e > 1e-12 for e in errors)} of {len(errors)} evaluations missed a pair"
