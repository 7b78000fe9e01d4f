"""Neighbour lists for any cell: open, fully or partly periodic, triclinic, smaller than the cutoff.

Backed by vesin (a maintained, fast cell-list implementation).  Returns ASE's convention:
for each pair, ``r_ij = r_j - r_i + S @ cell``; several images of the same neighbour appear
as separate pairs with different shifts ``S``.
"""

from __future__ import annotations

import numpy as np
from vesin import NeighborList

MAX_IMAGES_PER_AXIS = 25
"""More periodic images than this along one axis means the cell is almost surely wrong (units, a missing
lattice), and the neighbour list would exhaust memory: refuse with a message instead."""


def check_cell(cell: np.ndarray, pbc: np.ndarray, cutoff: float | None = None) -> str | None:
    """Why a (cell, pbc) pair cannot be used with ``cutoff``, or None when it is fine."""
    cell = np.asarray(cell, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    for axis in range(3):
        if pbc[axis] and np.linalg.norm(cell[axis]) < 1e-8:
            return f"periodic along axis {axis} but cell vector {axis} is zero"
    if np.all(pbc) and abs(np.linalg.det(cell)) < 1e-8:
        return "periodic cell has zero volume"
    if cutoff is not None and pbc.any():
        for axis in np.flatnonzero(pbc):
            others = [cell[a] if np.linalg.norm(cell[a]) > 1e-8 else np.eye(3)[a] for a in range(3) if a != axis]
            normal = np.cross(*others)
            if np.linalg.norm(normal) < 1e-8:
                return f"cell vector {axis} is parallel to the others"
            width = abs(cell[axis] @ normal) / np.linalg.norm(normal)
            images = int(np.ceil(cutoff / max(width, 1e-12)))
            if images > MAX_IMAGES_PER_AXIS:
                return (f"the cell is only {width:.3g} Å wide along periodic axis {axis}, but the cutoff of "
                        f"{cutoff:g} Å would need {images} periodic images of it (more than "
                        f"{MAX_IMAGES_PER_AXIS}); check the cell and its units")
    return None


def neighbor_list(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                  cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbour list (both i→j and j→i) within ``cutoff`` Å.

    Returns ``(i, j, shifts)`` with int64 indices and float64 integer shifts [E, 3].
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if not pbc.any():
        box = np.zeros((3, 3))
    else:
        box = cell.copy()
        # vesin needs a well-defined box: fill an unused (non-periodic, zero) vector with a
        # direction orthogonal to the others; it never produces shifts along it.
        for axis in range(3):
            if not pbc[axis] and np.linalg.norm(box[axis]) < 1e-8:
                others = [box[a] for a in range(3) if a != axis]
                normal = np.cross(others[0], others[1])
                if np.linalg.norm(normal) < 1e-8:
                    normal = np.eye(3)[axis]
                span = np.ptp(positions, axis=0).max() if len(positions) else 0.0
                box[axis] = normal / np.linalg.norm(normal) * (span + 2 * cutoff + 1.0)
    calculator = NeighborList(cutoff=float(cutoff), full_list=True)
    if len(positions) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 3))
    i, j, shifts = calculator.compute(positions, box, pbc.tolist() if pbc.any() else False, "ijS")
    return i.astype(np.int64), j.astype(np.int64), shifts.astype(np.float64)
