"""Selection: which explored candidates are worth an oracle call.

Uncertainty alone picks many near-copies of the same uncertain event (one replica's last frames are
all uncertain for the same reason); diversity alone labels what the model already knows.  The default
``uncertainty_fps`` takes the ``pool_factor × n`` most uncertain candidates inside a σ window — above
what the model already knows (σ_min), below broken geometries (σ_max) — then farthest-point sampling
in the model's descriptor space, starting from the training set, so each pick is far from what is
labelled and from the other picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Candidates:
    """Explored structures with the current model's view of them."""

    sigma: np.ndarray  # [C] max atomic force σ (eV/Å)
    descriptors: np.ndarray  # [C, D] per-structure mean invariant features
    min_distance: np.ndarray  # [C] closest pair of atoms (Å)
    bond_deviation: np.ndarray | None = None  # [C] molecules: largest bond-length change from the start (Å)

    def __len__(self) -> int:
        return int(self.sigma.shape[0])


def farthest_point_sampling(points: np.ndarray, n: int, reference: np.ndarray | None = None,
                            first: int | None = None) -> list[int]:
    """Greedy max–min selection of ``n`` rows of ``points [C, D]`` (Euclidean).

    With ``reference [R, D]`` (e.g. the training set) the first pick is the point farthest from it and
    every distance counts the reference as already selected; otherwise the first pick is ``first``
    (default: row 0).  Returns indices in the order picked; fewer than ``n`` only when there are fewer points.
    """
    points = np.asarray(points, dtype=np.float64)
    count = points.shape[0]
    n = min(int(n), count)
    if n <= 0:
        return []
    picked: list[int] = []
    if reference is not None and len(reference):
        reference = np.asarray(reference, dtype=np.float64)
        nearest = np.full(count, np.inf)
        for start in range(0, len(reference), 1024):  # [C, 1024] at a time: no [C, R, D] array
            part = reference[start:start + 1024]
            d2 = (points**2).sum(1)[:, None] + (part**2).sum(1)[None, :] - 2.0 * points @ part.T
            nearest = np.minimum(nearest, np.maximum(d2, 0.0).min(1))
    else:
        picked.append(int(first or 0))
        nearest = ((points - points[picked[0]]) ** 2).sum(-1)
        nearest[picked[0]] = -1.0
    while len(picked) < n:
        choice = int(np.argmax(nearest))
        picked.append(choice)
        nearest = np.minimum(nearest, ((points - points[choice]) ** 2).sum(-1))
        nearest[picked] = -1.0
    return picked


def rank_by_uncertainty(sigma: np.ndarray) -> np.ndarray:
    """Indices from the most to the least uncertain (a stable sort: ties keep their order)."""
    return np.argsort(-np.asarray(sigma, dtype=np.float64), kind="stable")


def standardize(descriptors: np.ndarray, reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale each descriptor dimension by its spread over candidates and reference together."""
    both = descriptors if reference is None or not len(reference) else np.concatenate([descriptors, reference])
    mean, std = both.mean(0), both.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    scaled_ref = None if reference is None or not len(reference) else (reference - mean) / std
    return (descriptors - mean) / std, scaled_ref


def select(candidates: Candidates, n: int, strategy: str = "uncertainty_fps", *, training: np.ndarray | None = None,
           sigma_min: float = 0.0, sigma_max: float = np.inf, min_distance: float = 0.5, pool_factor: float = 3.0,
           max_bond_deviation: float = np.inf, rng: np.random.Generator | None = None,
           random_fraction: float = 0.0, random_pool: np.ndarray | None = None) -> list[int]:
    """Indices of at most ``n`` candidates to label.

    ``training`` are the labelled structures' descriptors (FPS starts from them).  Candidates with a pair
    of atoms closer than ``min_distance``, a bond stretched by more than ``max_bond_deviation`` (a broken
    molecule: labelling it teaches chemistry the potential will never be asked for) or σ outside
    ``[sigma_min, sigma_max]`` are skipped (σ = inf: an element never seen, always skipped).  When fewer
    than ``n`` candidates are inside the window the rest are filled with the most uncertain ones below
    ``sigma_min`` (never above ``sigma_max``), so a round's budget is used while anything is left to learn.

    ``random_fraction`` of the ``n`` picks are drawn first, uniformly, from the sane candidates marked in
    ``random_pool`` (default: all) whatever their σ — plain samples of the explored distribution, which keep
    the typical structures represented when uncertainty would spend everything on its tails; the strategy
    then picks the rest (FPS counting the random picks as already selected).
    """
    rng = rng or np.random.default_rng(0)
    sigma = np.asarray(candidates.sigma, dtype=np.float64)
    sane = (candidates.min_distance >= min_distance) & np.isfinite(sigma) & (sigma <= sigma_max)
    if candidates.bond_deviation is not None:
        sane &= candidates.bond_deviation <= max_bond_deviation
    if strategy == "random":
        pool = np.flatnonzero(sane)
        return sorted(rng.choice(pool, size=min(n, len(pool)), replace=False).tolist())
    if strategy not in ("uncertainty", "uncertainty_fps", "fps"):
        raise ValueError(f"unknown selection strategy {strategy!r}")
    if not 0.0 <= random_fraction < 1.0:
        raise ValueError(f"random_fraction must be in [0, 1), got {random_fraction}")
    hedge: list[int] = []
    n_random = int(round(random_fraction * n))
    if n_random:
        eligible = sane if random_pool is None else sane & np.asarray(random_pool, dtype=bool)
        pool = np.flatnonzero(eligible)
        hedge = sorted(int(i) for i in rng.choice(pool, size=min(n_random, len(pool)), replace=False))
        sane = sane.copy()
        sane[hedge] = False
        if hedge and strategy != "uncertainty":
            own = candidates.descriptors[hedge]
            training = own if training is None or not len(training) else np.concatenate([training, own])
    n_rest = n - len(hedge)
    window = np.flatnonzero(sane & (sigma >= sigma_min))
    below = np.flatnonzero(sane & (sigma < sigma_min))
    ranked = window[rank_by_uncertainty(sigma[window])]
    if strategy == "uncertainty":
        picked = ranked[:n_rest].tolist()
    else:
        pool = ranked[: max(n_rest, int(round(pool_factor * n_rest)))] if strategy == "uncertainty_fps" else window
        picked = []
        if len(pool) and n_rest:
            points, reference = standardize(candidates.descriptors[pool], training)
            picked = [int(pool[i]) for i in farthest_point_sampling(points, n_rest, reference, first=0)]
    if len(picked) < n_rest and len(below):
        fill = below[rank_by_uncertainty(sigma[below])]
        picked += fill[: n_rest - len(picked)].tolist()
    return hedge + [int(i) for i in picked]
