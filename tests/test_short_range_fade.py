"""``short_range_fade``: below the shortest distance the data have for an element pair, the network lets go of
the pair and only the ZBL prior (and the per-atom shift) act.  It must leave every pair beyond its range exactly
as it was (training on data beyond the fade is unchanged), hide a pair below its range from the network
completely, and be smooth in between (the physics suite runs it through its symmetry and derivative tests,
conftest's ``L2-corr2-zbl``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from equiforce.data import atoms_to_graph, collate
from equiforce.data.graph import config_to_graph
from equiforce.data.stats import closest_pairs
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError
from equiforce.models import ModelSpec, build_model
from equiforce.models.file import load_model, save_model
from equiforce.models.potential import with_short_range_fade, with_zbl_range
from equiforce.models.spec import AUTO_FADE_FRACTIONS, fade_from_closest, pair_key, pair_numbers
from equiforce.train.trainer import train_configs

FADE = {"H-C": (0.7, 0.95), "C-O": (1.0, 1.3), "H-H": (1.2, 1.6)}


def fade_model(fade=None, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = ModelSpec(**{**dict(elements=[1, 6, 8], channels=6, max_l=1, sh_lmax=2, correlation=2, num_layers=2,
                               radial_mlp=[12], cutoff=4.0, zbl=True, energy_shift=-2.0, avg_num_neighbors=4.0,
                               shift_gate="bonds", short_range_fade=fade), **options})
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def outputs(model, atoms: Atoms) -> dict[str, np.ndarray]:
    out = model(collate([atoms_to_graph(atoms, model.cutoff)]), compute_forces=True)
    return {k: v.detach().numpy() for k, v in out.items()}


def dimer(a: str, b: str, r: float) -> Atoms:
    return Atoms(a + b, positions=[[0.0, 0.0, 0.0], [0.0, 0.0, r]])


def energy(model, atoms: Atoms) -> float:
    return float(outputs(model, atoms)["energy"][0])


def assert_forces_are_the_slope(model, a: str, b: str, distances) -> None:
    """The dimer's force on its second atom equals minus the central difference of the energy (float64)."""
    h = 1e-5
    for r in distances:
        forces = outputs(model, dimer(a, b, r))["forces"]
        slope = (energy(model, dimer(a, b, r + h)) - energy(model, dimer(a, b, r - h))) / (2 * h)
        assert forces[1, 2] == pytest.approx(-slope, rel=1e-6, abs=1e-8)


def test_pair_keys_and_spec_validation():
    assert pair_numbers("C-H") == pair_numbers("H-C") == (1, 6) and pair_key(6, 1) == "H-C"
    spec = ModelSpec(elements=[1, 6], cutoff=4.0, short_range_fade={"C-H": (0.7, 0.9)})
    assert ModelSpec.model_validate_json(spec.model_dump_json()).short_range_fade == {"C-H": (0.7, 0.9)}
    bad = [({"CH": (0.7, 0.9)}, "pair of element symbols"), ({"C-N": (0.7, 0.9)}, "not in `elements`"),
           ({"C-H": (0.9, 0.7)}, "r_in < r_out"), ({"C-H": (0.7, 4.5)}, "cutoff"),
           ({"C-H": (0.7, 0.9), "H-C": (0.6, 0.8)}, "given twice")]
    for fade, message in bad:
        with pytest.raises(ValueError, match=message):
            ModelSpec(elements=[1, 6], cutoff=4.0, short_range_fade=fade)


def test_pairs_beyond_their_range_are_exactly_unchanged():
    """Every pair of ethanol lies beyond FADE's ranges: the same weights give bit-identical energies and forces."""
    atoms = molecule("CH3CH2OH")
    plain, faded = fade_model(None), fade_model(FADE)
    assert closest_pairs([atoms_to_graph(atoms, 4.0)])[(1, 6)] > FADE["H-C"][1]
    ref, new = outputs(plain, atoms), outputs(faded, atoms)
    np.testing.assert_array_equal(new["energy"], ref["energy"])
    np.testing.assert_array_equal(new["forces"], ref["forces"])


