"""Forming training batches by structure count, atom count or edge count.

Why by atoms or edges: memory and time per step scale with edges, so a fixed number of structures gives
uneven steps on mixed data (a 200-atom slab next to a 3-atom molecule).  Packing to a budget keeps every
step about the same size; a structure larger than the budget gets a batch of its own.
"""

from __future__ import annotations

from collections.abc import Sequence


def pack_batches(order: Sequence[int], sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Split ``order`` into consecutive batches whose summed ``sizes`` stay within ``limit``."""
    if limit < 1:
        raise ValueError(f"batch limit must be >= 1, got {limit}")
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in order:
        size = int(sizes[index])
        if current and total + size > limit:
            batches.append(current)
            current, total = [], 0
        current.append(index)
        total += size
    if current:
        batches.append(current)
    return batches


def make_batches(order: Sequence[int], mode: str, batch_size: int, atoms: Sequence[int] | None = None,
                 edges: Sequence[int] | None = None, max_atoms: int | None = None,
                 max_edges: int | None = None) -> list[list[int]]:
    """Batches for one epoch: ``mode`` is ``"structures"``, ``"atoms"`` or ``"edges"``."""
    if mode == "structures":
        return [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    if mode == "atoms":
        if atoms is None or max_atoms is None:
            raise ValueError("batching by atoms needs atom counts and max_batch_atoms")
        return pack_batches(order, atoms, max_atoms)
    if mode == "edges":
        if edges is None or max_edges is None:
            raise ValueError("batching by edges needs edge counts and max_batch_edges")
        return pack_batches(order, edges, max_edges)
    raise ValueError(f"unknown batching mode {mode!r}")
