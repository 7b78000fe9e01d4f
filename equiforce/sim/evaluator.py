"""Energies, forces and stress of a whole :class:`SimState` in one model call, with a reused neighbour list."""

from __future__ import annotations

import torch
from torch import nn

from equiforce.data import keys as K
from equiforce.data.graph import edge_vectors
from equiforce.sim.neighbors import VerletNeighborList
from equiforce.sim.state import SimState

Outputs = dict[str, torch.Tensor]


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def state_graph(state: SimState, edge_index: torch.Tensor, shifts: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's graph contract for every system of the state (see ``equiforce.data.keys``)."""
    return {
        K.POSITIONS: state.positions,
        K.NUMBERS: state.numbers,
        K.CELL: state.cell,
        K.PBC: state.pbc,
        K.EDGE_INDEX: edge_index,
        K.SHIFTS: shifts,
        K.BATCH: state.system,
        K.PTR: state.ptr,
        K.N_ATOMS: state.n_atoms,
    }


class BatchEvaluator:
    """Call a potential on a batched state.

    ``model`` is any module with ``cutoff`` and the :class:`~equiforce.models.Potential` forward contract
    (``forward(graph, compute_forces, compute_stress) -> {energy, forces, stress, virial}``).  The neighbour
    list is kept between calls and rebuilt only when the skin criterion says so.
    """

    def __init__(self, model: nn.Module, skin: float = 0.5, check_interval: int | str = "auto",
                 trim: bool | None = None, compile: bool | str = False) -> None:
        """``compile=True``: energies, forces (and σ, for a model with uncertainty heads) through one traced,
        compiled graph (:class:`~equiforce.models.compiled.CompiledForces`; plain potentials and potentials
        with heads, no edge chunks; ensembles run uncompiled); a string names the ``torch.compile`` backend
        (default "inductor")."""
        self.model = model
        self.forward: nn.Module = model
        if compile:
            from equiforce.models.compiled import CompiledForces  # refuses a model it cannot compile

            self.forward = CompiledForces(model, compile if isinstance(compile, str) else "inductor")
        self.neighbors = VerletNeighborList(float(model.cutoff), skin=skin, check_interval=check_interval)
        self.calls = 0
        self.trim = trim

    def compile_report(self) -> dict[str, object] | None:
        """``compiled``, ``compile_s`` (and ``compile_error`` after a fallback); None when not compiling."""
        report = getattr(self.forward, "report", None)
        return report() if report is not None else None

    def edges(self, state: SimState) -> tuple[torch.Tensor, torch.Tensor]:
        """The reused list, trimmed to the cutoff when ``trim`` (default: on CPU, where the model's cost per
        edge dominates; on CUDA the skin's extra edges are cheaper than the host sync that trimming needs)."""
        edge_index, shifts = self.neighbors.edge_index, self.neighbors.shifts
        trim = self.trim if self.trim is not None else state.device.type == "cpu"
        if not trim or self.neighbors.skin == 0:
            return edge_index, shifts
        vec = edge_vectors(state.positions.detach(), edge_index, shifts, state.cell.detach(), state.system)
        keep = torch.nonzero((vec * vec).sum(-1) < self.neighbors.cutoff**2).squeeze(-1)
        return edge_index[:, keep], shifts[keep]

    def check(self, state: SimState) -> None:
        """Fail early, with the element named, for atoms the model does not know; and on dtype mismatch."""
        if hasattr(self.model, "check_elements"):
            self.model.check_elements(state.numbers.unique().tolist())
        dtype = model_dtype(self.model)
        if dtype != state.dtype:
            raise ValueError(f"state is {state.dtype} but the model is {dtype}; build the state with dtype={dtype}")

    def __call__(self, state: SimState, compute_stress: bool = False, dt: float | None = None) -> Outputs:
        self.neighbors.update(state.positions, state.cell, state.pbc, state.ptr, state.system,
                              velocities=state.velocities if dt is not None else None, dt=dt)
        self.calls += 1
        return self.on_edges(state, *self.edges(state), compute_stress=compute_stress)

    def on_edges(self, state: SimState, edge_index: torch.Tensor, shifts: torch.Tensor,
                 compute_stress: bool = False) -> Outputs:
        """The model on given edges: no neighbour-list upkeep (a captured MD step's evaluation)."""
        out = self.forward(state_graph(state, edge_index, shifts), compute_forces=True, compute_stress=compute_stress)
        return {key: value.detach() for key, value in out.items() if isinstance(value, torch.Tensor)}
