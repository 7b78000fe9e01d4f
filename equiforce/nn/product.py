"""The many-body product that raises body order (MACE's symmetric contraction, evaluated iteratively).

From the atomic basis ``A`` (a sum over neighbours: 2-body) it forms element-dependent polynomial
features ``B = Σ_ν W_ν[z] · A^{⊗ν}`` up to ``correlation`` ν, coupled back to equivariant blocks.
Each power is built from the previous one by a channel-wise product with ``A``, so a correlation-3
layer gives 4-body features at the cost of two node-wise products (never per edge).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from equiforce.nn.irreps import degree_of_component, irreps_dim
from equiforce.nn.tensor_product import ChannelwiseProduct


class SymmetricProduct(nn.Module):
    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, channels: int, num_elements: int) -> None:
        super().__init__()
        if correlation < 1:
            raise ValueError("correlation must be >= 1")
        self.dim_out = irreps_dim(lmax_out)
        self.linear_weights = nn.Parameter(torch.ones(num_elements, lmax_out + 1, channels))
        self.register_buffer("degree", degree_of_component(lmax_out), persistent=False)
        self.products = nn.ModuleList()
        self.product_weights = nn.ParameterList()
        for nu in range(2, correlation + 1):
            lmax_next = lmax_in if nu < correlation else lmax_out
            # the first product is A ⊗ A: symmetric, so half the coefficients and merged paths suffice
            product = ChannelwiseProduct(lmax_in, lmax_in, lmax_next, symmetric=nu == 2)
            self.products.append(product)
            scale = 1.0 / math.sqrt(product.num_paths * nu)
            self.product_weights.append(nn.Parameter(torch.randn(num_elements, product.num_paths, channels) * scale))

    def forward(self, a: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``a`` [N, C, (lmax_in+1)^2], ``species`` [N] element indices → [N, C, (lmax_out+1)^2]."""
        linear = self.linear_weights[species][:, self.degree].transpose(1, 2)  # [N, C, D_out]
        out = a[..., : self.dim_out] * linear
        power = a
        for product, weights in zip(self.products, self.product_weights):
            power = product(power, a, weights[species])
            out = out + power[..., : self.dim_out]
        return out
