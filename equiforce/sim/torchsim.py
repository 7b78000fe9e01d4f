"""An equiforce potential as a torch-sim ``ModelInterface`` (optional: ``pip install 'equiforce[torchsim]'``).

torch-sim's integrators, optimizers and autobatcher then drive equiforce models like any other MLIP.  The
neighbour list is equiforce's batched torch list (:mod:`equiforce.sim.neighbors`), reused within a skin and
rebuilt whenever torch-sim swaps systems in or out.  Works with torch-sim 0.3 (``pbc`` a bool) and ≥ 0.4
(``pbc`` a tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from equiforce.data import keys as K
from equiforce.sim.evaluator import model_device, model_dtype
from equiforce.sim.neighbors import VerletNeighborList

try:
    from torch_sim.models.interface import ModelInterface as _Base

    TORCH_SIM_AVAILABLE = True
except ImportError:  # optional dependency
    _Base = nn.Module
    TORCH_SIM_AVAILABLE = False


def _pbc_per_system(pbc, n_systems: int, device: torch.device) -> torch.Tensor:
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    if pbc.ndim == 0:
        pbc = pbc.expand(3)
    if pbc.ndim == 1:
        pbc = pbc.expand(n_systems, 3)
    return pbc.contiguous()


class TorchSimModel(_Base):
    """Wrap a :class:`~equiforce.models.Potential` for torch-sim: ``forward(state) -> {energy, forces, stress}``.

    ``compute_stress`` adds the stress (ASE/torch-sim sign, eV/Å³) needed by torch-sim's NPT integrators and
    cell optimizers; ``skin`` (Å) is the Verlet skin of the reused neighbour list (0 builds it every call).
    """

    def __init__(self, model: nn.Module, *, compute_stress: bool = True, compute_forces: bool = True,
                 skin: float = 0.5) -> None:
        if not TORCH_SIM_AVAILABLE:
            raise ImportError("torch-sim is not installed: pip install 'equiforce[torchsim]'")
        nn.Module.__init__(self)
        self.model = model.eval()
        self._device = model_device(model)
        self._dtype = model_dtype(model)
        self._compute_stress = compute_stress
        self._compute_forces = compute_forces
        self._memory_scales_with = "n_atoms_x_density"
        self.neighbors = VerletNeighborList(float(model.cutoff), skin=skin, check_interval=1)
        self._ptr: torch.Tensor | None = None

    def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
        positions = state.positions
        if positions.dtype != self._dtype:
            raise ValueError(f"state is {positions.dtype} but the model is {self._dtype}")
        system = state.system_idx
        n_systems = int(state.n_systems)
        n_atoms = torch.bincount(system, minlength=n_systems)
        ptr = torch.zeros(n_systems + 1, dtype=torch.long, device=positions.device)
        ptr[1:] = torch.cumsum(n_atoms, 0)
        cell = state.row_vector_cell
        pbc = _pbc_per_system(state.pbc, n_systems, positions.device)
        if self._ptr is None or self._ptr.shape != ptr.shape or not torch.equal(self._ptr, ptr):
            self.neighbors.build(positions, cell, pbc, ptr)  # systems were swapped in or out
            self._ptr = ptr
        else:
            self.neighbors.update(positions, cell, pbc, ptr, system)
        graph = {
            K.POSITIONS: positions, K.NUMBERS: state.atomic_numbers, K.CELL: cell, K.PBC: pbc,
            K.EDGE_INDEX: self.neighbors.edge_index, K.SHIFTS: self.neighbors.shifts, K.BATCH: system,
            K.PTR: ptr, K.N_ATOMS: n_atoms,
        }
        out = self.model(graph, compute_forces=self._compute_forces, compute_stress=self._compute_stress)
        result = {"energy": out[K.ENERGY].detach()}
        if self._compute_forces:
            result["forces"] = out[K.FORCES].detach()
        if self._compute_stress:
            result["stress"] = out[K.STRESS].detach()
        return result
