"""Radial basis with a smooth cutoff envelope, and the radial MLP that weights tensor-product paths."""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """sqrt(2/rc) sin(nπ r/rc) / r, n = 1..num_basis (DimeNet / MACE)."""

    def __init__(self, cutoff: float, num_basis: int = 8) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.register_buffer("frequencies", torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype())
                             * math.pi / cutoff)
        self.prefactor = math.sqrt(2.0 / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:  # [E] -> [E, num_basis]
        r = r.unsqueeze(-1)
        # 0/0 = NaN at r = 0 on purpose: two atoms on top of each other have no meaningful energy (its limit depends
        # on the direction they came from), and a NaN is what stops MD and the OpenMM/LAMMPS bridges with an error
        return self.prefactor * torch.sin(self.frequencies * r) / r


class PolynomialEnvelope(nn.Module):
    """Polynomial cutoff u(d) with u(1) = u'(1) = u''(1) = 0, so energy and forces are smooth at rc."""

    def __init__(self, cutoff: float, p: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = float(p)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        p = self.p
        d = r / self.cutoff
        u = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * d**p + p * (p + 2.0) * d ** (p + 1.0)
             - p * (p + 1.0) / 2.0 * d ** (p + 2.0))
        return u * (d < 1.0)


class RadialMLP(nn.Module):
    """Bias-free SiLU MLP: a zero input (an edge at the cutoff) maps exactly to zero weights."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(layer.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = torch.nn.functional.silu(x) * 1.679  # keeps unit variance through SiLU
        return x
