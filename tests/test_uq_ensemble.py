"""Ensembles: one batched pass equals the members one by one; stacking refuses mismatched members."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from equiforce.data import atoms_to_graph, collate
from equiforce.data import keys as K
from equiforce.models import ModelSpec, build_model
from equiforce.uq import keys as UK
from equiforce.uq.ensemble import EnsemblePotential, MemberMismatchError
from tests.conftest import MODEL_CONFIGS, make_model
from tests.uq_helpers import batch_of, single_thread  # noqa: F401


def _mixed_batch():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.numbers[:2] = 28
    cu.rattle(0.05, seed=3)
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=4)
    return batch_of([ethanol, cu, molecule("H2O")])


@pytest.mark.parametrize("member_pass", ["batched", "sequential"])
@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_batched_pass_equals_sequential_members(name, member_pass):
    members = [make_model(name, seed=s) for s in range(3)]
    ensemble = EnsemblePotential.from_members(members).set_member_pass(member_pass)
    batch = _mixed_batch()
    out = ensemble(batch, compute_stress=True, calibrated=False)
    energies, forces, stresses = [], [], []
    for m, member in enumerate(members):
        ref = member(batch, compute_stress=True)
        energies.append(ref[K.ENERGY].detach())
        forces.append(ref[K.FORCES])
        stresses.append(ref[K.STRESS])
        torch.testing.assert_close(out[UK.ENERGY_MEMBERS][m], ref[K.ENERGY], atol=1e-10, rtol=0)
        torch.testing.assert_close(out[UK.FORCES_MEMBERS][m], ref[K.FORCES], atol=1e-10, rtol=0)
    energies, forces, stresses = torch.stack(energies), torch.stack(forces), torch.stack(stresses)
    torch.testing.assert_close(out[K.ENERGY], energies.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(out[K.FORCES], forces.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(out[K.STRESS], stresses.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(out[UK.ENERGY_STD], energies.std(0, correction=0), atol=1e-10, rtol=0)
    expected_f = (forces - forces.mean(0)).square().sum(-1).mean(0).sqrt()
    torch.testing.assert_close(out[UK.FORCES_STD], expected_f, atol=1e-10, rtol=0)
    torch.testing.assert_close(out[UK.STRESS_STD], stresses.std(0, correction=0), atol=1e-10, rtol=0)
    assert float(out[UK.STRESS_STD][0].abs().max()) == 0.0  # the molecule has no stress, hence no σ


def test_member_forces_are_their_own_autograd_forces():
    members = [make_model("L1-corr3", seed=s) for s in range(4)]
    ensemble = EnsemblePotential.from_members(members)
    batch = _mixed_batch()
    out = ensemble(batch, calibrated=False)
    for m, member in enumerate(members):
        positions = batch[K.POSITIONS].clone().requires_grad_(True)
        energy = member({**batch, K.POSITIONS: positions}, compute_forces=False)[K.ENERGY].sum()
        (grad,) = torch.autograd.grad(energy, positions)
        torch.testing.assert_close(out[UK.FORCES_MEMBERS][m], -grad, atol=1e-10, rtol=0)
        standalone = ensemble.member(m)(batch)
        torch.testing.assert_close(standalone[K.FORCES], -grad, atol=1e-10, rtol=0)


def test_mismatched_members_are_refused():
    a = make_model("L1-corr3", seed=0)
    with pytest.raises(MemberMismatchError, match="member 1 differs .* channels"):
        EnsemblePotential.from_members([a, make_model("L2-corr2-zbl", seed=1)])
    spec = dict(MODEL_CONFIGS["L1-corr3"], energy_scale=0.9)
    with pytest.raises(MemberMismatchError, match="energy_scale"):
        EnsemblePotential.from_members([a, build_model(ModelSpec(**spec))])
    with pytest.raises(MemberMismatchError, match="at least 2 members"):
        EnsemblePotential.from_members([a])
    with pytest.raises(MemberMismatchError, match="not a Potential"):
        EnsemblePotential.from_members([a, torch.nn.Linear(2, 2)])


def test_descriptors_are_member_zero():
    members = [make_model("L1-corr3", seed=s) for s in range(2)]
    batch = _mixed_batch()
    for mine, ref in zip(EnsemblePotential.from_members(members).descriptors(batch), members[0].descriptors(batch)):
        torch.testing.assert_close(mine, ref, atol=1e-12, rtol=0)


def test_ensemble_cost_is_measured():
    """Cost of the batched ensemble relative to one member (printed, not asserted: timings are noisy)."""
    members = [make_model("L1-corr3", seed=s) for s in range(4)]
    ensemble = EnsemblePotential.from_members(members)
    batch = batch_of([molecule("CH3CH2OH")] * 8)
    times = {"single": [], "ensemble": []}
    for _ in range(3):
        for label, model in (("single", members[0]), ("ensemble", ensemble)):
            start = time.perf_counter()
            out = model(batch)
            times[label].append(time.perf_counter() - start)
            assert torch.isfinite(out[K.FORCES]).all()
    ratio = np.median(times["ensemble"]) / np.median(times["single"])
    print(f"ensemble of 4 / single (8 ethanols, tiny model): {ratio:.2f}x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ensemble_on_cuda_matches_cpu():
    ensemble = EnsemblePotential.from_members([make_model("L1-corr3", seed=s) for s in range(2)])
    batch = _mixed_batch()
    cpu = ensemble(batch, compute_stress=True)
    gpu = ensemble.to("cuda")({k: v.to("cuda") for k, v in batch.items()}, compute_stress=True)
    for key in (K.ENERGY, K.FORCES, K.STRESS, UK.FORCES_STD):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("member_pass", ["batched", "sequential"])
def test_edge_chunks_inside_the_ensemble_change_nothing(member_pass):
    """Checkpointing cannot run under torch.func.vmap: chunks there are plain slices; members run one by one
    checkpoint theirs (recomputed while that member's weights are in place). Same result either way."""
    from equiforce.models.potential import InteractionBlock, set_edge_chunk
    from tests.uq_helpers import batch_of, ensemble, structures

    model = ensemble(3).set_member_pass(member_pass)
    batch = batch_of(structures(2, periodic=True))
    full = model(batch, compute_stress=True)
    set_edge_chunk(model, 5)
    blocks = [b for b in model.unregistered_modules()[0].modules() if isinstance(b, InteractionBlock)]
    assert blocks and all(b.edge_chunk == 5 for b in blocks)  # reaches the members' template
    chunked = model(batch, compute_stress=True)
    set_edge_chunk(model, "auto")
    for key in ("energy", "forces", "stress", "forces_std", "stress_std"):
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-10, atol=1e-12)


