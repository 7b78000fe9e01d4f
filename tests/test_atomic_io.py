"""Atomic writes: the file gets ordinary permissions, and temporaries a killed write left behind are cleaned up."""

from __future__ import annotations

import os
import stat
import time

from equiforce.utils.atomic_io import atomic_write_text


def test_atomic_file_has_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "summary.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == 0o644


def test_temporaries_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    def temporary(name: str, age_s: float):
        path = tmp_path / name
        path.write_text("x")
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    leftover = temporary(".last.eqf.ab12cd_z.tmp", 3600)  # mkstemp's name of a write killed an hour ago
    in_flight = temporary(".last.eqf.qq12cd_z.tmp", 1)  # a write going on right now: left alone
    longer_name = temporary(".last.eqf.next.ab12cd_z.tmp", 3600)  # another file's (last.eqf.next): left alone
    other = temporary(".best.eqf.ef34gh_y.tmp", 3600)  # another file's: left alone
    atomic_write_text(tmp_path / "last.eqf", "model")
    assert (tmp_path / "last.eqf").read_text() == "model"
    assert not leftover.exists() and in_flight.exists() and longer_name.exists() and other.exists()
