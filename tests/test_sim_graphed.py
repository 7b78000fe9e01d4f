"""A graphed MD step (equiforce.sim.graphed) gives the trajectory of the ordinary loop.

On a CPU the step runs eagerly through the static buffers a CUDA graph would use, so the buffer logic
(what is carried from step to step, the device step counter, the look-ahead neighbour check, stopping)
is checked here; the capture itself only on a CUDA machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from equiforce.sim.integrators import Langevin
from equiforce.sim.md import MolecularDynamics, run_md
from equiforce.sim.state import SimState, maxwell_boltzmann
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401

# on a CPU every run says once that it ran eagerly (the point of these tests: the buffer logic, eagerly)
pytestmark = pytest.mark.filterwarnings("ignore:MD step not captured as a CUDA graph")


def _systems():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=1)
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.02, seed=2)
    return [ethanol, cu]


def _hot(state: SimState, outputs) -> torch.Tensor:
    """A tensor-only stop rule (what a captured step can evaluate): kinetic energy per atom above 110 meV
    (~850 K; the 4-atom Cu cell gets there by fluctuation at 600 K, the molecule does not)."""
    return state.kinetic_energy() / state.n_atoms > 0.11


@pytest.mark.parametrize("ensemble", ["nve", "nvt", "nvt-csvr", "npt"])
def test_graphed_step_gives_the_ordinary_trajectory(ensemble):
    model = make_model("L1-corr3")
    runs = [run_md(model, _systems(), ensemble=ensemble, temperature_K=600, steps=40, seed=3, log_interval=5,
                   stop_when=_hot, cuda_graph=graphed) for graphed in (False, True)]
    plain, graphed = runs
    for b in range(2):
        np.testing.assert_allclose(graphed.atoms[b].positions, plain.atoms[b].positions, atol=1e-9, rtol=0)
        np.testing.assert_allclose(graphed.atoms[b].get_momenta(), plain.atoms[b].get_momenta(), atol=1e-9, rtol=0)
        np.testing.assert_allclose(graphed.atoms[b].cell.array, plain.atoms[b].cell.array, atol=1e-9, rtol=0)
    for key in ("etot", "conserved", "temperature", "pressure_bar"):
        if key == "conserved" and ensemble == "npt":  # no such column: the barostat's work is not tracked
            continue
        np.testing.assert_allclose([r[key] for r in graphed.thermo], [r[key] for r in plain.thermo], rtol=1e-9,
                                   atol=1e-9)
    assert graphed.stopped_step.tolist() == plain.stopped_step.tolist()
    assert graphed.info["cuda_graph"]["eager_steps"] == 40 and graphed.info["cuda_graph"]["captures"] == 0


def test_graphed_step_freezes_flagged_systems_at_the_same_step():
    model = make_model("L1-corr3")
    runs = [run_md(model, _systems(), ensemble="nvt", temperature_K=600, steps=30, seed=0, stop_when=_hot,
                   stop_check_interval=3, log_interval=1, cuda_graph=graphed) for graphed in (False, True)]
    assert runs[0].stopped_step.tolist() == runs[1].stopped_step.tolist()
    assert (runs[0].stopped_step >= 0).any() and all(s % 3 == 0 for s in runs[0].stopped_step if s >= 0)
    for b in range(2):
        np.testing.assert_allclose(runs[1].atoms[b].positions, runs[0].atoms[b].positions, atol=1e-9, rtol=0)


def test_graphed_runs_in_chunks_and_adopts_outside_changes():
    """Several run() calls reuse the buffers; a state changed between them is copied in, not ignored."""
    model = make_model("L1-corr3")

    def fresh():
        state = SimState.from_atoms(_systems(), dtype=torch.float64)
        maxwell_boltzmann(state, 500.0, generator=torch.Generator().manual_seed(0))
        return state

    def engine(graphed):
        return MolecularDynamics(model, Langevin(0.5, 500.0, generator=torch.Generator().manual_seed(1)),
                                 cuda_graph=graphed)

    reference, state_a = engine(False), fresh()
    reference.run(state_a, 12, keep_thermo=False)
    state_a.momenta = state_a.momenta * 0.5
    reference.run(state_a, 12, keep_thermo=False)
    chunked, state_b = engine(True), fresh()
    chunked.run(state_b, 4, keep_thermo=False)
    inputs = chunked._graphed._inputs[2:]  # what a captured graph reads by address, but the (rebuilt) edges
    for _ in range(2):
        chunked.run(state_b, 4, keep_thermo=False)
    assert all(a is b for a, b in zip(chunked._graphed._inputs[2:], inputs))  # no recapture per run() call
    state_b.momenta = state_b.momenta * 0.5  # a new tensor: must be copied into the step's buffer
    chunked.run(state_b, 12, keep_thermo=False)
    torch.testing.assert_close(state_b.positions, state_a.positions, atol=1e-9, rtol=0)
    torch.testing.assert_close(state_b.momenta, state_a.momenta, atol=1e-9, rtol=0)
    assert state_b.step == state_a.step == 24


def test_lookahead_list_holds_every_pair_of_the_next_step():
    """Checked before a step (as a captured step must be), the list still holds every pair within the
    cutoff after it — adaptive check intervals included."""
    from equiforce.sim.neighbors import VerletNeighborList

    positions = torch.tensor([[0.0, 0.0, 0.0], [4.2, 0.0, 0.0]], dtype=torch.float64)
    cell, pbc = torch.zeros(1, 3, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.bool)
    ptr, system = torch.tensor([0, 2]), torch.zeros(2, dtype=torch.long)
    velocities = torch.tensor([[0.01, 0.0, 0.0], [-0.04, 0.0, 0.0]], dtype=torch.float64)
    ahead = VerletNeighborList(3.0, skin=0.5, check_interval="auto")
    seen_inside = 0
    for _ in range(40):
        ahead.update(positions, cell, pbc, ptr, system, velocities, 1.0, lookahead=1)
        positions = positions + velocities  # the step taken with that list
        if float(torch.linalg.vector_norm(positions[1] - positions[0])) < 3.0:
            assert ahead.edge_index.shape[1] == 2
            seen_inside += 1
    assert seen_inside > 5 and ahead.builds >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (capture and replay)")
def test_captured_step_matches_eager_on_cuda():
    model = make_model("L1-corr3").to("cuda")
    runs = [run_md(model, _systems(), ensemble="nvt", temperature_K=600, steps=60, seed=3, device="cuda",
                   log_interval=10, stop_when=_hot, cuda_graph=graphed) for graphed in (False, True)]
    info = runs[1].info["cuda_graph"]
    assert info["reason"] is None and info["captures"] >= 1 and info["replays"] > 0, info
    for b in range(2):
        np.testing.assert_allclose(runs[1].atoms[b].positions, runs[0].atoms[b].positions, atol=1e-8, rtol=0)
    assert runs[1].stopped_step.tolist() == runs[0].stopped_step.tolist()
