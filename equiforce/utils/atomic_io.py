"""Atomic file writes: write to a temporary file, fsync, rename — a crash never leaves half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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


def _stale_temporaries(path: Path) -> list[Path]:
    """Temporary files of earlier writes of ``path`` that a killed process left behind."""
    return list(path.parent.glob(f".{glob_escape(path.name)}.*.tmp"))


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
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        for leftover in stale:
            leftover.unlink(missing_ok=True)
        fsync_directory(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename (or a new file) in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
