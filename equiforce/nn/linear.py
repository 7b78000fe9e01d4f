"""Channel-mixing linear maps that act on each degree l separately (so they commute with rotations)."""

from __future__ import annotations

import math

import torch
from torch import nn


class IrrepsLinear(nn.Module):
    """``[N, C_in, (L+1)^2] -> [N, C_out, (L+1)^2]`` with one weight matrix per degree l."""

    def __init__(self, channels_in: int, channels_out: int, lmax: int) -> None:
        super().__init__()
        self.lmax = lmax
        self.weight = nn.Parameter(torch.randn(lmax + 1, channels_in, channels_out))
        self.norm = 1.0 / math.sqrt(channels_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one matmul per degree on [N*(2l+1), C_in]: no gathered weight copy, whose backward is a scatter
        n = x.shape[0]
        parts = []
        for l in range(self.lmax + 1):
            xl = x[:, :, l * l:(l + 1) * (l + 1)].transpose(1, 2).reshape(-1, x.shape[1])
            parts.append((xl @ self.weight[l]).view(n, 2 * l + 1, -1).transpose(1, 2))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out * self.norm


class ElementIrrepsLinear(nn.Module):
    """A linear map whose weights depend on each atom's element (MACE's element-dependent skip).

    Written as a linear map of ``x ⊗ onehot(element)``, so it is one batched op with no host sync.
    """

    def __init__(self, channels_in: int, channels_out: int, lmax: int, num_elements: int) -> None:
        super().__init__()
        self.num_elements = num_elements
        self.linear = IrrepsLinear(channels_in * num_elements, channels_out, lmax)
        self.linear.norm = 1.0 / math.sqrt(channels_in)

    def forward(self, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        n, c, d = x.shape
        xe = x.unsqueeze(2) * onehot[:, None, :, None]
        if d == 1:  # scalar-only features: a traced graph records the reshape below as a view that the compiler's
            # stride propagation cannot take (such models never compiled); a contiguous copy first
            xe = xe.clone(memory_format=torch.contiguous_format)
        return self.linear(xe.reshape(n, c * self.num_elements, d))
