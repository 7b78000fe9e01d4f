"""Batches of an epoch, from graphs in memory or from a packed dataset on disk.

In memory the graphs already sit on the device and a batch is one concatenation there.  From a pack
(:class:`~equiforce.data.packed.GraphStore`) each batch is read from the memory-mapped shards, collated on the
host and moved to the device; PyTorch's ``DataLoader`` does the reading, with ``workers`` processes reading
ahead of the training step (0: in the training process; started once per run and kept, not started every
epoch) and pinned memory for a CUDA device.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Iterator, Sequence

import torch

from equiforce.data.graph import Graph, collate, to_device
from equiforce.data.packed import GraphStore


class _EpochBatches:
    """The batch sampler of the run's one DataLoader: this epoch's batches, set before each epoch (indices are
    drawn in the training process, so reader processes that live across epochs see each epoch's order)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


_TRAINER_PID = os.getpid()  # set again by each BatchReader; a forked reader inherits it


def _reader_started(_worker: int) -> None:
    from equiforce.utils.locking import close_inherited_locks

    close_inherited_locks()
    _die_with_trainer()


def _die_with_trainer() -> None:
    """On Linux a reader is killed as soon as its training process dies (``PR_SET_PDEATHSIG``): PyTorch's own
    watchdog notices only every few seconds, and a killed run's readers lingered that long."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != _TRAINER_PID:  # the trainer died before the request took effect
        os._exit(0)


class BatchReader:
    """One per training run: ``epoch(batches)`` gives each batch (a collated graph on ``device``) in order."""

    def __init__(self, graphs: Sequence[Graph], device: torch.device, dtype: torch.dtype, workers: int = 0) -> None:
        global _TRAINER_PID
        self.graphs, self.device, self.dtype = graphs, device, dtype
        self.loader = None
        if isinstance(graphs, GraphStore):
            _TRAINER_PID = os.getpid()
            from torch.utils.data import DataLoader

            self.sampler = _EpochBatches()
            # readers first close the run's inherited lock descriptors (a forked reader would otherwise hold
            # train.lock for seconds after the trainer is killed); forked, not spawned: spawn would import a
            # user's script again in every reader (training from an unguarded script would start over in each)
            self.loader = DataLoader(graphs, batch_sampler=self.sampler, collate_fn=collate, num_workers=workers,
                                     pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers > 0 else None,
                                     worker_init_fn=_reader_started if workers > 0 else None)

    def epoch(self, batches: Sequence[Sequence[int]]) -> Iterator[Graph]:
        if self.loader is None:
            for chunk in batches:
                yield collate([self.graphs[i] for i in chunk])
            return
        self.sampler.batches = [list(chunk) for chunk in batches]
        for batch in self.loader:
            yield to_device(batch, self.device, self.dtype)
