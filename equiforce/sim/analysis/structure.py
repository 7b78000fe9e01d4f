"""Structure along a trajectory: radial distribution functions, interatomic-distance histograms h(r) and the
bond-length stability criterion of Fu et al. 2023 ("Forces are not enough", TMLR)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms
from ase.data import chemical_symbols
from ase.neighborlist import natural_cutoffs

from equiforce.data.neighbors import neighbor_list
from equiforce.sim.analysis.plots import new_figure, save_png


@dataclass
class RDF:
    """``g(r)`` at bin centres ``r`` (Å) and the running coordination number ``n(r) = ∫ρ g 4πr² dr``."""

    r: np.ndarray
    g: np.ndarray
    coordination: np.ndarray
    pair: tuple[int, int] | None
    periodic: bool

    def plot(self, path: str | os.PathLike, title: str = "") -> None:
        figure, ax = new_figure()
        ax.plot(self.r, self.g, color="C0")
        ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("r (Å)")
        ax.set_ylabel("g(r)")
        name = "all" if self.pair is None else "–".join(chemical_symbols[z] for z in self.pair)
        ax.set_title(title or f"radial distribution ({name})")
        save_png(figure, path)


def _selection(numbers: np.ndarray, z: int | None) -> np.ndarray:
    return np.ones(len(numbers), dtype=bool) if z is None else numbers == z


def radial_distribution(frames: Sequence[Atoms], r_max: float, n_bins: int = 200,
                        pair: tuple[int, int] | None = None) -> RDF:
    """g(r) averaged over frames, for all atoms or one element ``pair`` (atomic numbers).

    Periodic frames are normalised by the ideal-gas density ``(N_b − δ_ab)/V``; non-periodic ones (molecules,
    clusters) by a uniform density in a sphere of radius ``r_max``, so ``g`` is a shape, not a bulk quantity.
    """
    if not frames:
        raise ValueError("no frames")
    edges = np.linspace(0.0, r_max, n_bins + 1)
    counts = np.zeros(n_bins)
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    norm = 0.0
    density_sum = 0.0
    periodic = bool(frames[0].pbc.all())
    for atoms in frames:
        numbers = atoms.numbers
        a_sel = _selection(numbers, None if pair is None else pair[0])
        b_sel = _selection(numbers, None if pair is None else pair[1])
        i, j, shifts = neighbor_list(atoms.positions, np.asarray(atoms.cell), atoms.pbc, r_max)
        keep = a_sel[i] & b_sel[j]
        vec = atoms.positions[j[keep]] - atoms.positions[i[keep]] + shifts[keep] @ np.asarray(atoms.cell)
        counts += np.histogram(np.linalg.norm(vec, axis=1), bins=edges)[0]
        n_b = b_sel.sum() - (1 if pair is None or pair[0] == pair[1] else 0)
        volume = atoms.get_volume() if periodic else 4.0 / 3.0 * np.pi * r_max**3
        density = n_b / volume
        norm += a_sel.sum() * density
        density_sum += density
    g = counts / (norm * shell)
    mean_density = density_sum / len(frames)
    coordination = np.cumsum(g * shell) * mean_density
    return RDF(r=0.5 * (edges[1:] + edges[:-1]), g=g, coordination=coordination, pair=pair, periodic=periodic)


def distance_histogram(positions: np.ndarray, r_max: float = 10.0, n_bins: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """h(r): the distribution of all interatomic distances of a molecule, ``∫ h dr = 1`` (Fu et al. 2023).

    ``positions [T, N, 3]`` (no periodicity).  Returns bin centres and the averaged density.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim == 2:
        positions = positions[None]
    i, j = np.triu_indices(positions.shape[1], k=1)
    distances = np.linalg.norm(positions[:, j] - positions[:, i], axis=-1).ravel()
    edges = np.linspace(0.0, r_max, n_bins + 1)
    h, _ = np.histogram(distances, bins=edges, density=False)
    width = edges[1] - edges[0]
    return 0.5 * (edges[1:] + edges[:-1]), h / (len(distances) * width)


def histogram_distance(h_a: np.ndarray, h_b: np.ndarray, r: np.ndarray) -> float:
    """∫ |h_a − h_b| dr (0 for identical, at most 2): the h(r) error of Fu et al. 2023."""
    return float(np.abs(np.asarray(h_a) - np.asarray(h_b)).sum() * (r[1] - r[0]))


class BondCriterion:
    """Fu et al.'s stability test: a trajectory has failed once some bond deviates from its reference length
    by more than ``threshold`` Å.  Bonds are pairs closer than the sum of ASE's covalent radii × ``scale`` in
    most reference frames; reference lengths are their mean distances.  Only distances are used, so frames
    of a molecule that rotates or drifts are fine.
    """

    def __init__(self, numbers: np.ndarray, reference_positions: np.ndarray, threshold: float = 0.5,
                 scale: float = 1.2, max_frames: int = 2000) -> None:
        reference = np.asarray(reference_positions, dtype=np.float64)
        if reference.ndim == 2:
            reference = reference[None]
        reference = reference[:: max(1, len(reference) // max_frames)]
        radii = np.asarray(natural_cutoffs(Atoms(numbers=numbers), mult=scale))
        i, j = np.triu_indices(len(numbers), k=1)
        distances = np.linalg.norm(reference[:, j] - reference[:, i], axis=-1)  # [F, pairs]
        bonded = (distances < radii[i] + radii[j]).mean(0) > 0.5
        self.pairs = np.stack([i[bonded], j[bonded]])
        self.lengths = distances[:, bonded].mean(0)
        self.threshold = threshold
        self.n_atoms = len(numbers)

    def deviation(self, positions: np.ndarray) -> np.ndarray:
        """Largest bond-length deviation (Å) of each frame of ``positions [T, N, 3]`` (or one frame)."""
        positions = np.asarray(positions)
        lengths = np.linalg.norm(positions[..., self.pairs[1], :] - positions[..., self.pairs[0], :], axis=-1)
        return np.abs(lengths - self.lengths).max(-1)

    def stop_when(self):
        """A ``stop_when(state, outputs)`` hook for batched MD of copies of this molecule: True once failed."""
        cache: dict[str, torch.Tensor] = {}

        def failed(state, outputs) -> torch.Tensor:
            if "i" not in cache:
                starts = state.ptr[:-1]
                if bool((state.n_atoms != self.n_atoms).any()):
                    raise ValueError("every system must be a copy of the reference molecule")
                pairs = torch.as_tensor(self.pairs, device=state.device)
                cache["i"] = (starts[:, None] + pairs[0][None]).reshape(-1)
                cache["j"] = (starts[:, None] + pairs[1][None]).reshape(-1)
                cache["ref"] = torch.as_tensor(self.lengths, dtype=state.dtype, device=state.device).repeat(
                    state.n_systems)
                cache["system"] = torch.arange(state.n_systems, device=state.device).repeat_interleave(
                    self.pairs.shape[1])
            lengths = torch.linalg.vector_norm(state.positions[cache["j"]] - state.positions[cache["i"]], dim=-1)
            deviation = (lengths - cache["ref"]).abs()
            worst = torch.zeros(state.n_systems, dtype=state.dtype, device=state.device)
            worst = worst.scatter_reduce(0, cache["system"], deviation, reduce="amax", include_self=True)
            return ~(worst <= self.threshold)  # NaN counts as failed

        return failed
