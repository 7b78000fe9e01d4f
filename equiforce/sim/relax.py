"""Batched FIRE relaxation of positions and, optionally, cells (ASE's ``FIRE`` + ``UnitCellFilter`` math).

Every system carries its own FIRE time step, mixing parameter and step counter, so one batch relaxes
structures of different sizes at once; a system stops moving as soon as its largest force (and, with the
cell, its largest cell force) is below ``fmax``.  With the same parameters, one system follows exactly the
path ASE's ``FIRE(UnitCellFilter(atoms))`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from torch import nn

from equiforce.data import keys as K
from equiforce.data.structure import full_to_voigt
from equiforce.errors import ConfigError
from equiforce.sim.evaluator import BatchEvaluator, model_device, model_dtype
from equiforce.sim.state import SimState


@dataclass
class FIREParams:
    """ASE's FIRE defaults (ASE time units with unit masses; ``maxstep`` in Å per system step)."""

    dt: float = 0.1
    maxstep: float = 0.2
    dtmax: float = 1.0
    n_min: int = 5
    finc: float = 1.1
    fdec: float = 0.5
    astart: float = 0.1
    fa: float = 0.99


@dataclass
class RelaxResult:
    state: SimState
    atoms: list[Atoms]  # with the final energy, forces (and stress) attached as ASE results
    energy: np.ndarray  # [B] eV, the potential energy
    fmax: np.ndarray  # [B] eV/Å, largest generalised force at the end
    converged: np.ndarray  # [B] bool
    steps: np.ndarray  # [B] force evaluations until convergence (or the limit)
    enthalpy: np.ndarray | None = None  # [B] eV, energy + p·V (a cell relaxed under pressure: what FIRE minimised)


def _row_norm_max(per_atom: torch.Tensor, state: SimState) -> torch.Tensor:
    norms = torch.linalg.vector_norm(per_atom, dim=-1)
    out = torch.zeros(state.n_systems, dtype=norms.dtype, device=norms.device)
    return out.scatter_reduce(0, state.system, norms, reduce="amax", include_self=True)