def test_a_pair_below_its_range_is_invisible_to_the_network():
    model = fade_model(FADE)
    graph = collate([atoms_to_graph(dimer("C", "H", 0.6), model.cutoff)])
    assert all(torch.count_nonzero(d) == 0 for d in model.descriptors(graph))
    # what is left is the E0s, the gated shift and the ZBL repulsion: the energy rises steeply as the pair closes
    energies = [float(outputs(model, dimer("C", "H", r))["energy"][0]) for r in (0.3, 0.4, 0.5, 0.6)]
    assert np.all(np.diff(energies) < 0)
    # an unlisted pair (C-C) is never faded
    graph = collate([atoms_to_graph(dimer("C", "C", 0.6), model.cutoff)])
    assert any(torch.count_nonzero(d) > 0 for d in model.descriptors(graph))


def test_forces_are_the_derivative_of_the_energy_across_the_fade():
    assert_forces_are_the_slope(fade_model(FADE), "C", "H", np.linspace(0.65, 1.0, 8))  # below, in, beyond H-C


def test_zbl_range_fade_hands_each_listed_pair_from_the_network_to_the_prior():
    """``zbl_range: fade``: beyond a pair's r_out the network alone (as without the prior), below r_in the prior
    alone (as with the covalent range), and pairs without a fade range keep the covalent range."""
    covalent = fade_model(FADE)  # the same weights in all three: the ZBL prior has none
    partitioned = fade_model(FADE, zbl_range="fade")
    bare = fade_model(FADE, zbl=False)
    assert covalent.spec.zbl_range == "covalent" and ModelSpec(elements=[1]).zbl_range == "covalent"

    beyond = dimer("C", "H", 1.0)  # past the H-C range (0.7, 0.95), short of the covalent sum (1.07 Å)
    assert energy(partitioned, beyond) == energy(bare, beyond)
    assert energy(covalent, beyond) > energy(bare, beyond) + 1e-3  # there the covalent prior still repels
    below = dimer("C", "H", 0.6)
    assert energy(partitioned, below) == pytest.approx(energy(covalent, below), rel=1e-12)
    assert energy(covalent, below) > energy(bare, below) + 1.0
    inside = dimer("C", "H", 0.8)
    assert energy(bare, inside) < energy(partitioned, inside) < energy(covalent, inside)
    unlisted = dimer("C", "C", 1.2)  # no C-C range in FADE
    assert energy(partitioned, unlisted) == pytest.approx(energy(covalent, unlisted), rel=1e-12)
    assert energy(covalent, unlisted) > energy(bare, unlisted) + 1e-3
    assert_forces_are_the_slope(partitioned, "C", "H", np.linspace(0.62, 1.1, 9))  # across the handover


def test_closest_pairs_sees_periodic_images():
    cu = bulk("Cu", "fcc", a=3.6)  # one atom: every pair is an image
    graph = atoms_to_graph(cu, 4.0)
    assert closest_pairs([graph]) == {(29, 29): pytest.approx(3.6 / np.sqrt(2))}
    atoms = molecule("CH3CH2OH")
    d = atoms.get_all_distances()
    h, c = atoms.numbers == 1, atoms.numbers == 6
    closest = closest_pairs([atoms_to_graph(atoms, 4.0)])
    assert closest[(1, 6)] == pytest.approx(d[np.ix_(h, c)].min())
    fade = fade_from_closest(closest)
    lo, hi = AUTO_FADE_FRACTIONS
    assert fade["H-C"] == pytest.approx((lo * closest[(1, 6)], hi * closest[(1, 6)]))


def test_with_short_range_fade_keeps_the_weights(tmp_path):
    plain = fade_model(None)
    faded = with_short_range_fade(plain, FADE)
    assert faded.spec.short_range_fade == FADE and plain.spec.short_range_fade is None
    for (name, a), (_, b) in zip(plain.state_dict().items(), faded.state_dict().items()):
        assert torch.equal(a, b), name
    save_model(faded, tmp_path / "m.eqf")
    loaded = load_model(tmp_path / "m.eqf")
    atoms = dimer("C", "H", 0.8)
    np.testing.assert_array_equal(outputs(loaded, atoms)["forces"], outputs(faded, atoms)["forces"])


def _labelled(atoms: Atoms, seed: int) -> Configuration:
    rng = np.random.default_rng(seed)
    return Configuration.from_atoms(atoms, energy=float(rng.normal()), forces=rng.normal(size=(len(atoms), 3)))


TINY_MODEL = dict(channels=4, max_l=1, sh_lmax=2, correlation=2, num_layers=1, radial_mlp=[8], cutoff=3.0, zbl=True)
TINY_TRAINING = dict(epochs=1, batch_size=2, device="cpu", dtype="float64")


