"""Per-element reference energies (E0s), normalisation statistics and train/validation splits.

The model learns the energy relative to a sum of per-element constants; getting those from the
data (isolated atoms when present, least squares otherwise) keeps the learned part small.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from equiforce.data import keys as K
from equiforce.data.graph import Graph, edge_vectors
from equiforce.data.structure import Configuration
from equiforce.errors import DataError

ISOLATED_ATOM_TYPES = {"isolatedatom"}  # compared after lower-casing and dropping "_", so "isolated_atom" works


def is_isolated_atom(config: Configuration) -> bool:
    """A single atom in vacuum (or explicitly labelled so): its energy is that element's E0."""
    label = config.config_type.lower().replace("_", "").replace("-", "")
    if label in ISOLATED_ATOM_TYPES:
        return True
    return config.n_atoms == 1 and not bool(np.any(config.pbc))


def fit_e0s(configs: Sequence[Configuration], elements: list[int],
            fixed: Mapping[int, float] | None = None) -> dict[int, float]:
    """Per-element reference energies in eV.

    ``fixed`` E0s (those of a trained model, when it learns new elements) are kept as given; isolated-atom
    entries fix their element's E0 otherwise (averaged if repeated; entries for elements not in
    ``elements`` are ignored); the other elements are fitted by least squares on the composition matrix of
    the remaining labelled configurations, after subtracting the known E0s.  Elements with no usable data
    get 0.0 and a warning.
    """
    elements = [int(z) for z in elements]
    column = {z: k for k, z in enumerate(elements)}
    isolated: dict[int, list[float]] = {}
    rows: list[np.ndarray] = []
    targets: list[float] = []
    for c in configs:
        if is_isolated_atom(c):
            if c.n_atoms != 1:
                raise DataError(f"labelled as an isolated atom but has {c.n_atoms} atoms", source=c.source,
                                frame=c.frame, field="config_type")
            # isolated-atom files often list more elements than a model needs: skip the extra ones
            if c.energy is not None and int(c.numbers[0]) in column:
                isolated.setdefault(int(c.numbers[0]), []).append(float(c.energy))
            continue
        unknown = sorted(set(c.numbers.tolist()) - set(column))
        if unknown:
            raise DataError(f"elements {unknown} are not in the element list {elements}", source=c.source,
                            frame=c.frame, field="numbers")
        if c.energy is None:
            continue
        rows.append(np.bincount([column[int(z)] for z in c.numbers], minlength=len(elements)).astype(np.float64))
        targets.append(float(c.energy))
    counts = np.stack(rows) if rows else np.zeros((0, len(elements)))
    return fit_e0s_from_counts(counts, np.asarray(targets, dtype=np.float64), isolated, elements, fixed)


def fit_e0s_from_counts(counts: np.ndarray, energies: np.ndarray, isolated: Mapping[int, Sequence[float]],
                        elements: Sequence[int], fixed: Mapping[int, float] | None = None,
                        weights: np.ndarray | None = None) -> dict[int, float]:
    """:func:`fit_e0s` from a composition matrix (``counts[s, k]``: atoms of ``elements[k]`` in labelled structure
    ``s``), those structures' energies and the isolated-atom energies per element: the form a packed dataset
    keeps, so its E0s are fitted without reading a structure.  With ``weights``, row ``s`` stands for
    ``weights[s]`` structures of that composition and ``energies[s]`` is their mean: the same least-squares
    problem with one row per distinct composition (a million molecules of one formula are one row)."""
    elements = [int(z) for z in elements]
    e0s = {z: float(np.mean(isolated[z])) for z in elements if z in isolated and len(isolated[z])}
    e0s.update({int(z): float(v) for z, v in (fixed or {}).items() if int(z) in elements})
    if len(counts):
        counts = np.asarray(counts, dtype=np.float64)
        energies = np.asarray(energies, dtype=np.float64)
        known = np.array([z in e0s for z in elements])
        energies = energies - counts[:, known] @ np.array([e0s[z] for z in elements if z in e0s])
        present = (counts.sum(axis=0) > 0) & ~known
        fit = [z for z, p in zip(elements, present) if p]
        if fit:
            a = counts[:, present]
            if weights is not None:  # Σ_s (E_s − c·x)² = Σ_groups n (Ē − c·x)² + a constant
                root = np.sqrt(np.asarray(weights, dtype=np.float64))
                a, energies = a * root[:, None], energies * root
            solution, _, rank, _ = np.linalg.lstsq(a, energies, rcond=None)
            if rank < len(fit):
                warnings.warn(f"E0s of elements {fit} are not uniquely determined by the compositions in the data "
                              f"(rank {rank} < {len(fit)}; e.g. every structure is the same molecule); using the "
                              "minimum-norm least-squares solution. Energies and forces of these compositions are "
                              "unaffected, but other compositions and dissociation limits are arbitrary: give "
                              "isolated-atom frames and `e0s: isolated`, or values (`e0s: {1: -13.6, ...}`)",
                              stacklevel=3)
            e0s.update({z: float(v) for z, v in zip(fit, solution)})
    missing = [z for z in elements if z not in e0s]
    if missing:
        warnings.warn(f"no energy-labelled data for elements {missing}; their E0 is set to 0.0", stacklevel=3)
        e0s.update({z: 0.0 for z in missing})
    return {z: e0s[z] for z in elements}


