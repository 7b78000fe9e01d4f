"""A labelled atomic configuration, as read from any file, in equiforce units (Å, eV)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ase import Atoms


@dataclass
class Configuration:
    """One structure with optional labels.

    ``stress`` is the full 3×3 tensor in eV/Å³ with ASE's sign convention.  ``source`` and
    ``frame`` say where it came from so every later error can point back to the file.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))
    pbc: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=bool))
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    hessian: np.ndarray | None = None  # [3N, 3N] eV/Å², ∂²E/∂r_a∂r_b (atom-major: x, y, z of atom 0, then atom 1)
    config_type: str = "Default"
    weight: float = 1.0
    source: str = "<memory>"
    frame: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.asarray(self.pbc, dtype=bool).reshape(-1)
        if self.pbc.size == 1:
            self.pbc = np.repeat(self.pbc, 3)
        if self.forces is not None:
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(-1, 3)
        if self.stress is not None:
            self.stress = voigt_to_full(np.asarray(self.stress, dtype=np.float64))
        if self.hessian is not None:
            n3 = 3 * self.n_atoms
            self.hessian = np.asarray(self.hessian, dtype=np.float64).reshape(n3, n3)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])

    @classmethod
    def from_atoms(cls, atoms: Atoms, **labels) -> Configuration:
        """A copy: later changes to ``atoms`` (the next MD step) cannot alter the configuration."""
        return cls(numbers=atoms.numbers.copy(), positions=atoms.positions.copy(), cell=np.array(atoms.cell),
                   pbc=atoms.pbc.copy(), **labels)

    def to_atoms(self) -> Atoms:
        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)


def voigt_to_full(stress: np.ndarray) -> np.ndarray:
    """Accept a 6-vector in ASE Voigt order (xx, yy, zz, yz, xz, xy), a 9-vector or a 3×3 matrix."""
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (3, 3):
        return s
    if s.size == 9:
        return s.reshape(3, 3)
    if s.size == 6:
        xx, yy, zz, yz, xz, xy = s.reshape(6)
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"stress must have 6 (Voigt), 9 or 3x3 components, got shape {s.shape}")


def full_to_voigt(stress: np.ndarray) -> np.ndarray:
    """3×3 → ASE Voigt order (xx, yy, zz, yz, xz, xy); works on a leading batch axis."""
    s = np.asarray(stress)
    return np.stack([s[..., 0, 0], s[..., 1, 1], s[..., 2, 2], s[..., 1, 2], s[..., 0, 2], s[..., 0, 1]], -1)
