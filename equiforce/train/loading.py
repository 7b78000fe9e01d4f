"""Batches of an epoch, from graphs in memory or from a packed dataset on disk.

In memory the graphs already sit on the device and a batch is one concatenation there.  From a pack
(:class:`~equiforce.data.packed.GraphStore`) each batch is read from the memory-mapped shards, collated on the
host and moved to the device; PyTorch's ``DataLoader`` does the reading, with ``workers`` processes reading
ahead of the training step (0: in the training process) and pinned memory for a CUDA device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from equiforce.data.graph import Graph, collate, to_device
from equiforce.data.packed import GraphStore


def batches_of(graphs: Sequence[Graph], batches: Sequence[Sequence[int]], device: torch.device, dtype: torch.dtype,
               workers: int = 0) -> Iterator[Graph]:
    """One batch (a collated graph on ``device``) per entry of ``batches`` (positions into ``graphs``), in order."""
    if not isinstance(graphs, GraphStore):
        for chunk in batches:
            yield collate([graphs[i] for i in chunk])
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(graphs, batch_sampler=[list(chunk) for chunk in batches], collate_fn=collate,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if workers > 0 else None)
    for batch in loader:
        yield to_device(batch, device, dtype)
