"""Torsional moves: copies of a molecule with its rotatable bonds turned to random angles.

Why: MD with an early model crosses torsional barriers slowly or not at all (a replica that leaves the
known conformer is soon frozen by its own σ), so a loop started from one conformer can spend several
rounds learning its neighbourhood while the molecule's other conformers, which thermal MD at the target
temperatures visits all the time, stay unlabelled (measured on ethanol: see docs/benchmarks.md,
active-learning section).  Turning a rotatable bond rigidly keeps every bond length and angle, so the
copies are sane structures in other conformers, not distortions; the model's σ and the selection then
decide which are worth an oracle call.

A bond is rotatable when both its atoms have other neighbours, it lies in no ring (removing it splits
the molecule), it is single and turning it moves something; the smaller side is turned.  A double or
triple bond turned by a random angle would be broken, not moved to another conformer (ethylene twisted by
90° lies ~3 eV up), so a bond between two unsaturated atoms (fewer neighbours than their usual valence)
counts as single only when it is not short: at least ``SINGLE_BOND_RATIO`` × the sum of ASE's covalent
radii (C=C, C=N, N=N and triple bonds lie at 0.80–0.89 of it, conjugated single bonds such as butadiene's
central one at 0.95–0.98; a bond with a saturated atom — sp3 C, three-coordinate N, two-coordinate O — is
single whatever its length, so amide, ester and acid C–N / C–O rotors count).  A bond whose turning side
lies on its axis (C–C≡N) is skipped: turning it changes nothing.  A turn that would bring two atoms of the
two sides within bonding distance is redrawn.  Periodic structures have none (their "molecules" are not
well defined).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import networkx as nx
import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.geometry import get_dihedrals
from ase.neighborlist import natural_cutoffs, neighbor_list

BOND_SCALE = 1.2  # × the sum of ASE's covalent radii, as the bond criterion of the stability test
# between two unsaturated atoms, a bond shorter than this × the sum of covalent radii is double or triple
# (ase.collections.g2: double and triple bonds at 0.80-0.89, conjugated single bonds at 0.93-0.98)
SINGLE_BOND_RATIO = 0.92
# usual valence: an atom with at least this many neighbours has only single bonds (H, B, C, N, O, F, Si,
# P, S, Cl, Br, I); atoms of other elements are judged by the bond length alone
VALENCE = {1: 1, 5: 3, 6: 4, 7: 3, 8: 2, 9: 1, 14: 4, 15: 3, 16: 2, 17: 1, 35: 1, 53: 1}
ON_AXIS = 0.1  # Å: a side whose atoms all lie this close to the bond axis does not move when turned


@dataclass(frozen=True)
class RotatableBond:
    """Axis atoms ``i`` → ``j`` and the atoms on ``j``'s side (``j`` included), which turn."""

    i: int
    j: int
    side: tuple[int, ...]


def dihedral(positions: np.ndarray, a: int, b: int, c: int, d: int) -> float:
    """The dihedral a–b–c–d in degrees, in (−180, 180] (ASE's, which gives [0, 360); no periodic images)."""
    p = np.asarray(positions, dtype=float)
    angle = float(get_dihedrals([p[b] - p[a]], [p[c] - p[b]], [p[d] - p[c]])[0])
    return angle - 360.0 if angle > 180.0 else angle


def bond_pairs(atoms: Atoms) -> set[tuple[int, int]]:
    """Bonded pairs ``(i, j)``, ``i < j``: closer than the sum of the scaled covalent radii (a linear-time
    neighbour list, so large clusters cost no N² distance matrix)."""
    first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=BOND_SCALE))
    return {(int(i), int(j)) for i, j in zip(first, second) if i < j}


def is_single(atoms: Atoms, i: int, j: int, degree: Mapping[int, int]) -> bool:
    """Whether the bond ``i``–``j`` is single: an atom of it is saturated, or it is not short (module docstring)."""
    for a in (i, j):
        valence = VALENCE.get(int(atoms.numbers[a]))
        if valence is not None and degree[a] >= valence:
            return True
    radii = covalent_radii[atoms.numbers[i]] + covalent_radii[atoms.numbers[j]]
    return bool(atoms.get_distance(i, j) >= SINGLE_BOND_RATIO * radii)


