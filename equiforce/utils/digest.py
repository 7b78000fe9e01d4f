"""Content digests of files: which data a model was trained on, which model a checkpointed run belongs to."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (data files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graphs_sha256(graphs: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 of graphs' contents in order (every tensor, keys sorted, in float64 or its own integer type): the
    structures, labels and weights a training run sees, so a resumed run can tell it is given the same data.  A
    packed dataset answers from its own content digest (reading every structure would cost a pass over the disk)."""
    content = getattr(graphs, "content_sha256", None)
    if callable(content):
        return content()
    digest = hashlib.sha256()
    for graph in graphs:
        for key in sorted(graph):
            value = graph[key]
            if not isinstance(value, torch.Tensor):
                continue
            tensor = value.detach().cpu()
            if tensor.is_floating_point():
                tensor = tensor.double()
            digest.update(key.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
