"""Hessian labels from any ASE calculator: its analytic Hessian where it has one, else finite differences.

:func:`hessian_label` asks the calculator for the ``hessian`` property (equiforce's PySCF oracle computes it
analytically) and falls back to :func:`finite_difference_hessian` — 6N force calls — for oracles without
second derivatives (xTB through tblite, most DFT codes through ASE).  Labels are stored as
``Configuration.hessian`` (eV/Å², atom-major ``[3N, 3N]``).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms


def hessian_label(atoms: Atoms, calculator, delta: float = 0.005) -> tuple[np.ndarray, str]:
    """The structure's Hessian (eV/Å², symmetrised) and how it was made: ``"analytic"`` from a calculator that
    implements ``hessian``, else ``"finite-difference"``."""
    if "hessian" in getattr(calculator, "implemented_properties", ()):
        work = atoms.copy()
        work.calc = calculator
        n3 = 3 * len(atoms)
        hessian = np.asarray(calculator.get_property("hessian", work), dtype=np.float64).reshape(n3, n3)
        return 0.5 * (hessian + hessian.T), "analytic"
    return finite_difference_hessian(atoms, calculator, delta), "finite-difference"


def finite_difference_hessian(atoms: Atoms, calculator, delta: float = 0.005) -> np.ndarray:
    """``∂²E/∂r_a∂r_b`` (eV/Å², ``[3N, 3N]``, symmetrised) from forces at ``±delta`` Å along each coordinate.

    The error is O(delta²) in the forces' own precision: 0.005 Å suits converged SCF forces; noisier forces
    want a larger step.
    """
    if delta <= 0:
        raise ValueError(f"delta must be positive, got {delta}")
    work = atoms.copy()
    work.calc = calculator
    n3 = 3 * len(atoms)
    hessian = np.empty((n3, n3))
    for k in range(n3):
        atom, axis = divmod(k, 3)
        columns = []
        for sign in (1.0, -1.0):
            positions = atoms.positions.copy()
            positions[atom, axis] += sign * delta
            work.positions = positions
            columns.append(work.get_forces().reshape(-1))
        hessian[:, k] = -(columns[0] - columns[1]) / (2.0 * delta)  # H = -∂F/∂r
    return 0.5 * (hessian + hessian.T)
