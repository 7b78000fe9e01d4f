"""The torch-sim adapter (skipped when torch-sim is not installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

import equiforce
from equiforce.models import ModelSpec, build_model
from equiforce.sim.state import SimState
from tests.sim_models import single_thread  # noqa: F401

ts = pytest.importorskip("torch_sim")
from equiforce.sim.torchsim import TorchSimModel  # noqa: E402


def _model(elements):
    torch.manual_seed(0)
    spec = ModelSpec(elements=elements, channels=8, max_l=1, correlation=2, num_layers=2, radial_mlp=[16], cutoff=4.0,
                     avg_num_neighbors=10.0)
    return build_model(spec, dtype=torch.float64).eval()


def test_passes_torch_sim_validation():
    from torch_sim.models.interface import validate_model_outputs

    validate_model_outputs(TorchSimModel(_model([14, 26])), torch.device("cpu"), torch.float64)


def test_matches_ase_calculator_on_a_mixed_batch():
    model = _model([1, 6, 8, 29])
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.05, seed=0)
    systems = [cu, cu.repeat((2, 1, 1))]
    state = ts.io.atoms_to_state(systems, torch.device("cpu"), torch.float64)
    out = TorchSimModel(model)(state)
    ptr = SimState.from_atoms(systems).ptr.tolist()
    for b, atoms in enumerate(systems):
        atoms = atoms.copy()
        atoms.calc = equiforce.Calculator(model)
        assert float(out["energy"][b]) == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(out["forces"][ptr[b]:ptr[b + 1]].numpy(), atoms.get_forces(), atol=1e-10)
        np.testing.assert_allclose(out["stress"][b].numpy(), atoms.get_stress(voigt=False), atol=1e-10)


def test_torch_sim_runs_md_with_the_adapter():
    model = TorchSimModel(_model([1, 6, 8]), compute_stress=False)
    state = ts.io.atoms_to_state([molecule("CH3CH2OH"), molecule("H2O")], torch.device("cpu"), torch.float64)
    # torch-sim >= 0.4 names integrators by an enum, 0.3 by the function
    integrator = ts.Integrator.nvt_langevin if hasattr(ts, "Integrator") else ts.nvt_langevin
    final = ts.integrate(system=state, model=model, integrator=integrator, n_steps=5, temperature=300.0,
                         timestep=0.0005)
    assert torch.isfinite(final.positions).all()
