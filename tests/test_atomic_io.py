"""Atomic writes: the file gets ordinary permissions, and temporaries a killed write left behind are cleaned up."""

from __future__ import annotations

import os
import stat

from equiforce.utils.atomic_io import atomic_write_text


def test_atomic_file_has_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644


def test_temporaries_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    leftover = tmp_path / ".last.eqf.ab12cd.tmp"  # what mkstemp named a write that was killed mid-way
    leftover.write_text("half a model")
    other = tmp_path / ".best.eqf.ef34gh.tmp"  # another file's: left alone
    other.write_text("x")
    atomic_write_text(tmp_path / "last.eqf", "model")
    assert (tmp_path / "last.eqf").read_text() == "model"
    assert not leftover.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.eqf.ef34gh.tmp", "last.eqf"]
