"""Torsional moves: which bonds turn, that a turn keeps the covalent geometry, and that the loop uses them."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, molecule

from equiforce.active.config import parse_learn_config
from equiforce.active.explore import exploration_seeds, md_seed
from equiforce.active.journal import read_journal
from equiforce.active.loop import learn
from equiforce.active.torsions import bond_pairs, dihedral, random_conformer, rotatable_bonds, turn
from equiforce.data.structure import Configuration
from tests.active_helpers import tiny_config
from tests.uq_helpers import single_thread  # noqa: F401 - one thread for tiny models


def test_rotatable_bonds_of_small_molecules():
    ethanol = molecule("CH3CH2OH")  # 0 C (methyl), 1 C, 2 O, 3 H (hydroxyl)
    axes = {frozenset((b.i, b.j)) for b in rotatable_bonds(ethanol)}
    assert axes == {frozenset((0, 1)), frozenset((1, 2))}  # the methyl and the hydroxyl rotor
    hydroxyl = next(b for b in rotatable_bonds(ethanol) if {b.i, b.j} == {1, 2})
    assert hydroxyl.side == (2, 3) and hydroxyl.j == 2  # the smaller side turns: O (on the axis) and its H
    assert rotatable_bonds(molecule("C6H6")) == []  # ring bonds do not turn
    assert rotatable_bonds(molecule("CH4")) == [] and rotatable_bonds(molecule("H2O")) == []
    assert rotatable_bonds(bulk("Cu", cubic=True)) == []  # periodic: no molecules to turn



def _axes(atoms) -> set[frozenset[int]]:
    return {frozenset((b.i, b.j)) for b in rotatable_bonds(atoms)}


def test_double_and_triple_bonds_and_turns_that_move_nothing_are_not_rotatable():
    assert rotatable_bonds(molecule("C2H4")) == []  # C=C: a turn would break the pi bond, not change conformer
    propene = molecule("C3H6_Cs")  # 0 C=1 C, 1 C-5 C (methyl)
    assert _axes(propene) == {frozenset((1, 5))}
    butadiene = molecule("butadiene")  # C0=C1-C2=C3: only the conjugated single bond turns (s-trans / s-cis)
    assert _axes(butadiene) == {frozenset((1, 2))}
    assert rotatable_bonds(molecule("CH3CN")) == []  # C-C#N: the turning side lies on the axis
    assert _axes(molecule("2-butyne")) == {frozenset((0, 1)), frozenset((2, 3))}  # methyls, not C#C
    assert len(rotatable_bonds(molecule("CH3COOH"))) == 2  # methyl and the acid's C-O(H), a saturated O
    assert len(rotatable_bonds(molecule("CH3CONH2"))) == 2  # methyl and the amide C-N (three-coordinate N)
    rng = np.random.default_rng(0)
    for _ in range(5):  # thermal-size displacements do not change the verdict
        shaken = butadiene.copy()
        shaken.positions += rng.normal(scale=0.02, size=shaken.positions.shape)
        assert _axes(shaken) == {frozenset((1, 2))}

def test_a_turn_keeps_bond_lengths_and_angles_and_moves_only_the_dihedral():
    ethanol = molecule("CH3CH2OH")
    bond = next(b for b in rotatable_bonds(ethanol) if {b.i, b.j} == {1, 2})
    before = dihedral(ethanol.positions, 3, 2, 1, 0)
    turned = turn(ethanol, bond, 75.0)
    after = dihedral(turned.positions, 3, 2, 1, 0)
    assert (after - before + 180.0) % 360.0 - 180.0 == pytest.approx(75.0, abs=1e-6)
    side, rest = list(bond.side), [k for k in range(len(ethanol)) if k not in bond.side]
    for group in (side, rest):  # each side moves rigidly
        d0 = ethanol.get_all_distances()[np.ix_(group, group)]
        np.testing.assert_allclose(turned.get_all_distances()[np.ix_(group, group)], d0, atol=1e-10)
    # distances to the axis atoms (bond lengths and angles around it) are unchanged
    for k in side:
        for axis_atom in (bond.i, bond.j):
            assert turned.get_distance(k, axis_atom) == pytest.approx(ethanol.get_distance(k, axis_atom), abs=1e-10)
    np.testing.assert_allclose(turn(ethanol, bond, 360.0).positions, ethanol.positions, atol=1e-10)


def test_random_conformers_make_no_new_bonds_and_are_reproducible():
    butane = molecule("trans-butane")
    bonds = rotatable_bonds(butane)
    assert len(bonds) == 3  # two methyl rotors and the central C-C
    reference = bond_pairs(butane)
    angles = set()
    for seed in range(20):
        made = random_conformer(butane, np.random.default_rng(seed))
        assert made is not None
        out, turned = made
        assert len(turned) == 3 and bond_pairs(out) == reference
        angles.add(round(turned[0]))
    assert len(angles) > 10  # uniform angles, not a few fixed ones
    a = random_conformer(butane, np.random.default_rng(7), all_bonds=False)
    b = random_conformer(butane, np.random.default_rng(7), all_bonds=False)
    assert a is not None and b is not None and len(a[1]) == 1
    np.testing.assert_array_equal(a[0].positions, b[0].positions)
    assert random_conformer(molecule("CH4"), np.random.default_rng(0)) is None


def test_turned_conformers_seed_md_but_distorted_copies_do_not():
    assert md_seed("md:500K") and md_seed("torsion") and md_seed("torsion:120")
    assert not md_seed("rattle") and not md_seed("rattle:0.050") and not md_seed("start")


def test_restart_from_decides_which_labels_start_exploration(tmp_path):
    start = molecule("CH3CH2OH")
    labelled = [Configuration.from_atoms(start, energy=0.0, config_type=source)
                for source in ("md:300K", "torsion:120", "rattle:0.050", "md:800K")]
    labelled[1].positions = labelled[1].positions + 1.0  # tell the turned one apart by its positions

    def picked(setting: str) -> list[int]:
        seeds = exploration_seeds([start], labelled, setting)
        assert seeds[0] is not labelled and np.allclose(seeds[0].positions, start.positions)
        return [len(seeds) - 1, sum(np.allclose(s.positions, labelled[1].positions) for s in seeds)]

    assert picked("start") == [0, 0]
    assert picked("labelled") == [4, 1]
    assert picked("labelled_md") == [3, 1]  # MD snapshots and the turned conformer
    assert picked("labelled_md_snapshots") == [2, 0]  # MD snapshots only
    with pytest.raises(ValueError, match="restart_from"):
        exploration_seeds([start], labelled, "everything")
    config = tiny_config(tmp_path, explore={"restart_from": "labelled_md_snapshots"})
    assert parse_learn_config(config, "t").explore.restart_from == "labelled_md_snapshots"


def test_the_loop_labels_turned_conformers_in_the_bootstrap_and_explores_with_turns(tmp_path):
    """Ethanol with EMT as a stand-in oracle: the bootstrap and each round's candidates include turned copies."""
    config = tiny_config(tmp_path / "run", start={"structures": ["molecule:CH3CH2OH"], "rattle": 3, "torsions": 4},
                         explore={"temperatures": [300], "replicas": 1, "steps": 4, "sample_every": 2, "rattle": 1,
                                  "torsions": 6, "rattle_amplitude": [0.01, 0.02]},
                         select={"per_round": 6, "strategy": "random"}, stop={"max_rounds": 2})
    config["model"]["cutoff"] = 4.0
    learn(parse_learn_config(config), progress=False)
    records = read_journal(tmp_path / "run" / "journal.jsonl")
    boot = next(r for r in records if r["type"] == "selected" and r["round"] == 0)["items"]
    assert [i["source"] for i in boot] == ["start"] + ["rattle"] * 3 + ["torsion"] * 4
    later = [i["source"] for r in records if r["type"] == "selected" and r["round"] > 0 for i in r["items"]]
    explored = [r for r in records if r["type"] == "explored"]
    assert explored and all(r["candidates"] >= 6 for r in explored)  # the turns are candidates
    assert any(s.startswith("torsion:") for s in later)  # and random picks among them get labelled


