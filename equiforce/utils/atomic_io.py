"""Atomic file writes: write to a temporary file, fsync, rename — a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from equiforce.utils.jsonable import strict_json


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``os.umask`` sets it to read it,
    which another thread creating a file at that moment would feel)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


STALE_AFTER_S = 60.0  # a temporary this old is a killed write's, not one in flight


def _stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of earlier writes of ``path`` (``mkstemp``'s exact names: not those of ``path.name.next``)
    that a killed process left behind, older than a write in flight could be."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    now = time.time()
    stale = []
    for candidate in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        try:
            old = now - candidate.stat().st_mtime > STALE_AFTER_S
        except OSError:  # gone meanwhile
            continue
        if pattern.fullmatch(candidate.name) and old:
            stale.append(candidate)
    return stale


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``.

    The file gets the permissions an ordinary ``open`` would give it (``mkstemp`` makes it 0600, which would hide
    models and logs from a shared group directory), and temporary files that an earlier write killed mid-way
    left behind are removed once this one is in place (each can be as large as a checkpoint).  One writer per
    path at a time (the trainer, MD and learn runs hold a lock on their directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale = _stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: a writer may replace the file (safetensors does)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        for leftover in stale:
            leftover.unlink(missing_ok=True)
        fsync_path(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or directory by name (a directory: its renames and new files become durable; a file:
    for writers that do not expose their descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as indented plain JSON (NaN and infinity as null: any reader parses it), written atomically."""
    atomic_write_text(path, json.dumps(strict_json(value), indent=2, default=float, allow_nan=False) + "\n")