class CellFilter:
    """Generalised coordinates of ASE's ``UnitCellFilter``, batched: positions in the reference cell plus
    ``cell_factor ×`` the deformation gradient ``F`` (``cell = cell₀ Fᵀ``); ``cell_factor`` = atoms/system."""

    def __init__(self, state: SimState, scalar_pressure_bar: float = 0.0, hydrostatic: bool = False) -> None:
        self.orig_cell = state.cell.clone()
        self.factor = state.n_atoms.to(state.dtype)
        self.pressure = float(scalar_pressure_bar) * units.bar
        self.hydrostatic = hydrostatic

    def deform(self, cell: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.orig_cell, cell).transpose(1, 2)

    def forces(self, state: SimState, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Generalised forces: atoms ``f F`` [N,3] and cell ``virial F⁻ᵀ / cell_factor`` [B,3,3]."""
        deform = self.deform(state.cell)
        volume = torch.linalg.det(state.cell).abs()
        eye = torch.eye(3, dtype=state.dtype, device=state.device)
        virial = -volume[:, None, None] * (outputs[K.STRESS] + self.pressure * eye)
        atom_forces = torch.einsum("ni,nij->nj", outputs[K.FORCES], deform[state.system])
        virial = torch.linalg.solve(deform, virial.transpose(1, 2)).transpose(1, 2)
        if self.hydrostatic:
            trace = torch.diagonal(virial, dim1=1, dim2=2).sum(-1)
            virial = (trace / 3.0)[:, None, None] * eye
        return atom_forces, virial / self.factor[:, None, None]

    def move(self, state: SimState, d_atoms: torch.Tensor, d_cell: torch.Tensor) -> None:
        """Apply a step in generalised coordinates."""
        deform = self.deform(state.cell)
        reference = torch.linalg.solve(deform[state.system], state.positions.unsqueeze(-1)).squeeze(-1)
        new_deform = deform + d_cell / self.factor[:, None, None]
        state.cell = self.orig_cell @ new_deform.transpose(1, 2)
        state.positions = torch.einsum("ni,nji->nj", reference + d_atoms, new_deform[state.system])


def fire(state: SimState, evaluate: BatchEvaluator, fmax: float = 0.05, max_steps: int = 1000,
         relax_cell: bool = False, scalar_pressure_bar: float = 0.0, hydrostatic: bool = False,
         params: FIREParams | None = None) -> tuple[SimState, dict[str, np.ndarray]]:
    """Relax every system of ``state`` in place with FIRE; returns the state and per-system summaries."""
    p = params or FIREParams()
    b, device, dtype = state.n_systems, state.device, state.dtype
    cell_filter = CellFilter(state, scalar_pressure_bar, hydrostatic) if relax_cell else None
    if relax_cell and not bool(state.periodic.all()):
        raise ConfigError("relax_cell needs every system fully periodic with a non-zero volume")
    if relax_cell and state.fixed is not None:
        raise ConfigError("relax_cell with fixed atoms (FixAtoms) is not supported: the cell's deformation would "
                          "move them; relax positions only, or use ASE's optimizer with equiforce.Calculator")
    vel = torch.zeros_like(state.positions)
    vel_cell = torch.zeros_like(state.cell)
    dt = torch.full((b,), p.dt, dtype=dtype, device=device)
    a = torch.full((b,), p.astart, dtype=dtype, device=device)
    n_steps = torch.zeros(b, dtype=torch.long, device=device)
    started = False
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps_taken = torch.zeros(b, dtype=torch.long, device=device)
    for _ in range(max_steps + 1):
        outputs = evaluate(state, compute_stress=relax_cell)
        if cell_filter is not None:
            g_atoms, g_cell = cell_filter.forces(state, outputs)
            largest = torch.maximum(_row_norm_max(g_atoms, state), torch.linalg.vector_norm(g_cell, dim=-1).amax(-1))
        else:
            g_atoms, g_cell = state.without_fixed(outputs[K.FORCES]), torch.zeros_like(state.cell)
            largest = _row_norm_max(g_atoms, state)
        done = done | (largest < fmax)
        if bool(done.all()) or int(steps_taken.max()) >= max_steps:
            break
        steps_taken = steps_taken + (~done).long()
        if started:
            vf = state.per_system((g_atoms * vel).sum(-1)) + (g_cell * vel_cell).sum((1, 2))
            g2 = state.per_system((g_atoms * g_atoms).sum(-1)) + (g_cell * g_cell).sum((1, 2))
            v2 = state.per_system((vel * vel).sum(-1)) + (vel_cell * vel_cell).sum((1, 2))
            uphill = vf <= 0
            mix = a * torch.sqrt(v2) / torch.sqrt(g2).clamp_min(1e-300)
            keep = (1 - a)
            vel = torch.where(uphill[state.system, None], torch.zeros_like(vel),
                              keep[state.system, None] * vel + mix[state.system, None] * g_atoms)
            vel_cell = torch.where(uphill[:, None, None], torch.zeros_like(vel_cell),
                                   keep[:, None, None] * vel_cell + mix[:, None, None] * g_cell)
            grow = ~uphill & (n_steps > p.n_min)
            dt = torch.where(uphill, dt * p.fdec, torch.where(grow, torch.clamp(dt * p.finc, max=p.dtmax), dt))
            a = torch.where(uphill, torch.full_like(a, p.astart), torch.where(grow, a * p.fa, a))
            n_steps = torch.where(uphill, torch.zeros_like(n_steps), n_steps + 1)
        started = True
        vel = vel + dt[state.system, None] * g_atoms
        vel_cell = vel_cell + dt[:, None, None] * g_cell
        dr, dcell = dt[state.system, None] * vel, dt[:, None, None] * vel_cell
        norm = torch.sqrt(state.per_system((dr * dr).sum(-1)) + (dcell * dcell).sum((1, 2)))
        scale = torch.where(norm > p.maxstep, p.maxstep / norm.clamp_min(1e-300), torch.ones_like(norm))
        scale = torch.where(done, torch.zeros_like(scale), scale)
        dr, dcell = dr * scale[state.system, None], dcell * scale[:, None, None]
        if cell_filter is not None:
            cell_filter.move(state, dr, dcell)
        else:
            state.positions = state.positions + dr
    energy = outputs[K.ENERGY]
    summary = {"energy": energy.cpu().double().numpy(), "fmax": largest.cpu().double().numpy(),
               "converged": done.cpu().numpy(), "steps": steps_taken.cpu().numpy(),
               "forces": outputs[K.FORCES].detach().cpu().double().numpy()}
    if cell_filter is not None:
        enthalpy = energy + cell_filter.pressure * torch.linalg.det(state.cell).abs()
        summary["enthalpy"] = enthalpy.cpu().double().numpy()
        summary["stress"] = outputs[K.STRESS].detach().cpu().double().numpy()
    return state, summary


def relax(model: nn.Module, atoms_list: Atoms | Sequence[Atoms], fmax: float = 0.05, max_steps: int = 1000,
          relax_cell: bool = False, scalar_pressure_bar: float = 0.0, hydrostatic: bool = False,
          device: str | None = None, params: FIREParams | None = None, skin: float = 0.5) -> RelaxResult:
    """Relax ASE structures (all at once, batched) with FIRE; ``relax_cell`` also relaxes each cell (under
    ``scalar_pressure_bar``: then the enthalpy is minimised, and reported as ``enthalpy`` beside ``energy``)."""
    if scalar_pressure_bar and not relax_cell:
        raise ConfigError("a pressure acts only on the cell: scalar_pressure_bar needs relax_cell=True")
    device = device or str(model_device(model))
    state = SimState.from_atoms(atoms_list, device=device, dtype=model_dtype(model))
    evaluate = BatchEvaluator(model, skin=skin, check_interval=1)
    evaluate.check(state)
    state, summary = fire(state, evaluate, fmax, max_steps, relax_cell, scalar_pressure_bar, hydrostatic, params)
    forces, stress = summary.pop("forces"), summary.pop("stress", None)
    atoms = state.to_atoms()
    ptr = state.ptr.cpu().tolist()
    for b, structure in enumerate(atoms):
        results = {"energy": float(summary["energy"][b]), "forces": forces[ptr[b]:ptr[b + 1]]}
        if stress is not None:
            results["stress"] = full_to_voigt(stress[b])
        structure.calc = SinglePointCalculator(structure, **results)
    return RelaxResult(state=state, atoms=atoms, **summary)
