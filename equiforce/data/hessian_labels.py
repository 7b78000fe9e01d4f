"""Hessian labels from any ASE calculator by central finite differences of its forces.

For oracles without analytic second derivatives (xTB through tblite, most DFT codes through ASE): 6N force
calls per structure.  PySCF users can take its analytic Hessians instead and store them the same way
(``Configuration.hessian``, eV/Å², atom-major ``[3N, 3N]``).
"""

from __future__ import annotations

import numpy as np
from ase import Atoms


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
