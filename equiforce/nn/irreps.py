"""Irreducible-representation bookkeeping for features stored as ``[..., channels, (L+1)^2]``.

Every feature block of degree l carries the natural parity (-1)^l (0e, 1o, 2e, 3o, ...).  A coupling
l1 ⊗ l2 → l3 keeps that property exactly when l1 + l2 + l3 is even, so only those paths are used:
the model is then equivariant under rotations *and* reflections.  Clebsch-Gordan coefficients come
from e3nn, in the same real basis as its spherical harmonics.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from e3nn import o3


def irreps_dim(lmax: int) -> int:
    """Number of components of all blocks l = 0..lmax."""
    return (lmax + 1) ** 2


def block(l: int) -> slice:
    """Components of the degree-l block inside a ``(L+1)^2`` vector."""
    return slice(l * l, (l + 1) * (l + 1))


def coupling_paths(lmax_1: int, lmax_2: int, lmax_out: int) -> list[tuple[int, int, int]]:
    """All parity-preserving couplings (l1, l2, l3) with l1 ≤ lmax_1, l2 ≤ lmax_2, l3 ≤ lmax_out."""
    paths = []
    for l1 in range(lmax_1 + 1):
        for l2 in range(lmax_2 + 1):
            for l3 in range(abs(l1 - l2), min(l1 + l2, lmax_out) + 1):
                if (l1 + l2 + l3) % 2 == 0:
                    paths.append((l1, l2, l3))
    return paths


@lru_cache(maxsize=64)
def _cg_dense(lmax_1: int, lmax_2: int, lmax_out: int) -> torch.Tensor:
    paths = coupling_paths(lmax_1, lmax_2, lmax_out)
    with torch.device("cpu"):  # real numbers even inside a meta-device build (the weight-shape check of a file)
        cg = torch.zeros(len(paths), irreps_dim(lmax_1), irreps_dim(lmax_2), irreps_dim(lmax_out),
                         dtype=torch.float64)
        for p, (l1, l2, l3) in enumerate(paths):
            # component normalisation: unit-variance inputs give unit-variance outputs per path
            cg[p, block(l1), block(l2), block(l3)] = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * (
                (2 * l3 + 1) ** 0.5)
    return cg


def clebsch_gordan(lmax_1: int, lmax_2: int, lmax_out: int) -> torch.Tensor:
    """Dense coupling tensor ``[paths, (lmax_1+1)^2, (lmax_2+1)^2, (lmax_out+1)^2]`` in float64."""
    return _cg_dense(lmax_1, lmax_2, lmax_out).clone()


def spherical_harmonics(lmax: int, vectors: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics of unit vectors, component-normalised, ``[E, (lmax+1)^2]``."""
    return o3.spherical_harmonics(list(range(lmax + 1)), vectors, normalize=True, normalization="component")


def degree_of_component(lmax: int) -> torch.Tensor:
    """The degree l of each of the ``(lmax+1)^2`` components."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])