def test_dihedral_of_known_geometries():
    square = np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.0], [1.0, 0, 1.0]])  # cis: 0°
    assert dihedral(square, 0, 1, 2, 3) == pytest.approx(0.0)
    trans = square.copy()
    trans[3] = [-1.0, 0, 1.0]
    assert abs(dihedral(trans, 0, 1, 2, 3)) == pytest.approx(180.0)
    gauche = square.copy()
    gauche[3] = [np.cos(np.radians(60)), np.sin(np.radians(60)), 1.0]
    assert abs(dihedral(gauche, 0, 1, 2, 3)) == pytest.approx(60.0)
    assert abs(dihedral(molecule("CH3CH2OH").positions, 3, 2, 1, 0)) == pytest.approx(180.0, abs=1.0)  # trans


def test_torsion_coverage_counts_test_frames_and_picks_by_round(tmp_path, capsys):
    """The benchmark helper on a hand-made journal: one trans and one gauche pick, a test file of both."""
    import importlib.util
    import json
    from pathlib import Path

    from ase.io import write

    from equiforce.active.journal import atoms_to_json

    ethanol = molecule("CH3CH2OH")
    hydroxyl = next(b for b in rotatable_bonds(ethanol) if {b.i, b.j} == {1, 2})
    gauche = turn(ethanol, hydroxyl, 120.0)  # 180° → ±60°
    journal = [{"type": "selected", "round": 0, "items": [{"id": "a", "atoms": atoms_to_json(ethanol)}]},
               {"type": "selected", "round": 1, "items": [{"id": "b", "atoms": atoms_to_json(gauche)}]}]
    (tmp_path / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in journal))
    write(tmp_path / "test.xyz", [ethanol, gauche, gauche])
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "torsion_coverage.py"
    spec = importlib.util.spec_from_file_location("torsion_coverage", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), str(tmp_path / "test.xyz")]) == 0
    rows = {line.split()[0] + (line.split()[1] if line.startswith("round") else ""): line.split()[-4:]
            for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["test"] == ["0", "2", "0", "1"] and rows["round0"] == ["0", "0", "0", "1"]
    assert rows["round1"] == ["0", "1", "0", "0"]
    with pytest.raises(SystemExit):  # a directory where the test frames belong: a usage error, not a traceback
        module.main([str(tmp_path), str(tmp_path)])
    assert "not a file of test frames" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main([str(tmp_path / "missing"), str(tmp_path / "test.xyz")])
    assert "no journal.jsonl" in capsys.readouterr().err


def test_a_start_without_rotatable_bonds_is_reported_and_gets_no_turned_copies(tmp_path, capsys):
    config = tiny_config(tmp_path / "run", start={"rattle": 2, "torsions": 3}, stop={"max_rounds": 1},
                         report={"progress": None})  # plain lines on a non-terminal
    learn(parse_learn_config(config))
    assert "has no rotatable bond" in capsys.readouterr().err
    records = read_journal(tmp_path / "run" / "journal.jsonl")
    boot = next(r for r in records if r["type"] == "selected" and r["round"] == 0)["items"]
    assert [i["source"] for i in boot] == ["start", "rattle", "rattle"]  # periodic Cu: nothing to turn
    config = tiny_config(tmp_path / "quiet", start={"rattle": 2}, stop={"max_rounds": 1}, report={"progress": None})
    learn(parse_learn_config(config))
    assert "rotatable" not in capsys.readouterr().err  # the default (torsions on) stays quiet where nothing turns


def test_rotors_of_a_cluster_are_found_per_molecule_and_a_metal_particle_has_none():
    from ase.cluster import Octahedron

    one = molecule("CH3CH2OH")
    two = one.copy()
    two.positions += [10.0, 0.0, 0.0]
    pair = one + two  # not periodic: two molecules, each with its own rotors and sides
    single = {(b.i, b.j, b.side) for b in rotatable_bonds(one)}
    shifted = {(b.i + 9, b.j + 9, tuple(k + 9 for k in b.side)) for b in rotatable_bonds(one)}
    assert {(b.i, b.j, b.side) for b in rotatable_bonds(pair)} == single | shifted
    assert rotatable_bonds(Octahedron("Cu", 7)) == []  # every bond in a ring (found as non-bridges)