def test_training_fades_below_the_closest_pairs_of_its_data(tmp_path):
    frames = []
    for k in range(6):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=k)
        frames.append(_labelled(atoms, k))
    e0s = {1: -1.0, 8: -2.0}
    result = train_configs(frames, None, TINY_MODEL, TINY_TRAINING, tmp_path / "auto", valid_fraction=0.34,
                           progress=False, e0s=e0s)
    fade = load_model(result["best_model"]).spec.short_range_fade
    closest = closest_pairs([config_to_graph(c, 3.0, torch.float64) for c in frames])  # train and valid
    expected = fade_from_closest(closest)
    assert set(fade) == set(expected) == {"H-H", "H-O"}  # one O per frame: no O-O pair, nothing to fade
    for key in fade:
        assert fade[key] == pytest.approx(expected[key])
    for name, change in {"off": {"short_range_fade": None}, "no_zbl": {"zbl": False}}.items():
        # "auto" without the ZBL prior is off: nothing would be left to repel two atoms below the fade
        off = train_configs(frames, None, {**TINY_MODEL, **change}, TINY_TRAINING, tmp_path / name, progress=False,
                            e0s=e0s)
        assert load_model(off["best_model"]).spec.short_range_fade is None, name
    with pytest.raises(ConfigError, match="short_range_fade"):
        train_configs(frames, None, {**TINY_MODEL, "short_range_fade": {"H-N": (0.5, 0.8)}}, TINY_TRAINING,
                      tmp_path / "bad", progress=False, e0s=e0s)


def test_zbl_range_handover_gives_the_prior_exactly_what_the_network_lets_go():
    """``zbl_range: handover``: like ``fade`` beyond r_out (the network alone), but without the covalent switch, so
    a pair whose r_in lies beyond its covalent-radius sum (H-H: 0.62 Å) is not left with neither acting."""
    fade, handover = fade_model(FADE, zbl_range="fade"), fade_model(FADE, zbl_range="handover")
    bare = fade_model(FADE, zbl=False)
    ethanol = molecule("CH3CH2OH")  # every pair beyond its range: bit for bit the same model as `fade`
    for key in ("energy", "forces"):
        np.testing.assert_array_equal(outputs(handover, ethanol)[key], outputs(fade, ethanol)[key])
    gap = dimer("H", "H", 1.0)  # below H-H's r_in (1.2), beyond its covalent sum: `fade` leaves nothing there
    assert energy(fade, gap) == pytest.approx(energy(bare, gap), abs=1e-12)  # the network is gone, so is the prior
    assert energy(handover, gap) > energy(bare, gap) + 0.1
    inside = dimer("H", "H", 1.4)
    assert energy(bare, inside) < energy(handover, inside)
    assert energy(handover, dimer("H", "H", 1.6)) == energy(bare, dimer("H", "H", 1.6))
    unlisted = dimer("C", "C", 1.2)  # no C-C range: the covalent prior, as in the other ranges
    assert energy(handover, unlisted) == pytest.approx(energy(fade_model(FADE), unlisted), rel=1e-12)
    assert_forces_are_the_slope(handover, "H", "H", np.linspace(0.5, 1.7, 13))  # across the handover


def test_with_zbl_range_switches_only_between_ranges_that_keep_the_trained_model():
    model = fade_model(FADE, zbl_range="fade")
    moved = with_zbl_range(model, "handover")
    assert moved.spec.zbl_range == "handover" and moved.spec.short_range_fade == model.spec.short_range_fade
    for name, value in model.state_dict().items():
        torch.testing.assert_close(moved.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only 'fade' <-> 'handover'"):
        with_zbl_range(model, "covalent")
    with pytest.raises(ValueError, match="only 'fade' <-> 'handover'"):
        with_zbl_range(fade_model(None, zbl_range="fade"), "handover")  # no fade range: the prior would move


@pytest.mark.parametrize("check", ["test_rotation_reflection_translation",
                                   "test_forces_are_finite_difference_of_energy",
                                   "test_stress_is_strain_derivative_of_energy", "test_smooth_at_cutoff",
                                   "test_periodic_supercell"])
def test_handover_model_passes_the_physics_suite(check):
    """conftest's ``L2-corr2-zbl`` (ranges its test structures straddle) with ``zbl_range: handover``."""
    from tests import test_physics
    from tests.conftest import make_model

    model = with_zbl_range(make_model("L2-corr2-zbl"), "handover")
    test = getattr(test_physics, check)
    if check == "test_rotation_reflection_translation":
        test(model, reflect=True)
    elif check == "test_periodic_supercell":
        test(model, small_cell=False)
    else:
        test(model)
