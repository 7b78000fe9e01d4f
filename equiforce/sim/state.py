"""The batched simulation state: many systems of different sizes in one set of flat tensors.

Units are ASE's (Å, eV, amu, ``ase.units.fs`` for time), so momenta and velocities move freely between
ASE ``Atoms`` and the native engine.  Positions stay unwrapped (needed for diffusion); the neighbour list
wraps internally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
from ase import Atoms, units

from equiforce.errors import ConfigError

KB = units.kB  # eV/K


def fixed_atoms(atoms: Atoms, index: int = 0) -> np.ndarray:
    """[n] bool: the atoms an ASE ``FixAtoms`` holds in place.  Any other constraint is refused by name: the
    native engine would otherwise ignore it silently (ASE's own dynamics, with ``equiforce.Calculator``, keep
    every constraint ASE has)."""
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if not isinstance(constraint, FixAtoms):
            raise ConfigError(f"structure {index}: constraint {type(constraint).__name__} is not supported by the "
                              "native engine (FixAtoms is); run ASE's dynamics or optimizers with equiforce.Calculator")
        mask[constraint.get_indices()] = True
    return mask


@dataclass
class SimState:
    """Flat tensors for ``B`` systems holding ``N`` atoms in total.

    ``system`` [N] maps each atom to its system; ``ptr`` [B+1] are atom offsets; ``dof`` [B] the number of
    kinetic degrees of freedom used for the temperature (3N, or 3N - 3 when the centre-of-mass momentum is
    removed and conserved; 3 fewer per fixed atom).  ``fixed`` [N] bool marks atoms held in place (ASE's
    ``FixAtoms``): integrators and FIRE give them no force and no momentum; ``None`` when there are none.
    """

    positions: torch.Tensor  # [N, 3] Å
    momenta: torch.Tensor  # [N, 3] amu·Å/(ASE time)
    masses: torch.Tensor  # [N] amu
    numbers: torch.Tensor  # [N] long
    cell: torch.Tensor  # [B, 3, 3] Å, rows are lattice vectors
    pbc: torch.Tensor  # [B, 3] bool
    system: torch.Tensor  # [N] long
    ptr: torch.Tensor  # [B + 1] long
    dof: torch.Tensor  # [B] float
    step: int = 0
    info: dict = field(default_factory=dict)
    fixed: torch.Tensor | None = None  # [N] bool, or None

    # ----------------------------------------------------------------- construction and export
    @classmethod
    def from_atoms(cls, atoms_list: Atoms | Sequence[Atoms], device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float64) -> SimState:
        """Stack ASE structures (their momenta included, zero when unset) into one state."""
        if isinstance(atoms_list, Atoms):
            atoms_list = [atoms_list]
        if len(atoms_list) == 0:
            raise ConfigError("no structures given")
        n_atoms = torch.tensor([len(a) for a in atoms_list], dtype=torch.long)
        if (n_atoms == 0).any():
            raise ConfigError(f"structure {int(torch.nonzero(n_atoms == 0)[0])} has no atoms")
        ptr = torch.zeros(len(atoms_list) + 1, dtype=torch.long)
        ptr[1:] = torch.cumsum(n_atoms, 0)

        def cat(get) -> np.ndarray:
            return np.concatenate([np.asarray(get(a), dtype=np.float64) for a in atoms_list])

        def as_float(array) -> torch.Tensor:
            return torch.as_tensor(np.asarray(array), dtype=dtype, device=device)

        fixed = np.concatenate([fixed_atoms(a, k) for k, a in enumerate(atoms_list)])
        n_fixed = torch.as_tensor(np.add.reduceat(fixed.astype(np.int64), ptr[:-1].numpy()))
        momenta = cat(lambda a: a.get_momenta())
        momenta[fixed] = 0.0
        return cls(
            positions=as_float(cat(lambda a: a.positions)),
            momenta=as_float(momenta),
            masses=as_float(cat(lambda a: a.get_masses())),
            numbers=torch.as_tensor(np.concatenate([a.numbers for a in atoms_list]), dtype=torch.long, device=device),
            cell=as_float(np.stack([np.asarray(a.cell, dtype=np.float64) for a in atoms_list])),
            pbc=torch.as_tensor(np.stack([a.pbc for a in atoms_list]), dtype=torch.bool, device=device),
            system=torch.repeat_interleave(torch.arange(len(atoms_list)), n_atoms).to(device),
            ptr=ptr.to(device),
            dof=(3.0 * (n_atoms - n_fixed)).to(device=device, dtype=dtype),
            fixed=torch.as_tensor(fixed, device=device) if fixed.any() else None,
        )

    def to_atoms(self) -> list[Atoms]:
        """One ASE ``Atoms`` per system, with momenta (a host copy: call sparingly)."""
        pos, mom = self.positions.detach().cpu().double().numpy(), self.momenta.detach().cpu().double().numpy()
        masses, numbers = self.masses.detach().cpu().double().numpy(), self.numbers.cpu().numpy()
        cell, pbc, ptr = self.cell.detach().cpu().double().numpy(), self.pbc.cpu().numpy(), self.ptr.cpu().tolist()
        fixed = self.fixed.cpu().numpy() if self.fixed is not None else None
        out = []
        for b in range(self.n_systems):
            s = slice(ptr[b], ptr[b + 1])
            atoms = Atoms(numbers=numbers[s], positions=pos[s], cell=cell[b], pbc=pbc[b], masses=masses[s])
            atoms.set_momenta(mom[s], apply_constraint=False)
            if fixed is not None and fixed[s].any():
                from ase.constraints import FixAtoms

                atoms.set_constraint(FixAtoms(mask=fixed[s]))
            out.append(atoms)
        return out

    def without_fixed(self, per_atom: torch.Tensor) -> torch.Tensor:
        """``per_atom`` [N, ...] with the rows of fixed atoms zeroed (forces, momenta, FIRE steps)."""
        if self.fixed is None:
            return per_atom
        return per_atom.masked_fill(self.fixed.reshape(-1, *([1] * (per_atom.dim() - 1))), 0.0)

    def clone(self) -> SimState:
        return replace(self, **{f.name: getattr(self, f.name).clone() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)}, info=dict(self.info))

    # ----------------------------------------------------------------- sizes
    @property
    def n_systems(self) -> int:
        return self.cell.shape[0]

    @property
    def n_atoms(self) -> torch.Tensor:
        """[B] atoms per system."""
        return self.ptr[1:] - self.ptr[:-1]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def periodic(self) -> torch.Tensor:
        """[B] bool: fully periodic with a non-degenerate cell (stress, pressure and barostat apply)."""
        return self.pbc.all(dim=1) & (torch.linalg.det(self.cell).abs() > 1e-8)

    # ----------------------------------------------------------------- kinetics
    @property
    def velocities(self) -> torch.Tensor:
        return self.momenta / self.masses[:, None]

    def per_system(self, per_atom: torch.Tensor) -> torch.Tensor:
        """Sum a per-atom quantity ``[N, ...]`` into ``[B, ...]``."""
        out = torch.zeros((self.n_systems,) + per_atom.shape[1:], dtype=per_atom.dtype, device=per_atom.device)
        return out.index_add(0, self.system, per_atom)

    def kinetic_energy(self) -> torch.Tensor:
        """[B] eV."""
        return self.per_system(0.5 * (self.momenta**2).sum(-1) / self.masses)

    def kinetic_tensor(self) -> torch.Tensor:
        """[B, 3, 3] Σ p pᵀ/m (twice the kinetic-energy tensor), eV."""
        pp = self.momenta[:, :, None] * self.momenta[:, None, :] / self.masses[:, None, None]
        return self.per_system(pp)

    def temperature(self) -> torch.Tensor:
        """[B] instantaneous kinetic temperature in K from ``dof``."""
        return 2.0 * self.kinetic_energy() / (self.dof * KB)

    def volume(self) -> torch.Tensor:
        """[B] Å³ (zero for non-periodic systems)."""
        return torch.linalg.det(self.cell).abs() * self.periodic

    def remove_com_momentum(self) -> None:
        """Zero each system's total momentum (and count 3 fewer degrees of freedom, once).  A system with fixed
        atoms is left as it is: the fixed atoms take up momentum, so its total is not conserved anyway."""
        free = torch.ones(self.n_systems, dtype=torch.bool, device=self.device)
        if self.fixed is not None:
            free = self.per_system(self.fixed.to(self.dtype)) == 0
        total = self.per_system(self.momenta)
        mass = self.per_system(self.masses)
        shift = torch.where(free[:, None], total / mass[:, None], torch.zeros_like(total))
        self.momenta = self.momenta - self.masses[:, None] * shift[self.system]
        if not self.info.get("com_removed", False):
            self.dof = torch.where(free, torch.clamp(self.dof - 3.0, min=1.0), self.dof)
            self.info["com_removed"] = True


def maxwell_boltzmann(state: SimState, temperature_K: float | torch.Tensor, generator: torch.Generator | None = None,
                      remove_com: bool = True) -> None:
    """Draw momenta from the Maxwell–Boltzmann distribution, then rescale each system to exactly ``T``.

    Exact rescaling removes the sampling noise of small systems so runs start where they are asked to.
    """
    temperature = torch.as_tensor(temperature_K, dtype=state.dtype, device=state.device).expand(state.n_systems)
    noise = torch.randn(state.positions.shape, generator=generator, dtype=state.dtype, device=state.device)
    sigma = torch.sqrt(state.masses * KB * temperature[state.system])
    state.momenta = state.without_fixed(noise * sigma[:, None])
    if remove_com:
        state.remove_com_momentum()
    current = state.temperature()
    scale = torch.where(current > 0, torch.sqrt(temperature / current.clamp_min(1e-30)), torch.zeros_like(current))
    state.momenta = state.momenta * scale[state.system, None]
