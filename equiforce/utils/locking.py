"""One process per run directory: an exclusive ``flock`` that the kernel releases when the process ends.

Two processes on the same output (a second terminal, a requeued batch job whose first copy still runs) would
interleave their logs and overwrite each other's checkpoints; the second is refused at the start instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from equiforce.errors import EquiforceError


class RunInUseError(EquiforceError):
    """Another process holds the run's lock."""


_HELD: set[int] = set()  # this process's lock descriptors (a forked child inherits them: close_inherited_locks)


def exclusive_lock(path: str | os.PathLike, what: str) -> int | None:
    """A descriptor holding an exclusive lock on ``path`` (created if needed); ``None`` where the platform has no
    ``flock``.  ``what`` names the run in the refusal ("training in runs/x")."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RunInUseError(f"{what} is in use by another process (it holds {path}): one process per run; wait for "
                            "the other to end or stop it") from None
    _HELD.add(fd)
    return fd


def release(fd: int | None) -> None:
    """Let go of a lock taken by :func:`exclusive_lock` (closing the descriptor releases it)."""
    if fd is not None:
        _HELD.discard(fd)
        os.close(fd)


def close_inherited_locks() -> None:
    """In a forked helper process (a DataLoader reader): close the descriptors of the parent's locks. A ``flock``
    lives while any descriptor of it is open, so a reader keeping them would hold the run for as long as it
    outlives a killed trainer, and refuse the immediate restart of a requeued job."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


@contextmanager
def held_lock(path: str | os.PathLike, what: str, take: bool = True) -> Iterator[None]:
    """:func:`exclusive_lock` for the ``with`` block (``take=False``: no lock, e.g. on ranks other than 0)."""
    fd = exclusive_lock(path, what) if take else None
    try:
        yield
    finally:
        release(fd)