def dataset_statistics(graphs: Sequence[Graph], e0s: dict[int, float]) -> dict:
    """Statistics used to normalise the model: neighbour count, force scale and energy shift.

    ``energy_shift``/``energy_per_atom_std`` are the mean/std over labelled configurations of
    (E - Σ E0) / n_atoms; ``force_rms`` is the RMS force component (1.0 when there are no forces).
    """
    if len(graphs) == 0:
        raise ValueError("dataset_statistics needs at least one graph")
    n_edges = 0
    columns: dict[str, list[np.ndarray]] = {k: [] for k in ("n_atoms", "energy", "has_energy", "e0_sum")}
    force_sq = 0.0
    force_count = 0
    for g in graphs:
        n_atoms = g[K.N_ATOMS].to(torch.long)
        n_edges += int(g[K.EDGE_INDEX].shape[1])
        batch = torch.repeat_interleave(torch.arange(len(n_atoms)), n_atoms)
        numbers = g[K.NUMBERS].tolist()
        missing = sorted(set(numbers) - set(int(z) for z in e0s))
        if missing:
            raise DataError(f"no E0 given for elements {missing}", field="numbers")
        e0_atoms = torch.tensor([e0s[z] for z in numbers], dtype=torch.float64)
        columns["e0_sum"].append(torch.zeros(len(n_atoms), dtype=torch.float64).index_add_(0, batch, e0_atoms).numpy())
        columns["n_atoms"].append(n_atoms.numpy())
        columns["energy"].append(g[K.ENERGY].to(torch.float64).numpy())
        columns["has_energy"].append(g[K.HAS_ENERGY].to(torch.float64).numpy() > 0)
        has_f = g[K.HAS_FORCES].to(torch.float64)[batch] > 0
        forces = g[K.FORCES].to(torch.float64)[has_f]
        force_sq += float((forces**2).sum())
        force_count += int(forces.numel())
    joined = {k: np.concatenate(v) for k, v in columns.items()}
    return statistics_from_columns(n_edges=n_edges, force_sq=force_sq, force_count=force_count, **joined)


def statistics_from_columns(*, n_atoms: np.ndarray, n_edges: int, energy: np.ndarray, has_energy: np.ndarray,
                            e0_sum: np.ndarray, force_sq: float, force_count: int) -> dict:
    """:func:`dataset_statistics` from per-structure columns (atoms, energy, whether labelled, Σ E0) and totals
    (edges, Σ F², force components): what a packed dataset keeps, so statistics cost no pass over its graphs."""
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    labelled = np.asarray(has_energy, dtype=bool)
    shifts = ((np.asarray(energy, dtype=np.float64) - np.asarray(e0_sum, dtype=np.float64))
              / np.maximum(n_atoms, 1))[labelled]
    n_atoms_total = int(n_atoms.sum())
    return {
        "avg_num_neighbors": float(n_edges / max(n_atoms_total, 1)),
        "force_rms": float(np.sqrt(force_sq / force_count)) if force_count and force_sq > 0 else 1.0,
        "energy_shift": float(shifts.mean()) if len(shifts) else 0.0,
        "energy_per_atom_std": float(shifts.std()) if len(shifts) else 0.0,
        "n_configs": int(len(n_atoms)),
        "n_atoms": n_atoms_total,
    }


def closest_pairs(graphs: Sequence[Graph]) -> dict[tuple[int, int], float]:
    """The shortest distance (Å) of each element pair ``(z1 <= z2)`` over every edge of ``graphs`` (periodic
    images included): where the data end at short range, for the model's ``short_range_fade``."""
    closest: dict[tuple[int, int], float] = {}
    for g in graphs:
        edge_index = g[K.EDGE_INDEX]
        if edge_index.shape[1] == 0:
            continue
        i, j = edge_index[0], edge_index[1]
        n_atoms = g[K.N_ATOMS].to(torch.long)
        batch = torch.repeat_interleave(torch.arange(len(n_atoms)), n_atoms)
        vectors = edge_vectors(g[K.POSITIONS].to(torch.float64), edge_index, g[K.SHIFTS].to(torch.float64),
                               g[K.CELL].to(torch.float64), batch)
        lengths = torch.linalg.vector_norm(vectors, dim=-1)
        z_i, z_j = g[K.NUMBERS][i], g[K.NUMBERS][j]
        low, high = torch.minimum(z_i, z_j), torch.maximum(z_i, z_j)
        code = low * 200 + high  # one integer per unordered pair
        for value in torch.unique(code).tolist():
            shortest = float(lengths[code == value].min())
            pair = (value // 200, value % 200)
            closest[pair] = min(closest.get(pair, shortest), shortest)
    return closest


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reproducible random train/validation split of ``range(n)``; both index arrays sorted.

    A positive fraction always gives at least one validation and one training index (n >= 2).
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_valid = int(round(valid_fraction * n))
    if valid_fraction > 0 and n >= 2:
        n_valid = min(max(n_valid, 1), n - 1)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])
