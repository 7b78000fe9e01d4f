"""Ziegler–Biersack–Littmark universal screened nuclear repulsion, smoothly switched off.

A physical prior for very short distances that the training data never covers (high-energy
collisions, bad MD steps): it keeps atoms from collapsing onto each other.
"""

from __future__ import annotations

import torch
from ase.data import covalent_radii
from torch import nn

from equiforce.models.zbl_constants import COULOMB_EV_A, PHI_COEFFICIENTS, PHI_EXPONENTS
from equiforce.nn.radial import PolynomialEnvelope


class ZBLRepulsion(nn.Module):
    """Pair energy ``Z_i Z_j e²/(4πε0 r) φ(r/a)`` times a smooth switch to zero at ``r_i^cov + r_j^cov``."""

    def __init__(self, elements: list[int], cutoff: float, p: int = 6) -> None:
        super().__init__()
        dtype = torch.get_default_dtype()
        self.register_buffer("z", torch.tensor(elements, dtype=dtype))
        self.register_buffer("radius", torch.tensor([covalent_radii[z] for z in elements], dtype=dtype))
        self.register_buffer("phi_c", torch.tensor(PHI_COEFFICIENTS, dtype=dtype))
        self.register_buffer("phi_e", torch.tensor(PHI_EXPONENTS, dtype=dtype))
        self.cutoff = float(cutoff)
        self.switch = PolynomialEnvelope(1.0, p)

    def unswitched(self, species_i: torch.Tensor, species_j: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Energy of each directed edge (half a pair) without the covalent switch, ``[E]`` in eV: for a caller
        that switches the prior off itself (``zbl_range: handover``, by the short-range fade)."""
        zi, zj = self.z[species_i], self.z[species_j]
        a = 0.46850 / (zi**0.23 + zj**0.23)
        x = (r / a).unsqueeze(-1)
        phi = (self.phi_c * torch.exp(-self.phi_e * x)).sum(-1)
        return 0.5 * COULOMB_EV_A * zi * zj / r * phi

    def covalent_switch(self, species_i: torch.Tensor, species_j: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """1 at short range, smoothly 0 at the sum of the two covalent radii (or the cutoff, if nearer)."""
        r_max = (self.radius[species_i] + self.radius[species_j]).clamp(max=self.cutoff)
        return self.switch(r / r_max)

    def forward(self, species_i: torch.Tensor, species_j: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Energy of each directed edge (half a pair), ``[E]`` in eV."""
        return self.unswitched(species_i, species_j, r) * self.covalent_switch(species_i, species_j, r)
