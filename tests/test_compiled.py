"""The traced and compiled model (``training.compile``, the MD engine's ``compile``): the same energies,
forces, stress and — the point of the exercise — the same weight gradients of a force/stress loss as the
uncompiled model, for batches of other sizes than the traced one, in training and in MD, and a clean
fallback when compilation fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from equiforce.data import atoms_to_graph, collate
from equiforce.data import keys as K
from equiforce.data.structure import Configuration
from equiforce.models.compiled import CompiledForces
from equiforce.sim.md import MolecularDynamics, run_md
from equiforce.train.trainer import train_configs
from equiforce.uq import keys as UK
from tests.conftest import make_model
from tests.test_physics import alloy_system, molecule_system


def _batches() -> list[dict[str, torch.Tensor]]:
    """Batches of different numbers of graphs, atoms and edges (the first one is traced)."""
    return [collate([atoms_to_graph(molecule_system(s), 4.0) for s in (0, 1, 2)]),
            collate([atoms_to_graph(molecule_system(3), 4.0), atoms_to_graph(molecule("CH4"), 4.0)]),
            collate([atoms_to_graph(molecule_system(s), 4.0) for s in range(4, 9)])]


def _gradients(module, model, batch, stress: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    pred = module(batch, compute_forces=True, compute_stress=stress, create_graph=True)
    loss = pred[K.FORCES].square().sum() + pred[K.ENERGY].square().sum()
    if stress:
        loss = loss + pred[K.STRESS].square().sum()
    loss.backward()
    return {k: v.detach() for k, v in pred.items()}, [p.grad.clone() for p in model.parameters()]


# L1-corr3's second-order path is also checked, with stress, by the periodic test below (one cold trace ≈ 45 s)
# both slow (~80 s each on 2 cores, cold): the default suite checks compiled training against the uncompiled run
@pytest.mark.slow
@pytest.mark.parametrize("name", ["L1-corr3", "L2-corr2-zbl"])
def test_weight_gradients_of_the_force_loss_match_the_model(name):
    """The trace must keep the second-order path (autograd's saved outputs appear as ``detach``)."""
    model = make_model(name).train()
    compiled = CompiledForces(model, backend="aot_eager")
    for batch in _batches():
        ref_pred, ref_grads = _gradients(model, model, batch, stress=False)
        pred, grads = _gradients(compiled, model, batch, stress=False)
        for key in (K.ENERGY, K.FORCES):
            torch.testing.assert_close(pred[key], ref_pred[key], rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert compiled.removed_detach > 0  # the model has exp/rsqrt/SiLU: the trace did carry such detaches
    assert compiled.report()["compiled"] is True


@pytest.mark.slow  # one aot_eager trace, ~25 s on 2 cores
def test_a_scalar_only_model_with_two_layers_compiles_for_md():
    """max_l 0: the element-wise skip's reshape of a size-1 irreps axis was traced as a view the compiler's stride
    propagation refused, so such models silently ran uncompiled (in MD; their compiled *training* step still falls
    back to the uncompiled one, with a warning: its second-order path trips over the same kind of view)."""
    from equiforce.models import ModelSpec, build_model

    model = build_model(ModelSpec(elements=[1, 6, 8], channels=4, max_l=0, sh_lmax=1, correlation=2, num_layers=2,
                                  radial_mlp=[8], cutoff=4.0, avg_num_neighbors=6.0)).eval()
    compiled = CompiledForces(model, backend="aot_eager")
    for batch in _batches()[:2]:
        reference = model(batch, compute_forces=True)
        got = compiled(batch, compute_forces=True)
        torch.testing.assert_close(got[K.FORCES], reference[K.FORCES], rtol=1e-10, atol=1e-10)
    assert compiled.report()["compiled"] is True


def _check_stress(size_lists: list[list[tuple[int, int, int]]]) -> None:
    model = make_model("L1-corr3").train()
    compiled = CompiledForces(model, backend="aot_eager")
    for sizes in size_lists:
        batch = collate([atoms_to_graph(alloy_system(seed=k, size=s), 4.0) for k, s in enumerate(sizes)])
        ref_pred, ref_grads = _gradients(model, model, batch, stress=True)
        pred, grads = _gradients(compiled, model, batch, stress=True)
        for key in (K.ENERGY, K.FORCES, K.STRESS):
            torch.testing.assert_close(pred[key], ref_pred[key], rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.slow  # ~45 s on 2 cores; the default suite checks stress in test_npt_stress_through_the_compiled_model
def test_stress_and_its_weight_gradients_match_on_periodic_cells():
    """Batches of several cells, other sizes than the traced one: one trace."""
    _check_stress([[(1, 1, 1), (1, 1, 2)], [(2, 1, 1), (1, 1, 1)], [(1, 1, 1), (1, 2, 1), (1, 1, 1)]])


@pytest.mark.slow  # one graph has a trace of its own (~35 s more on 2 cores)
def test_stress_and_its_weight_gradients_match_on_a_single_cell():
    _check_stress([[(1, 1, 1)], [(2, 1, 1)]])


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


def _check_inductor(device: str, batches: list[dict[str, torch.Tensor]], traces: int, name: str) -> None:
    """``name``: "small" where the cost is what matters (a cold compile of L1-corr3 takes ~25 s longer on 2 cores;
    L1-corr3 under Inductor is the slow single-graph test's model, and its trace is checked on aot_eager)."""
    model = make_model(name, dtype=torch.float32).train().to(device)
    compiled = CompiledForces(model)
    for i, batch in enumerate(batches):
        batch = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
        ref_pred, ref_grads = _gradients(model, model, batch, stress=False)
        # later batches must reuse the first one's code (a recompilation would fail and fall back uncompiled)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            pred, grads = _gradients(compiled, model, batch, stress=False)
        torch.testing.assert_close(pred[K.FORCES], ref_pred[K.FORCES], rtol=1e-4, atol=1e-5)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert compiled.report()["compiled"] is True and compiled.compile_seconds > 0, compiled.report()
    assert len(compiled._graphs) == traces


# the CPU case is slow (~60 s, a cold Inductor compile; compiled training and MD run Inductor in the default suite)
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_inductor_compiles_a_step_that_matches_the_model(device):
    """The real backend (C++ code on a CPU, Triton on a GPU), float32, two batch sizes, one trace (a small model:
    a cold compile is what a CI machine pays).

    Both batches have more than 32 atoms: on a CPU, Inductor turns an outer product (the readout's backward)
    of at most 32 elements into a multiplication and guards the atom count for it, so a first batch that
    small would be compiled a second time for a larger one (~40 s more here; training batches are larger)."""
    more = collate([atoms_to_graph(molecule_system(s), 4.0) for s in range(10, 14)])
    _check_inductor(device, [_batches()[2], more], traces=1, name="small")


@pytest.mark.slow  # a cold Inductor compile of a second trace: ~80 s on 2 cores
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_inductor_compiles_a_single_graph_batch(device):
    """A one-graph batch has its own trace (Inductor's CPU code for an index_add into one element failed)."""
    _check_inductor(device, [collate([atoms_to_graph(molecule_system(9), 4.0)])], traces=1, name="L1-corr3")


def _configs(n: int, seed: int) -> list[Configuration]:
    """Rattled ethanols with smooth made-up labels (a harmonic pull to the equilibrium geometry)."""
    base = molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = base.copy()
        atoms.positions += rng.normal(0.0, 0.08, atoms.positions.shape)
        disp = atoms.positions - base.positions
        out.append(Configuration(numbers=atoms.numbers, positions=atoms.positions, energy=float((disp**2).sum()),
                                 forces=-2.0 * disp, source="harmonic", frame=i))
    return out


def _train(tmp_path, compile_: bool | None, backend: str = "aot_eager") -> tuple[list[dict], dict]:
    model = dict(channels=8, radial_mlp=[16], num_layers=2, max_l=1, sh_lmax=2, correlation=2, cutoff=4.0)
    training = dict(epochs=3, batch_size=4, lr=0.01, dtype="float64", device="cpu", seed=3)
    if compile_ is not None:
        training.update(compile=compile_, compile_backend=backend)
    result = train_configs(_configs(14, 1), _configs(4, 2), model, training, tmp_path, resume=False,
                           progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return records, result


def test_compiled_training_follows_the_uncompiled_run(tmp_path):
    eager, _ = _train(tmp_path / "eager", None)
    compiled, _ = _train(tmp_path / "compiled", True)
    assert [r["train_loss"] for r in compiled] == pytest.approx([r["train_loss"] for r in eager], rel=1e-8)
    assert [r["valid_forces_mae"] for r in compiled] == pytest.approx([r["valid_forces_mae"] for r in eager],
                                                                      rel=1e-8)
    assert all(r["compiled"] for r in compiled) and compiled[0]["compile_s"] > 0
    assert "compiled" not in eager[0]


def test_a_failed_compilation_trains_on_uncompiled_and_says_why(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    eager, _ = _train(tmp_path / "eager", None)
    with pytest.warns(RuntimeWarning, match="compilation failed"):
        records, _ = _train(tmp_path / "fallback", True, backend="inductor")
    assert [r["train_loss"] for r in records] == pytest.approx([r["train_loss"] for r in eager], rel=1e-10)
    assert records[-1]["compiled"] is False and "no C++ compiler here" in records[-1]["compile_error"]


def test_a_batch_without_graph_indices_is_refused():
    compiled = CompiledForces(make_model("L1-corr3"), backend="aot_eager")
    batch = atoms_to_graph(molecule_system(0), 4.0)
    batch.pop(K.BATCH, None)
    with pytest.raises(KeyError, match="collated batch"):
        compiled(batch)


def test_md_through_the_compiled_model_follows_the_uncompiled_trajectory(monkeypatch):
    """NVT on two molecules of different sizes, float64: neighbour-list rebuilds change the edge count.  The
    MD run's compiled model, called on another batch, also returns plain tensors (an inference graph)."""
    made: list[CompiledForces] = []
    init = CompiledForces.__init__
    monkeypatch.setattr(CompiledForces, "__init__", lambda self, *a, **kw: (init(self, *a, **kw), made.append(self))[0])
    model = make_model("small")  # the MD plumbing is the subject: the cheapest trace
    systems = [molecule_system(0), molecule("CH4")]
    runs = [run_md(model, systems, ensemble="nvt", temperature_K=800, timestep_fs=0.5, steps=30, seed=4,
                   skin=0.1, compile="aot_eager" if compiled else False) for compiled in (False, True)]
    for eager, compiled in zip(*(r.atoms for r in runs)):
        np.testing.assert_allclose(compiled.positions, eager.positions, atol=1e-9)
        np.testing.assert_allclose(compiled.get_momenta(), eager.get_momenta(), atol=1e-9)
    assert runs[1].neighbor_builds > 1
    assert len(made) == 1 and made[0].report()["compiled"] is True
    out = made[0](_batches()[0], compute_forces=True)  # three graphs: the MD run's trace, reused
    assert not out[K.FORCES].requires_grad and not out[K.ENERGY].requires_grad
    assert len(made[0]._graphs) == 1
    reference = model(_batches()[0], compute_forces=True)
    torch.testing.assert_close(out[K.FORCES], reference[K.FORCES].detach(), rtol=1e-10, atol=1e-10)


def test_npt_stress_through_the_compiled_model():
    model = make_model("small")
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    cell.rattle(0.05, seed=1)
    runs = [run_md(model, cell, ensemble="npt", temperature_K=300, pressure_bar=1000.0, timestep_fs=1.0, steps=10,
                   seed=2, compile="aot_eager" if compiled else False) for compiled in (False, True)]
    np.testing.assert_allclose(runs[1].atoms[0].cell.array, runs[0].atoms[0].cell.array, atol=1e-9)
    np.testing.assert_allclose(runs[1].atoms[0].positions, runs[0].atoms[0].positions, atol=1e-9)


@pytest.mark.slow  # one aot_eager trace with stress, ~30 s on 2 cores
def test_a_molecule_in_a_box_has_no_stress_through_the_compiled_model():
    """The trace reads ``pbc`` as the eager model does: a boxed molecule (pbc all False) in a batch with a periodic
    cell gets zero stress, the cell its own."""
    model = make_model("small")
    boxed = molecule("CH3CH2OH")
    boxed.set_cell([9.0, 9.0, 9.0])
    boxed.center()
    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    cell.rattle(0.05, seed=1)
    batch = collate([atoms_to_graph(boxed, model.cutoff), atoms_to_graph(cell, model.cutoff)])
    compiled = CompiledForces(model, backend="aot_eager")
    out = compiled(batch, compute_forces=True, compute_stress=True)
    reference = model(batch, compute_forces=True, compute_stress=True)
    assert float(out[K.STRESS][0].abs().max()) == 0.0
    torch.testing.assert_close(out[K.STRESS], reference[K.STRESS].detach(), rtol=1e-10, atol=1e-12)
    without_pbc = {k: v for k, v in batch.items() if k != K.PBC}  # read as the eager model reads it: periodic
    torch.testing.assert_close(compiled(without_pbc, compute_stress=True)[K.STRESS],  # the same trace
                               model(without_pbc, compute_stress=True)[K.STRESS].detach(), rtol=1e-10, atol=1e-12)
    assert len(compiled._graphs) == 1


def test_only_plain_potentials_compile_for_md():
    with pytest.raises(ValueError, match="plain potential or one with uncertainty heads"):
        MolecularDynamics(torch.nn.ModuleList([make_model("L1-corr3")]), None, compile=True)


def _heads_model(dtype: torch.dtype = torch.float64):
    """The small model with fitted and calibrated uncertainty heads."""
    from equiforce.uq.fit import build_uq_potential
    from tests.uq_helpers import graphs, labelled

    torch.manual_seed(0)
    train, valid = graphs(labelled(16, seed=1)), graphs(labelled(12, seed=2))
    model = build_uq_potential(make_model("small"), train, valid, steps=20, n_heads=4, hidden=8)
    return model.to(dtype)


@pytest.mark.slow  # a cold Inductor compile, ~40 s
def test_inductor_compiles_a_heads_model_on_one_graph():
    """float32, one molecule: the heads' per-graph sums are plain sums there (Inductor's CPU code for an
    index_add into one graph failed, and the model ran uncompiled)."""
    model = _heads_model(torch.float32)
    batch = {k: v.float() if v.is_floating_point() else v
             for k, v in collate([atoms_to_graph(molecule("CH3CH2OH"), 4.0)]).items()}
    compiled = CompiledForces(model)
    out, reference = compiled(batch), model(batch)
    assert compiled.report()["compiled"] is True, compiled.report()
    for key, value in out.items():
        torch.testing.assert_close(value, reference[key].detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # ~40 s on 2 cores, a cold Inductor compile of the heads model
def test_a_model_with_uncertainty_heads_compiles_for_md_with_its_sigma(monkeypatch):
    """σ is one more output of the compiled graph: the same σ, the same σ stops, inference only."""
    from equiforce.uq.stop import sigma_stop

    model = _heads_model()
    made: list[CompiledForces] = []
    init = CompiledForces.__init__
    monkeypatch.setattr(CompiledForces, "__init__", lambda self, *a, **kw: (init(self, *a, **kw), made.append(self))[0])
    systems = [molecule_system(0), molecule("CH3CH2OH")]
    start = model(collate([atoms_to_graph(a, model.cutoff) for a in systems]))[UK.FORCES_STD]
    threshold = float(start.max()) * 1.02  # crossed within a few steps by some system, not by all at once
    runs = [run_md(model, [a.copy() for a in systems], ensemble="nvt", temperature_K=800, timestep_fs=0.5, steps=20,
                   seed=4, stop_when=sigma_stop(forces=threshold), compile="aot_eager" if compiled else False)
            for compiled in (False, True)]
    assert runs[0].stopped_step.tolist() == runs[1].stopped_step.tolist()
    assert (runs[0].stopped_step >= 0).any()
    for eager, compiled in zip(*(r.atoms for r in runs)):
        np.testing.assert_allclose(compiled.positions, eager.positions, atol=1e-9)
    assert len(made) == 1 and made[0].report()["compiled"] is True
    batch = _batches()[0]
    out, reference = made[0](batch), model(batch)
    assert set(out) == {key for key, value in reference.items() if isinstance(value, torch.Tensor)}
    for key, value in out.items():
        torch.testing.assert_close(value, reference[key].detach(), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="inference only"):
        made[0](batch, create_graph=True)