def _moves(positions: np.ndarray, i: int, j: int, side: set[int]) -> bool:
    """Whether some atom of ``side`` lies off the axis ``i``–``j`` (so a turn moves it)."""
    axis = positions[j] - positions[i]
    axis = axis / np.linalg.norm(axis)
    v = positions[sorted(side)] - positions[j]
    off = np.linalg.norm(v - np.outer(v @ axis, axis), axis=1)
    return bool((off > ON_AXIS).any())


def rotatable_bonds(atoms: Atoms) -> list[RotatableBond]:
    """The bonds of a molecule that can turn, each with its smaller side (empty for periodic structures).

    Ring bonds are found as the bond graph's non-bridges (``networkx.bridges``, linear time), so a large
    cluster or a metal particle, all rings, costs no per-bond search; "smaller side" is within the bond's
    own molecule.
    """
    if atoms.pbc.any() or len(atoms) < 4:
        return []
    graph = nx.Graph()
    graph.add_nodes_from(range(len(atoms)))
    graph.add_edges_from(bond_pairs(atoms))
    degree = dict(graph.degree)
    molecule_size = {a: len(c) for c in nx.connected_components(graph) for a in c}
    out = []
    for i, j in sorted(tuple(sorted(b)) for b in nx.bridges(graph)):  # bonds in no ring
        if degree[i] < 2 or degree[j] < 2 or not is_single(atoms, i, j, degree):
            continue
        graph.remove_edge(i, j)
        side = nx.node_connected_component(graph, j)
        if molecule_size[i] - len(side) < len(side):
            i, j, side = j, i, nx.node_connected_component(graph, i)
        graph.add_edge(i, j)
        if _moves(atoms.positions, i, j, side):
            out.append(RotatableBond(i, j, tuple(sorted(side))))
    return out


def turn(atoms: Atoms, bond: RotatableBond, angle_deg: float) -> Atoms:
    """A copy with ``bond``'s side rotated by ``angle_deg`` about the bond axis (Rodrigues' formula)."""
    out = atoms.copy()
    out.calc = None
    positions = out.positions
    origin = positions[bond.j]
    axis = positions[bond.j] - positions[bond.i]
    axis = axis / np.linalg.norm(axis)
    theta = np.radians(angle_deg)
    side = list(bond.side)
    v = positions[side] - origin
    rotated = (v * np.cos(theta) + np.cross(axis, v) * np.sin(theta)
               + np.outer(v @ axis, axis) * (1.0 - np.cos(theta)))
    positions[side] = origin + rotated
    out.positions = positions
    return out


def _clash(atoms: Atoms, reference: set[tuple[int, int]]) -> bool:
    """Whether a pair that was not bonded now is (the two sides came within bonding distance)."""
    return bool(bond_pairs(atoms) - reference)


def random_conformer(atoms: Atoms, rng: np.random.Generator, bonds: list[RotatableBond] | None = None,
                     all_bonds: bool = True, tries: int = 20) -> tuple[Atoms, list[float]] | None:
    """A copy with every rotatable bond (or one, ``all_bonds=False``) turned by a uniform random angle.

    Returns the copy and the angles (degrees), or ``None`` when the molecule has no rotatable bond or
    every draw within ``tries`` clashed.
    """
    bonds = rotatable_bonds(atoms) if bonds is None else bonds
    if not bonds:
        return None
    reference = bond_pairs(atoms)
    for _ in range(tries):
        chosen = bonds if all_bonds else [bonds[int(rng.integers(len(bonds)))]]
        out, angles = atoms, []
        for bond in chosen:
            angles.append(float(rng.uniform(0.0, 360.0)))
            out = turn(out, bond, angles[-1])
        if not _clash(out, reference):
            return out, angles
    return None
