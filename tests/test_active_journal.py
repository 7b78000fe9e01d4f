"""The journal: durable appends, a record cut by a crash is dropped, damage elsewhere is an error."""

from __future__ import annotations

import json

import pytest
from ase.build import molecule

from equiforce.active.journal import Journal, JournalError, atoms_from_json, atoms_to_json, read_journal


def test_append_and_read_back_in_order(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        for k in range(5):
            journal.append({"type": "label", "id": f"x{k}", "energy": -1.0 * k, "forces": [[0.1, 0.2, 0.3]]})
    records = read_journal(path)
    assert [r["id"] for r in records] == [f"x{k}" for k in range(5)]
    assert records[3]["energy"] == -3.0
    assert path.read_bytes().endswith(b"\n")


def test_record_without_type_is_refused(tmp_path):
    with Journal(tmp_path / "j.jsonl") as journal, pytest.raises(ValueError, match="type"):
        journal.append({"id": "x"})


def test_line_cut_by_a_crash_is_dropped_and_appending_goes_on(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append({"type": "label", "id": "a"})
    with open(path, "ab") as handle:  # what a kill in the middle of a write leaves behind
        handle.write(b'{"type": "label", "id": "b", "ener')
    assert [r["id"] for r in read_journal(path)] == ["a"]
    with Journal(path) as journal:  # reopening cuts the partial record, the next one starts on a clean line
        journal.append({"type": "label", "id": "c"})
    assert [r["id"] for r in read_journal(path)] == ["a", "c"]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"type": "label", "id": "a"}\nnot json\n{"type": "label", "id": "b"}\n')
    with pytest.raises(JournalError, match="line 2"):
        read_journal(path)


def test_structures_round_trip_exactly():
    atoms = molecule("CH3CH2OH")
    atoms.positions += 1e-13 * 3.0  # digits that a fixed-precision format would lose
    back = atoms_from_json(json.loads(json.dumps(atoms_to_json(atoms))))
    assert (back.positions == atoms.positions).all() and (back.numbers == atoms.numbers).all()
    assert (back.pbc == atoms.pbc).all()


def test_one_writer_at_a_time(tmp_path):
    """A second process (or object) on the same run would pay for every oracle call twice."""
    path = tmp_path / "journal.jsonl"
    with Journal(path):
        with pytest.raises(JournalError, match="in use by another process"):
            Journal(path)
    with Journal(path) as journal:  # released on close
        journal.append({"type": "label", "id": "a"})


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """Plain JSON has no NaN: the journal must parse in any JSON reader."""
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append({"type": "evaluated", "valid": {"spearman": float("nan"), "mae": 1.5, "x": [float("inf")]}})
    line = path.read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line)["valid"] == {"spearman": None, "mae": 1.5, "x": [None]}
