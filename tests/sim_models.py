"""Potentials with known physics for simulation tests, on the same forward contract as ``Potential``.

``forward(graph, compute_forces, compute_stress)`` returns energy [B], node_energy [N], forces, and (when
asked) virial/stress as exact autograd derivatives through a symmetric strain — the way ``Potential`` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.calculators.calculator import Calculator, all_changes
from torch import nn

from equiforce.data import keys as K
from equiforce.data.structure import full_to_voigt
from equiforce.sim.evaluator import BatchEvaluator
from equiforce.sim.state import SimState


@pytest.fixture(autouse=True)
def single_thread():
    """Small-tensor MD is overhead bound: one thread avoids OpenMP spinning on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Analytic(nn.Module):
    """Shared strain/autograd plumbing; subclasses define ``pair_energy`` or ``atom_energy``."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("dummy", torch.zeros((), dtype=torch.float64))

    def node_energy(self, graph, positions, cell) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, graph, compute_forces: bool = True, compute_stress: bool = False, **_):
        positions, cell = graph[K.POSITIONS], graph[K.CELL]
        batch = graph[K.BATCH]
        positions = positions.detach().requires_grad_(True)
        strain = torch.zeros(cell.shape[0], 3, 3, dtype=cell.dtype, device=cell.device, requires_grad=True)
        sym = 0.5 * (strain + strain.transpose(1, 2))
        pos_in = positions + torch.einsum("ni,nij->nj", positions, sym[batch])
        cell_in = cell + torch.bmm(cell, sym)
        node = self.node_energy(graph, pos_in, cell_in)
        energy = torch.zeros(cell.shape[0], dtype=node.dtype, device=node.device).index_add(0, batch, node)
        d_pos, d_strain = torch.autograd.grad(energy.sum(), [positions, strain], allow_unused=True)
        d_pos = torch.zeros_like(positions) if d_pos is None else d_pos
        d_strain = torch.zeros_like(cell) if d_strain is None else d_strain
        volume = torch.linalg.det(cell).abs()
        safe = torch.where(volume > 0, volume, torch.ones_like(volume))
        stress = torch.where((volume > 0)[:, None, None], d_strain / safe[:, None, None], torch.zeros_like(d_strain))
        return {K.ENERGY: energy.detach(), K.NODE_ENERGY: node.detach(), K.FORCES: -d_pos,
                K.VIRIAL: -d_strain, K.STRESS: stress}


class LennardJones(_Analytic):
    """LJ with a smooth (C²) switch between ``r_on`` and the cutoff; argon by default (eV, Å)."""

    def __init__(self, epsilon: float = 0.0104, sigma: float = 3.40, cutoff: float = 7.0, r_on: float = 6.0) -> None:
        super().__init__(cutoff)
        self.epsilon, self.sigma, self.r_on = epsilon, sigma, r_on

    def node_energy(self, graph, positions, cell):
        i, j = graph[K.EDGE_INDEX]
        batch = graph[K.BATCH]
        vec = positions[j] - positions[i] + torch.einsum("ei,eij->ej", graph[K.SHIFTS], cell[batch[i]])
        r = torch.linalg.vector_norm(vec, dim=-1)
        sr6 = (self.sigma / r) ** 6
        pair = 4 * self.epsilon * (sr6 * sr6 - sr6)
        x = ((r - self.r_on) / (self.cutoff - self.r_on)).clamp(0, 1)
        switch = 1 - x**3 * (10 - 15 * x + 6 * x * x)
        pair = torch.where(r < self.cutoff, pair * switch, torch.zeros_like(pair))
        return torch.zeros_like(positions[:, 0]).index_add(0, i, 0.5 * pair)


class Tether(_Analytic):
    """Each atom on a spring to a fixed site: exactly harmonic, ω = sqrt(k/m) per atom."""

    def __init__(self, sites: torch.Tensor, k: float = 5.0) -> None:
        super().__init__(cutoff=1.0)
        self.register_buffer("sites", sites.to(torch.float64))
        self.k = k

    def node_energy(self, graph, positions, cell):
        return 0.5 * self.k * ((positions - self.sites) ** 2).sum(-1)


class Free(_Analytic):
    """No interactions (an ideal gas)."""

    def __init__(self) -> None:
        super().__init__(cutoff=0.5)

    def node_energy(self, graph, positions, cell):
        return 0.0 * positions.sum(-1)


class TorchCalculator(Calculator):
    """ASE calculator around any model with the ``Potential`` forward contract (for comparing with ASE)."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        state = SimState.from_atoms(self.atoms)
        periodic = bool(self.atoms.pbc.all())
        out = BatchEvaluator(self.model, skin=0.0)(state, compute_stress=periodic)
        energy = float(out[K.ENERGY][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out[K.FORCES].numpy().copy()}
        if periodic:
            self.results["stress"] = full_to_voigt(out[K.STRESS][0].numpy())


def argon_fcc(repeat: int = 2, a: float = 5.26, rattle: float = 0.0, seed: int = 0):
    from ase.build import bulk

    atoms = bulk("Ar", "fcc", a=a, cubic=True).repeat((repeat, repeat, repeat))
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()
