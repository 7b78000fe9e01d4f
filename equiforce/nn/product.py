"""The many-body product that raises body order (MACE's symmetric contraction, evaluated iteratively).

From the atomic basis ``A`` (a sum over neighbours: 2-body) it forms element-dependent polynomial
features ``B = Σ_ν W_ν[z] · A^{⊗ν}`` up to ``correlation`` ν, coupled back to equivariant blocks.
Each power is built from the previous one by a channel-wise product with ``A``, so a correlation-3
layer gives 4-body features at the cost of two node-wise products (never per edge).

The iteration ties the weights of a ν-fold coupling to a product of per-step weights (a rank-one
factorisation of MACE's full weight tensor per channel).  ``branches`` K runs K independent iterations and
sums them — a rank-K factorisation, closer to the full symmetric contraction for K× the node-wise cost.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from equiforce.nn.irreps import degree_of_component, irreps_dim
from equiforce.nn.tensor_product import ChannelwiseProduct


class SymmetricProduct(nn.Module):
    def __init__(self, lmax_in: int, lmax_out: int, correlation: int, channels: int, num_elements: int,
                 branches: int = 1) -> None:
        super().__init__()
        if correlation < 1:
            raise ValueError("correlation must be >= 1")
        if branches < 1:
            raise ValueError("branches must be >= 1")
        self.branches = branches
        self.dim_out = irreps_dim(lmax_out)
        self.linear_weights = nn.Parameter(torch.ones(num_elements, lmax_out + 1, channels))
        degree = degree_of_component(lmax_out)
        expand = torch.zeros(lmax_out + 1, len(degree), dtype=torch.get_default_dtype())
        expand[degree, torch.arange(len(degree))] = 1.0
        self.register_buffer("expand", expand, persistent=False)  # [L+1, D]: per-degree weight → components
        self.products = nn.ModuleList()
        self.product_weights = nn.ParameterList()
        for nu in range(2, correlation + 1):
            lmax_next = lmax_in if nu < correlation else lmax_out
            # the first product is A ⊗ A: symmetric, so half the coefficients and merged paths suffice
            product = ChannelwiseProduct(lmax_in, lmax_in, lmax_next, symmetric=nu == 2)
            self.products.append(product)
            scale = 1.0 / math.sqrt(product.num_paths * nu)
            self.product_weights.append(nn.Parameter(torch.randn(num_elements, product.num_paths, branches * channels)
                                                     * scale))

    def forward(self, a: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """``a`` [N, C, (lmax_in+1)^2], ``onehot`` [N, elements] → [N, C, (lmax_out+1)^2].

        Element-dependent weights are selected by one-hot matmuls rather than indexing, whose backward
        (a scatter-add) is several times slower on CPU.
        """
        n, c, k = a.shape[0], a.shape[1], self.branches
        linear = (onehot @ self.linear_weights.flatten(1)).view(n, -1, c).transpose(1, 2) @ self.expand
        out = a[..., : self.dim_out] * linear
        a_k = a if k == 1 else a.repeat(1, k, 1)  # branch b holds channels [b*C, (b+1)*C)
        power = a_k
        for product, weights in zip(self.products, self.product_weights):
            power = product(power, a_k, (onehot @ weights.flatten(1)).view(n, -1, k * c))
            term = power[..., : self.dim_out]
            out = out + (term if k == 1 else term.view(n, k, c, -1).sum(1) * k**-0.5)
        return out
