"""The cheap single-model estimator: a shallow ensemble of uncertainty heads on a frozen potential.

Why this shape (cost ≤ 1.3× one model, forces included):

* A shallow ensemble of K *energy* readouts (Kellner & Ceriotti, arXiv:2402.16621) gives the energy σ
  for the price of a small MLP, but its per-atom *force* σ would need K extra backward passes through
  the backbone.  So forces get their own heads: K direct, equivariant force vectors per atom read from
  the l=1 part of the penultimate layer's features, ``δF_ki = Σ_c G_kc(x_i) v_ic``, with invariant
  channel gates ``G`` from the scalar features.  No backward pass; the vectors rotate with the structure.
* Stress gets K per-atom virial samples (an isotropic part plus a symmetric product of two gated l=1
  vectors), summed per structure and divided by the volume.
* The backbone's own prediction is untouched (its forces stay conservative); the heads model the
  distribution of its *error*: their K outputs are K samples of the residual, σ is their RMS
  (``σ² = mean_k δ_k²``), trained with a Gaussian negative log-likelihood on the residuals of the
  training data (see :mod:`equiforce.uq.fit`).
* Heads trained on in-distribution residuals do not know what they have not seen (measured on ethanol:
  the NLL heads alone gave H-removal structures the same force σ as MD frames).  So every atom's samples
  are multiplied by an *extrapolation factor* ``g_i = sqrt(max(1, d_i / d_ref))``, where ``d_i`` is the
  Mahalanobis distance of its invariant features (scalars and l=1 norms) from the training atoms of the
  same element — the local-prediction-rigidity form ``x_iᵀ(XᵀX/n + λI)⁻¹x_i`` of a linear readout — and
  ``d_ref`` the distance that 99% of training atoms stay below.  Inside the training domain g = 1 and the
  heads' ranking is untouched; outside, σ grows with the distance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from equiforce.data import keys as K
from equiforce.data.graph import stress_volume, sum_per_graph
from equiforce.errors import ConfigError
from equiforce.models.potential import Potential
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import Calibration

SIGMA_FLOOR = 1e-6  # eV, eV/Å, eV/Å³: keeps σ strictly positive for the likelihood


class UQHeads(nn.Module):
    """K error samples per atom for energy, forces and virial from a potential's node features."""

    def __init__(self, channels: int, n_heads: int = 8, hidden: int = 32, n_elements: int = 1) -> None:
        super().__init__()
        self.channels, self.n_heads, self.hidden, self.n_elements = channels, n_heads, hidden, n_elements
        in_dim = 2 * channels
        rigidity_dim = 3 * channels
        # extrapolation factor (see the module docstring), fitted on the training data
        self.register_buffer("r_mean", torch.zeros(rigidity_dim))
        self.register_buffer("r_std", torch.ones(rigidity_dim))
        self.register_buffer("r_precision", torch.zeros(n_elements, rigidity_dim, rigidity_dim))
        self.register_buffer("r_reference", torch.ones(n_elements))
        # feature normalisation, fitted on the training data (see equiforce.uq.fit.fit_heads)
        self.register_buffer("x_mean", torch.zeros(in_dim))
        self.register_buffer("x_std", torch.ones(in_dim))
        self.register_buffer("v_scale", torch.ones(channels))
        self.stress_trained = False  # a plain attribute (stored in the file header): no device sync to read it
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.energy = nn.Linear(hidden, n_heads)
        self.force_gate = nn.Linear(hidden, n_heads * channels)
        self.virial_iso = nn.Linear(hidden, n_heads)
        self.virial_gate = nn.Linear(hidden, 2 * n_heads * channels)
        for layer in (self.force_gate, self.virial_gate):
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(hidden * channels))

    @staticmethod
    def inputs(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Invariants ``x [N, 2C]`` (last and penultimate scalars) and l=1 vectors ``v [N, C, 3]``."""
        last, penultimate = features[-1], features[-2]
        return torch.cat([last[..., 0], penultimate[..., 0]], dim=-1), penultimate[..., 1:4]

    def rigidity_features(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Normalised invariants of an atom's environment: scalars and the norms of the l=1 channels."""
        return (torch.cat([x, v.square().sum(-1).sqrt()], dim=-1) - self.r_mean) / self.r_std

    def distance(self, x: torch.Tensor, v: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance ``d_i`` of each atom from the training atoms of its element ``[N]``."""
        z = self.rigidity_features(x, v)
        projected = torch.einsum("nd,edf->enf", z, self.r_precision)  # every element's precision: no host sync
        mine = projected[species, torch.arange(z.shape[0], device=z.device)]
        return (mine * z).sum(-1)

    def extrapolation(self, x: torch.Tensor, v: torch.Tensor, species: torch.Tensor) -> torch.Tensor:
        """``g_i = sqrt(max(1, d_i / d_ref))``: 1 inside the training domain, growing outside it ``[N]``."""
        ratio = self.distance(x, v, species) / self.r_reference[species]
        return ratio.clamp_min(1.0).sqrt()

    def samples(self, x: torch.Tensor, v: torch.Tensor, forces: bool = True, virial: bool = False,
                species: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-atom error samples: energy ``[K, N]``, forces ``[K, N, 3]``, virial ``[K, N, 3, 3]`` (when asked).

        With ``species`` (element index per atom) the samples carry the extrapolation factor.
        """
        k, c = self.n_heads, self.channels
        h = self.trunk((x - self.x_mean) / self.x_std)
        g = self.extrapolation(x, v, species) if species is not None else torch.ones_like(x[:, 0])
        out = {"energy": self.energy(h).transpose(0, 1) * g}
        v = v / self.v_scale[:, None]
        if forces:
            gate = self.force_gate(h).reshape(-1, k, c)
            out["forces"] = torch.einsum("nkc,nci->kni", gate, v) * g[:, None]
        if virial:
            uw = self.virial_gate(h).reshape(-1, 2, k, c)
            u, w = torch.einsum("nkc,nci->kni", uw[:, 0], v), torch.einsum("nkc,nci->kni", uw[:, 1], v)
            outer = u.unsqueeze(-1) * w.unsqueeze(-2)
            eye = torch.eye(3, dtype=x.dtype, device=x.device)
            iso = self.virial_iso(h).transpose(0, 1)[..., None, None] * eye
            out["virial"] = (iso + 0.5 * (outer + outer.transpose(-1, -2))) * g[:, None, None]
        return out

    @staticmethod
    def sigma(samples: dict[str, torch.Tensor], graph: dict[str, torch.Tensor], forces: bool = True,
              stress: bool = False) -> dict[str, torch.Tensor]:
        """Raw σ from the samples: per structure (energy, stress) and per atom (forces, norm convention)."""
        batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(graph[K.NUMBERS])
        num_graphs = graph[K.CELL].shape[0]
        e = samples["energy"]
        per_graph = sum_per_graph(e, batch, num_graphs, dim=1)
        out = {"energy": (per_graph.square().mean(0) + SIGMA_FLOOR**2).sqrt()}
        if forces:
            out["forces"] = (samples["forces"].square().sum(-1).mean(0) + SIGMA_FLOOR**2).sqrt()
        if stress:
            w = samples["virial"]
            total = sum_per_graph(w, batch, num_graphs, dim=1)
            periodic, safe = stress_volume(graph, graph[K.CELL])  # no stress, no σ: a molecule in a box
            sigma = ((total / safe[None, :, None, None]).square().mean(0) + SIGMA_FLOOR**2).sqrt()
            out["stress"] = torch.where(periodic[:, None, None], sigma, torch.zeros_like(sigma))
        return out


def check_backbone(backbone: Potential) -> None:
    """The force heads need l=1 features in the penultimate layer."""
    check_heads_architecture(backbone.spec.num_layers, backbone.spec.max_l)


def check_heads_architecture(num_layers: int, max_l: int) -> None:
    """:func:`check_backbone` from the architecture alone: ``train-uq`` asks before training a backbone."""
    if num_layers < 2 or max_l < 1:
        raise ConfigError(f"uncertainty heads need num_layers ≥ 2 and max_l ≥ 1 (they read the l=1 features of the "
                          f"penultimate layer); this model has num_layers={num_layers}, max_l={max_l}: use an "
                          "ensemble instead (uq.method: ensemble)")


class UQPotential(UQModel):
    """A potential plus uncertainty heads: the backbone's predictions with calibrated σ, in one pass."""

    def __init__(self, backbone: Potential, heads: UQHeads, calibration: Calibration | None = None,
                 seen_elements: Sequence[int] | None = None) -> None:
        check_backbone(backbone)
        super().__init__(backbone.spec, calibration, seen_elements)
        self.backbone = backbone
        self.heads = heads

    def forward(self, graph: dict[str, torch.Tensor], compute_forces: bool = True, compute_stress: bool = False,
                create_graph: bool = False, return_features: bool = False, calibrated: bool = True
                ) -> dict[str, torch.Tensor]:
        """The backbone's outputs plus ``energy_std``, ``forces_std`` and (when the heads were trained on
        stress labels) ``stress_std``."""
        out = self.backbone(graph, compute_forces=compute_forces, compute_stress=compute_stress,
                            create_graph=create_graph, return_features=True)
        features = out[K.NODE_FEATURES] if return_features else out.pop(K.NODE_FEATURES)
        x, v = UQHeads.inputs([f.detach() for f in features])
        stress = compute_stress and self.heads.stress_trained
        species = self.backbone.z_to_index[graph[K.NUMBERS]]
        samples = self.heads.samples(x, v, forces=compute_forces, virial=stress, species=species)
        raw = UQHeads.sigma(samples, graph, forces=compute_forces, stress=stress)
        return self._finish(out, graph, raw, calibrated)

    def descriptors(self, graph: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.backbone.descriptors(graph)
