"""Configurations → graphs (dicts of tensors) and batching of many graphs into one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from equiforce.data import keys as K
from equiforce.data.neighbors import check_cell, neighbor_list
from equiforce.data.structure import Configuration
from equiforce.errors import DataError

Graph = dict[str, torch.Tensor]

MIN_DISTANCE = 0.1  # Å; closer atoms are almost certainly a duplicated atom in the input


def edge_vectors(positions: torch.Tensor, edge_index: torch.Tensor, shifts: torch.Tensor, cell: torch.Tensor,
                 batch: torch.Tensor) -> torch.Tensor:
    """Edge vectors ``r_j - r_i + S·cell`` (``[E, 3]``), with each edge's cell that of its centre's system
    (``batch``): the one definition of edge geometry that the model, MD, exploration and data statistics share."""
    offsets = torch.einsum("ei,eij->ej", shifts, cell[batch[edge_index[0]]])
    return positions[edge_index[1]] - positions[edge_index[0]] + offsets


def sum_per_graph(values: torch.Tensor, batch: torch.Tensor, num_graphs: int, dim: int = 0) -> torch.Tensor:
    """Sum per-atom ``values`` (atoms along ``dim``) into their graphs.

    A batch of one graph takes a plain sum: Inductor's CPU code for an ``index_add`` into a single element
    fails to compile, and a compiled model traces a batch of one graph on its own (models/compiled.py).
    """
    if num_graphs == 1:
        return values.sum(dim, keepdim=True)
    shape = list(values.shape)
    shape[dim] = num_graphs
    return values.new_zeros(shape).index_add(dim, batch, values)


def stress_volume(graph: Graph, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per structure ``[B]``: whether it has a stress — a periodic direction (``pbc``, where the graph says) and a
    volume; a molecule in a box has neither direction — and its volume, made safe to divide by (1 where not)."""
    volume = torch.linalg.det(cell).abs()
    periodic = volume > 0
    if K.PBC in graph:
        periodic = periodic & graph[K.PBC].reshape(cell.shape[0], 3).any(-1)
    return periodic, torch.where(periodic, volume, torch.ones_like(volume))


def config_to_graph(config: Configuration, cutoff: float, dtype: torch.dtype = torch.float64) -> Graph:
    """Build the neighbour graph of one configuration, with its labels.

    Raises :class:`DataError` naming the file and frame for unusable geometry.
    """
    where = {"source": config.source, "frame": config.frame}
    if config.n_atoms == 0:
        raise DataError("frame has no atoms", field="numbers", **where)
    if not np.all(np.isfinite(config.positions)):
        raise DataError("positions contain NaN or infinity", field="positions", **where)
    problem = check_cell(config.cell, config.pbc, cutoff)
    if problem is not None:
        raise DataError(problem, field="cell", **where)
    i, j, shifts = neighbor_list(config.positions, config.cell, config.pbc, cutoff)
    if len(i):
        vec = config.positions[j] - config.positions[i] + shifts @ config.cell
        dist = np.linalg.norm(vec, axis=1)
        bad = int(np.argmin(dist))
        if dist[bad] < MIN_DISTANCE:
            raise DataError(f"atoms {i[bad]} and {j[bad]} are {dist[bad]:.3g} Å apart (same position?)",
                            field="positions", **where)
    n = config.n_atoms
    graph: Graph = {
        K.POSITIONS: torch.as_tensor(config.positions, dtype=dtype),
        K.NUMBERS: torch.as_tensor(config.numbers, dtype=torch.long),
        K.CELL: torch.as_tensor(config.cell, dtype=dtype).unsqueeze(0),
        K.PBC: torch.as_tensor(config.pbc, dtype=torch.bool).unsqueeze(0),
        K.EDGE_INDEX: torch.as_tensor(np.stack([i, j]), dtype=torch.long),
        K.SHIFTS: torch.as_tensor(shifts, dtype=dtype),
        K.N_ATOMS: torch.tensor([n], dtype=torch.long),
        K.WEIGHT: torch.tensor([config.weight], dtype=dtype),
    }
    graph[K.ENERGY] = torch.tensor([config.energy if config.energy is not None else 0.0], dtype=dtype)
    graph[K.HAS_ENERGY] = torch.tensor([float(config.energy is not None)], dtype=dtype)
    forces = config.forces if config.forces is not None else np.zeros((n, 3))
    graph[K.FORCES] = torch.as_tensor(forces, dtype=dtype)
    graph[K.HAS_FORCES] = torch.tensor([float(config.forces is not None)], dtype=dtype)
    stress = config.stress if config.stress is not None else np.zeros((3, 3))
    graph[K.STRESS] = torch.as_tensor(stress, dtype=dtype).unsqueeze(0)
    graph[K.HAS_STRESS] = torch.tensor([float(config.stress is not None)], dtype=dtype)
    # unlabelled graphs add nothing (a 1,000-atom cell would otherwise carry 9 million zeros)
    hessian = config.hessian.reshape(-1) if config.hessian is not None else np.zeros(0)
    graph[K.HESSIAN_LABEL] = torch.as_tensor(hessian, dtype=dtype)
    graph[K.HAS_HESSIAN] = torch.tensor([float(config.hessian is not None)], dtype=dtype)
    return graph


