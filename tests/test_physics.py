"""Physical correctness of every model configuration, in float64.

Symmetry (rotation, reflection, translation, permutation), exact derivatives (forces and stress
equal finite differences of the energy), smoothness at the cutoff, size-extensivity, periodic-image
consistency and batch independence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from scipy.spatial.transform import Rotation

from equiforce.data import atoms_to_graph, collate
from equiforce.data import keys as K


def predict(model, atoms_list, stress=False):
    graph = collate([atoms_to_graph(a, model.cutoff) for a in atoms_list])
    out = model(graph, compute_forces=True, compute_stress=stress)
    return {k: v.detach().numpy() for k, v in out.items()}


def molecule_system(seed=0):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.1, seed=seed)
    return atoms


def alloy_system(seed=0, size=(1, 1, 1)):
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * size
    atoms.numbers[rng.random(len(atoms)) < 0.4] = 28
    cell = atoms.cell.array @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3)))  # triclinic
    atoms.set_cell(cell, scale_atoms=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


def random_orthogonal(seed, reflect):
    q = Rotation.random(random_state=seed).as_matrix()
    return q * np.array([-1.0, 1.0, 1.0])[:, None] if reflect else q


@pytest.mark.parametrize("reflect", [False, True])
def test_rotation_reflection_translation(model, reflect):
    for seed, atoms in enumerate([molecule_system(), alloy_system()]):
        q = random_orthogonal(seed + 10, reflect)
        shift = np.random.default_rng(seed).normal(size=3) * 3.0
        moved = atoms.copy()
        moved.positions = atoms.positions @ q.T + shift
        moved.set_cell(atoms.cell.array @ q.T, scale_atoms=False)
        periodic = atoms.pbc.all()
        ref, new = predict(model, [atoms], periodic), predict(model, [moved], periodic)
        np.testing.assert_allclose(new["energy"], ref["energy"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(new["forces"], ref["forces"] @ q.T, rtol=1e-8, atol=1e-10)
        if periodic:
            np.testing.assert_allclose(new["stress"][0], q @ ref["stress"][0] @ q.T, atol=1e-10)


def test_permutation(model):
    for atoms in [molecule_system(), alloy_system()]:
        perm = np.random.default_rng(3).permutation(len(atoms))
        ref, new = predict(model, [atoms], atoms.pbc.all()), predict(model, [atoms[perm]], atoms.pbc.all())
        np.testing.assert_allclose(new["energy"], ref["energy"], rtol=1e-12)
        np.testing.assert_allclose(new["forces"], ref["forces"][perm], atol=1e-10)
        np.testing.assert_allclose(new["node_energy"], ref["node_energy"][perm], atol=1e-10)


def test_forces_are_finite_difference_of_energy(model):
    for atoms in [molecule_system(), alloy_system()]:
        forces = predict(model, [atoms])["forces"]
        h = 1e-5
        rng = np.random.default_rng(0)
        for atom in rng.choice(len(atoms), size=3, replace=False):
            for axis in range(3):
                plus, minus = atoms.copy(), atoms.copy()
                plus.positions[atom, axis] += h
                minus.positions[atom, axis] -= h
                fd = -(predict(model, [plus])["energy"][0] - predict(model, [minus])["energy"][0]) / (2 * h)
                scale = max(np.abs(forces).max(), 1e-3)
                assert abs(fd - forces[atom, axis]) / scale < 1e-6


def test_stress_is_strain_derivative_of_energy(model):
    atoms = alloy_system(seed=1)
    stress = predict(model, [atoms], stress=True)["stress"][0]
    volume = atoms.get_volume()
    h = 1e-5
    scale = max(np.abs(stress).max(), 1e-4)
    sym_fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * h / 2
                strain[b, a] += sign * h / 2
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ strain, scale_atoms=True)
                energies.append(predict(model, [strained])["energy"][0])
            sym_fd[a, b] = (energies[0] - energies[1]) / (2 * h) / volume
    np.testing.assert_allclose(stress, sym_fd, atol=1e-6 * scale)


def test_smooth_at_cutoff(model):
    rc = model.cutoff
    results = []
    for r in [rc - 1e-4, rc - 1e-6, rc + 1e-6, rc + 1e-4]:
        atoms = Atoms("CuNi", positions=[[0, 0, 0], [r, 0, 0]])
        results.append(predict(model, [atoms]))
    isolated = results[-1]["energy"][0]
    for out in results:
        assert abs(out["energy"][0] - isolated) < 1e-8
        assert np.abs(out["forces"]).max() < 1e-6


def test_size_extensive(model):
    atoms = molecule_system()
    far = atoms.copy()
    far.positions += np.array([model.cutoff + 20.0, 0.0, 0.0])
    pair = atoms + far
    single = predict(model, [atoms])
    double = predict(model, [pair])
    np.testing.assert_allclose(double["energy"][0], 2 * single["energy"][0], rtol=1e-12)
    np.testing.assert_allclose(double["forces"][: len(atoms)], single["forces"], atol=1e-12)


@pytest.mark.parametrize("small_cell", [False, True])
def test_periodic_supercell(model, small_cell):
    if small_cell:  # a 2.5 Å primitive cell, smaller than the cutoff: many images of each neighbour
        atoms = bulk("Cu", "fcc", a=3.6)
        atoms.rattle(0.0)
        assert min(atoms.cell.cellpar()[:3]) < model.cutoff
    else:
        atoms = alloy_system(seed=2)
    big = atoms * (2, 2, 2)
    small_out, big_out = predict(model, [atoms], stress=True), predict(model, [big], stress=True)
    np.testing.assert_allclose(big_out["energy"][0], 8 * small_out["energy"][0], rtol=1e-10)
    np.testing.assert_allclose(big_out["forces"][: len(atoms)], small_out["forces"], atol=1e-9)
    np.testing.assert_allclose(big_out["stress"], small_out["stress"], atol=1e-10)


def test_partly_periodic_slab_translation(model):
    atoms = alloy_system(seed=4, size=(1, 1, 2))
    atoms.pbc = [True, True, False]
    out = predict(model, [atoms])
    moved = atoms.copy()
    moved.positions += atoms.cell[0] * 0.37 + np.array([0, 0, 5.0])
    moved.wrap()
    np.testing.assert_allclose(predict(model, [moved])["energy"], out["energy"], rtol=1e-10)


def test_batch_equals_individual(model):
    systems = [molecule_system(0), alloy_system(1), Atoms("H", positions=[[0, 0, 0]]),
               alloy_system(2), molecule_system(3)]
    batched = collate([atoms_to_graph(a, model.cutoff) for a in systems])
    out = model(batched, compute_forces=True, compute_stress=True)
    start = 0
    for b, atoms in enumerate(systems):
        alone = predict(model, [atoms], stress=bool(atoms.pbc.all()))
        n = len(atoms)
        np.testing.assert_allclose(out[K.ENERGY][b].item(), alone["energy"][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out[K.FORCES][start:start + n].detach().numpy(), alone["forces"], atol=1e-12)
        if atoms.pbc.all():
            np.testing.assert_allclose(out[K.STRESS][b].detach().numpy(), alone["stress"][0], atol=1e-12)
        start += n


def test_float32_matches_float64(model):
    atoms = molecule_system()
    ref = predict(model, [atoms])
    model32 = model.to(torch.float32)
    graph = collate([atoms_to_graph(atoms, model.cutoff, dtype=torch.float32)])
    out = model32(graph)
    assert out[K.ENERGY].dtype == torch.float32
    np.testing.assert_allclose(out[K.ENERGY].detach().numpy(), ref["energy"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[K.FORCES].detach().numpy(), ref["forces"], atol=1e-3)


def test_zbl_prior_repels_at_short_range():
    from tests.conftest import make_model

    model = make_model("L2-corr2-zbl")
    energies = [predict(model, [Atoms("CuCu", positions=[[0, 0, 0], [r, 0, 0]])])["energy"][0]
                for r in (0.3, 0.5, 0.8)]
    assert energies[0] > energies[1] > energies[2]
    assert energies[0] > 100.0  # eV: a nuclear-repulsion wall, not a learned bump


def test_isolated_atoms_have_exactly_their_reference_energy(model):
    """No neighbours → zero features, zero coordination → exactly E0: dissociation ends at the right limit."""
    spec = model.spec
    for z in (1, 29):
        energy = predict(model, [Atoms([z], positions=[[0.0, 0.0, 0.0]])])["energy"][0]
        assert energy == pytest.approx(spec.e0s.get(z, 0.0), abs=1e-12)
    far = Atoms("HCu", positions=[[0, 0, 0], [0, 0, spec.cutoff + 0.01]])
    out = predict(model, [far])
    assert out["energy"][0] == pytest.approx(spec.e0s.get(1, 0.0) + spec.e0s.get(29, 0.0), abs=1e-12)
    assert np.abs(out["forces"]).max() == 0.0


def test_bounded_basis_keeps_norms_below_the_bound_and_small_features_alike():
    from equiforce.models.potential import bound_norm

    torch.manual_seed(0)
    a = torch.randn(50, 4, 9, dtype=torch.float64) * torch.logspace(-3, 4, 50, dtype=torch.float64)[:, None, None]
    out = bound_norm(a, 2.0)
    norms = torch.linalg.vector_norm(out, dim=-1)
    assert (norms < 2.0).all()
    small = torch.linalg.vector_norm(a, dim=-1) < 0.02
    torch.testing.assert_close(out[small], a[small], rtol=1e-4, atol=0.0)
    # the rescaling is a function of each channel's norm only: direction (so every irrep's orientation) kept
    cos = (out * a).sum(-1) / (norms * torch.linalg.vector_norm(a, dim=-1))
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_bounded_basis_limits_the_energy_of_a_squeezed_pair():
    """Without the bound the many-body product is a polynomial of the atomic basis, and where the radial
    network sees distances it never saw the energy can grow without limit; with it, bounded (ZBL apart)."""
    from equiforce.models import ModelSpec, build_model

    base = dict(elements=[1], channels=8, max_l=1, sh_lmax=2, correlation=3, num_layers=2, radial_mlp=[16],
                cutoff=4.0)
    energies = {}
    for bound in (None, 1.0):
        torch.manual_seed(3)
        model = build_model(ModelSpec(**base, basis_bound=bound), dtype=torch.float64)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(3.0)  # large weights: a network far from its training data
        e = []
        for r in np.linspace(0.2, 3.5, 40):
            graph = collate([atoms_to_graph(Atoms("H2", positions=[[0, 0, 0], [0, 0, r]]), model.cutoff)])
            e.append(float(model(graph, compute_forces=False)[K.ENERGY].detach()))
        energies[bound] = np.abs(np.array(e))
    assert energies[1.0].max() < 1e-2 * energies[None].max()


@pytest.mark.parametrize("name", ["L1-corr3", "L1-corr3-branches"])
def test_edge_chunks_change_nothing(name):
    """Messages a few edges at a time (checkpointed) give the same energy, forces, stress and training
    gradients (the force loss differentiated through the forces) as all edges at once."""
    from tests.conftest import make_model

    model = make_model(name)
    graph = collate([atoms_to_graph(alloy_system(), model.cutoff)])

    def run(chunk):
        model.set_edge_chunk(chunk)
        out = model(graph, compute_forces=True, compute_stress=True, create_graph=True)
        loss = out[K.ENERGY].sum() ** 2 + (out[K.FORCES] ** 2).sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        return out, grads

    full, full_grads = run(None)
    chunked, chunked_grads = run(7)
    model.set_edge_chunk("auto")
    assert graph[K.EDGE_INDEX].shape[1] > 3 * 7  # several chunks
    for key in (K.ENERGY, K.FORCES, K.STRESS):
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-10, atol=1e-12)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        model.set_edge_chunk(0)


def test_automatic_edge_chunks_only_for_large_systems_on_cpu_in_evaluation(monkeypatch):
    import equiforce.models.potential as potential
    from tests.conftest import make_model

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_model("L1-corr3")  # "auto" by default
    graph = collate([atoms_to_graph(alloy_system(), model.cutoff)])
    reference = model(graph)[K.FORCES]
    assert not calls  # a small system: one pass
    monkeypatch.setattr(potential, "AUTO_CHUNK_MIN_EDGES", 10)
    monkeypatch.setattr(potential, "AUTO_EDGE_CHUNK", 9)
    torch.testing.assert_close(model(graph)[K.FORCES], reference, rtol=1e-10, atol=1e-12)
    assert calls  # "large": chunked
    calls.clear()
    model.train()
    model(graph)
    model.eval()
    assert not calls  # training: one pass unless a chunk is set explicitly


def test_a_molecule_in_a_box_has_no_stress(model):
    """Stress needs a periodic direction: a cell kept with pbc all False (a molecule in a box) must give zero, as
    no cell does; a slab (periodic in two directions) keeps its stress."""
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=3)
    atoms.set_cell([10.0, 10.0, 10.0])
    atoms.center()
    boxed = predict(model, [atoms], stress=True)
    assert float(np.abs(boxed[K.STRESS]).max()) == 0.0
    atoms.pbc = [True, True, False]
    assert float(np.abs(predict(model, [atoms], stress=True)[K.STRESS]).max()) > 0.0



def test_atoms_on_top_of_each_other_give_nan_not_a_number_that_looks_valid():
    """The energy's limit as two atoms merge depends on the direction they came from: no value is right, and a
    finite one would run on silently; NaN is what stops MD and the engine bridges with an error."""
    from equiforce.nn.radial import BesselBasis

    basis = BesselBasis(5.0, 8)
    assert torch.isnan(basis(torch.zeros(1, dtype=torch.float64))).all()
    assert torch.isfinite(basis(torch.full((1,), 1e-6, dtype=torch.float64))).all()


def test_float32_and_float64_models_of_one_seed_start_from_the_same_weights():
    """Weights are drawn in float64 and cast: a precision comparison compares precisions, not initialisations."""
    from equiforce.models import ModelSpec, build_model

    spec = ModelSpec(elements=[1, 6, 8], channels=8, max_l=1, num_layers=2, cutoff=4.0)
    torch.manual_seed(0)
    wide = build_model(spec, torch.float64)
    torch.manual_seed(0)
    narrow = build_model(spec, torch.float32)
    for (name, a), b in zip(wide.state_dict().items(), narrow.state_dict().values()):
        if a.is_floating_point():
            assert b.dtype == torch.float32, name
            torch.testing.assert_close(b.double(), a, rtol=1e-6, atol=1e-7)
