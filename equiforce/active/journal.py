"""The run's journal: an append-only JSON-lines file, one fsync'ed write per record.

Why a journal: an oracle call can cost CPU-hours, so its result is written to disk the moment it arrives
and a run killed at any point (``kill -9`` included) resumes from what is on disk without repeating a
finished call.  Each record is one ``os.write`` of a complete line to a file opened with ``O_APPEND``,
followed by ``fsync``; a process killed mid-write leaves at most a final line without its newline, which
was never acknowledged and is cut off when the journal is next opened.  A damaged line *before* the end
is an error (the file was edited or the disk corrupted it): nothing is silently skipped.

Records are plain JSON (no pickle) so a journal can be read by anything.  Structures are stored as
``{"numbers", "positions", "cell", "pbc"}`` with full float precision (``repr`` round-trips exactly).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from equiforce.errors import EquiforceError
from equiforce.utils.atomic_io import fsync_path
from equiforce.utils.jsonable import strict_json
from equiforce.utils.locking import RunInUseError, exclusive_lock, release

JOURNAL = "journal.jsonl"


class JournalError(EquiforceError):
    """A journal that cannot be read back (damaged before its last line)."""


def atoms_to_json(atoms: Atoms) -> dict[str, Any]:
    return {"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
            "cell": np.asarray(atoms.cell).tolist(), "pbc": [bool(p) for p in atoms.pbc]}


def atoms_from_json(data: dict[str, Any]) -> Atoms:
    return Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])


def _parse(lines: list[bytes], path: Path) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise JournalError(f"{path}: line {n} is not valid JSON ({err}); the journal was damaged") from None
        if not isinstance(record, dict) or "type" not in record:
            raise JournalError(f"{path}: line {n} is not a journal record")
        yield record


def read_journal(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record, in order (a final line cut by a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    # the piece after the last newline is empty, or a record whose write was cut short
    return list(_parse([line for line in lines[:-1] if line.strip()], path))


class Journal:
    """Append-only record of everything a run decided and every oracle result it received.

    One writer at a time: an exclusive lock (``journal.jsonl.lock``, released by the kernel when the process
    ends, ``kill -9`` included) keeps a second process on the same run — another terminal, a requeued batch
    job whose first copy still runs — from paying for every oracle call twice and interleaving records.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = exclusive_lock(self.path.with_name(self.path.name + ".lock"), str(self.path.parent))
        except RunInUseError as err:
            raise JournalError(str(err)) from None
        self._repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        fsync_path(self.path.parent)

    def _repair(self) -> None:
        """Cut a final line left without its newline by a crash mid-write (it was never acknowledged)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "rb+") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and make it durable before returning."""
        if "type" not in record:
            raise ValueError("a journal record needs a 'type'")
        line = (json.dumps(strict_json(record), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # a regular file takes the whole line in one write; loop in case it does not
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def records(self) -> list[dict[str, Any]]:
        return read_journal(self.path)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        release(self._lock)
        self._lock = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