def atoms_to_graph(atoms, cutoff: float, dtype: torch.dtype = torch.float64) -> Graph:
    """Graph of an ``ase.Atoms`` without labels (for inference)."""
    return config_to_graph(Configuration.from_atoms(atoms, source="<atoms>"), cutoff, dtype)


def collate(graphs: Sequence[Graph]) -> Graph:
    """Concatenate graphs into one disconnected graph with ``batch`` and ``ptr`` indices.

    Offsets come from tensor shapes (host metadata), never from tensor values, so batching graphs that
    already live on a GPU costs no device-to-host synchronisation.
    """
    if len(graphs) == 0:
        raise ValueError("cannot batch an empty list of graphs")
    if not isinstance(graphs, list | tuple):  # a lazy sequence (a packed dataset's slice): read each graph once
        graphs = list(graphs)
    sizes = [int(g[K.POSITIONS].shape[0]) for g in graphs]
    device = graphs[0][K.POSITIONS].device
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    out: Graph = {}
    for key in graphs[0]:
        if key == K.EDGE_INDEX:
            out[key] = torch.cat([g[key] + offsets[b] for b, g in enumerate(graphs)], dim=1)
        elif key in (K.BATCH, K.PTR):
            continue  # re-derived below (collating batches of batches works)
        else:
            out[key] = torch.cat([g[key] for g in graphs], dim=0)
    n_graphs = [int(g[K.N_ATOMS].shape[0]) for g in graphs]
    if all(k == 1 for k in n_graphs):
        out[K.BATCH] = torch.repeat_interleave(torch.arange(len(graphs), device=device),
                                               torch.tensor(sizes, device=device), output_size=offsets[-1])
        out[K.PTR] = torch.tensor(offsets, dtype=torch.long, device=device)
    else:  # some inputs are batches themselves: derive from their atom counts
        n_atoms = out[K.N_ATOMS].to(device)
        out[K.BATCH] = torch.repeat_interleave(torch.arange(len(n_atoms), device=device), n_atoms,
                                               output_size=offsets[-1])
        ptr = torch.zeros(len(n_atoms) + 1, dtype=torch.long, device=device)
        ptr[1:] = torch.cumsum(n_atoms, 0)
        out[K.PTR] = ptr
    return out


def to_device(graph: Graph, device: torch.device | str, dtype: torch.dtype | None = None) -> Graph:
    """Move a graph to a device, casting floating tensors to ``dtype`` when given."""
    out = {}
    for key, value in graph.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype=dtype)
        out[key] = value.to(device, non_blocking=True)
    return out