def test_members_run_one_by_one_exactly_when_a_member_would_chunk():
    """"auto": the vmapped pass for small graphs; members one after the other (each with checkpointed edge
    chunks, which vmap cannot run) once a member alone would chunk — with the same results."""
    from equiforce.models.potential import AUTO_CHUNK_MIN_EDGES, set_edge_chunk
    from tests.uq_helpers import ensemble, structures

    model = ensemble(3)
    batch = batch_of(structures(2, periodic=True))
    edges = int(batch[K.EDGE_INDEX].shape[1])
    cpu = torch.device("cpu")
    assert not model._sequential(edges, cpu)
    assert model._sequential(AUTO_CHUNK_MIN_EDGES + 1, cpu)
    assert not model._sequential(AUTO_CHUNK_MIN_EDGES + 1, torch.device("cuda"))
    whole = model.set_member_pass("batched")(batch, compute_stress=True, calibrated=False)
    model.set_member_pass("auto")
    set_edge_chunk(model, 7)
    assert model._sequential(edges, cpu)
    chunked = model(batch, compute_stress=True, calibrated=False)
    set_edge_chunk(model, None)
    assert not model._sequential(edges, cpu)
    for key in (K.ENERGY, K.FORCES, K.STRESS, UK.FORCES_STD, UK.FORCES_MEMBERS):
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="member pass must be one of"):
        model.set_member_pass("parallel")


def test_a_molecule_in_a_box_has_no_stress_or_stress_sigma():
    """Both member passes read ``pbc`` as a plain model does: a boxed molecule (pbc all False) gets zero stress and
    zero stress σ, the batched pass as the one-by-one pass."""
    atoms = molecule("CH4")
    atoms.set_cell([9.0, 9.0, 9.0])
    atoms.center()
    ensemble = EnsemblePotential.from_members([make_model("L1-corr3", seed=s) for s in (0, 1)])
    batch = collate([atoms_to_graph(atoms, ensemble.cutoff)])
    for mode in ("batched", "sequential"):
        out = ensemble.set_member_pass(mode)(batch, compute_stress=True, calibrated=False)
        assert float(out[K.STRESS].abs().max()) == 0.0, mode
        assert float(out[UK.STRESS_STD].abs().max()) == 0.0, mode
