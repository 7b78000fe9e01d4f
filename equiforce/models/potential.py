"""The MACE-class equivariant message-passing potential.

Energy is a sum of atomic energies ``E_i = E0[z_i] + shift · g_i + scale · Σ_t readout_t(h_i^t)`` with a
gate ``g_i`` that is 0 for an atom without neighbours: by default ``g_i = 1 - exp(-n_i)`` with
``n_i = Σ_j u(r_ij)`` a smooth coordination number (``u`` the cutoff envelope); with ``shift_gate: bonds``,
``g_i = 1 - Π_j (1 - s_ij)`` with ``s_ij`` a switch on the bond length (relative to the covalent radii).
Readouts are bias-free and an atom without neighbours has zero features and ``g_i = 0``, so an isolated
atom's energy is exactly its ``E0``: dissociation curves end at the right limit, while the per-atom shift
(the mean binding energy per atom, which is large with isolated-atom E0s) still normalises every bonded atom.
Forces, virial and stress are exact autograd derivatives of that one energy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from equiforce.data import keys as K
from equiforce.data.graph import edge_vectors, stress_volume, sum_per_graph
from equiforce.errors import UnknownElementError
from equiforce.models.spec import ModelSpec, pair_numbers
from equiforce.models.zbl import ZBLRepulsion
from equiforce.nn.irreps import irreps_dim, spherical_harmonics
from equiforce.nn.linear import ElementIrrepsLinear, IrrepsLinear
from equiforce.nn.product import SymmetricProduct
from equiforce.nn.radial import BesselBasis, PolynomialEnvelope, RadialMLP
from equiforce.nn.tensor_product import EdgeTensorProduct

AUTO_EDGE_CHUNK = 2048  # edges per chunk on a CPU (measured best of 1024/2048/4096/16384 on 864 Cu atoms)
AUTO_CHUNK_MIN_EDGES = 8192  # below this (a training batch of small molecules) everything in one pass


def bound_norm(a: torch.Tensor, bound: float) -> torch.Tensor:
    """``a / sqrt(1 + |a|² / bound²)`` per channel, ``|a|`` over the last (irreps) axis: a smooth, rotation-
    invariant rescaling that leaves small features nearly as they are and keeps every norm below ``bound``."""
    return a * torch.rsqrt(1.0 + (a * a).sum(-1, keepdim=True) / bound**2)


class InteractionBlock(nn.Module):
    """One message-passing layer: equivariant convolution → many-body product → update with skip."""

    def __init__(self, spec: ModelSpec, lmax_in: int, lmax_out: int, first: bool) -> None:
        super().__init__()
        c, n_el = spec.channels, len(spec.elements)
        lmax_msg = spec.message_lmax
        self.avg_num_neighbors = spec.avg_num_neighbors
        self.linear_up = IrrepsLinear(c, c, lmax_in)
        self.conv = EdgeTensorProduct(lmax_in, spec.sh_lmax, lmax_msg, spec.separate_paths)
        self.radial = RadialMLP([spec.num_radial, *spec.radial_mlp, self.conv.num_paths * c])
        self.element_messages = first and spec.element_messages
        self.basis_bound = spec.basis_bound
        c_msg = c * self.conv.copies
        self.linear_message = (ElementIrrepsLinear(c_msg, c, lmax_msg, n_el) if self.element_messages
                               else IrrepsLinear(c_msg, c, lmax_msg))
        self.product = SymmetricProduct(lmax_msg, lmax_out, spec.correlation, c, n_el, spec.product_branches)
        self.linear_out = IrrepsLinear(c, c, lmax_out)
        self.skip_dim = irreps_dim(min(lmax_in, lmax_out))
        self.skip = None if first else ElementIrrepsLinear(c, c, min(lmax_in, lmax_out), n_el)
        self.edge_chunk: int | str | None = "auto"  # see Potential.set_edge_chunk (runtime, not in the spec)

    def _messages(self, h_up: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor,
                  neighbour: torch.Tensor) -> torch.Tensor:
        return self.conv(h_up[neighbour], sh, self.radial(radial))

    def chunk_size(self, num_edges: int, device: torch.device, vmapped: bool = False) -> int | None:
        """Edges per chunk for a pass over ``num_edges`` edges (``None``: all at once) — what ``edge_chunk``
        means here, also for an ensemble deciding how to run its members."""
        chunk = self.edge_chunk
        if chunk == "auto":
            large = num_edges > AUTO_CHUNK_MIN_EDGES and device.type == "cpu" and not self.training and not vmapped
            chunk = AUTO_EDGE_CHUNK if large else None
        return chunk if chunk is not None and chunk < num_edges else None

    def _zero_basis(self, h_up: torch.Tensor) -> torch.Tensor:
        """An all-zero atomic basis ``[N, C * copies, D_msg]`` to sum the messages into."""
        shape = (h_up.shape[0], h_up.shape[1] * self.conv.copies, self.conv.dim_out)
        return torch.zeros(shape, dtype=h_up.dtype, device=h_up.device)

    def _atomic_basis(self, h_up: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor, centre: torch.Tensor,
                      neighbour: torch.Tensor) -> torch.Tensor:
        """``Σ_j m_ij`` per atom; with ``edge_chunk``, a chunk of edges at a time, recomputed in the backward
        pass (activation checkpointing), so no tensor of all edges × channels × components is ever held."""
        num_edges = centre.shape[0]
        # inside torch.func.vmap (an ensemble's members in one pass) checkpointing cannot run: chunks there
        # are plain slices (same result, no memory saved), and "auto" leaves the pass whole
        vmapped = torch._C._functorch.is_batchedtensor(h_up)
        chunk = self.chunk_size(num_edges, h_up.device, vmapped)
        if chunk is None:  # one pass, without a Python loop over the edge count (traceable with symbolic sizes)
            return self._zero_basis(h_up).index_add(0, centre, self._messages(h_up, sh, radial, neighbour))
        step = max(1, chunk)
        checkpointed = step < num_edges and torch.is_grad_enabled() and not vmapped
        a = self._zero_basis(h_up)
        for start in range(0, num_edges, step):
            part = slice(start, start + step)
            args = (h_up, sh[part], radial[part], neighbour[part])
            if checkpointed:
                messages = torch.utils.checkpoint.checkpoint(self._messages, *args, use_reentrant=False)
            else:
                messages = self._messages(*args)
            a = a.index_add(0, centre[part], messages)
        return a

    def forward(self, h: torch.Tensor, sh: torch.Tensor, radial: torch.Tensor, edge_index: torch.Tensor,
                species: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        centre, neighbour = edge_index[0], edge_index[1]
        h_up = self.linear_up(h)
        a = self._atomic_basis(h_up, sh, radial, centre, neighbour) / self.avg_num_neighbors
        a = self.linear_message(a, onehot) if self.element_messages else self.linear_message(a)
        if self.basis_bound is not None:
            a = bound_norm(a, self.basis_bound)
        out = self.linear_out(self.product(a, onehot))
        if self.skip is not None:
            skip = self.skip(h[..., : self.skip_dim], onehot)
            out = torch.cat([out[..., : self.skip_dim] + skip, out[..., self.skip_dim:]], dim=-1)
        return out


class Potential(nn.Module):
    """E(3)-equivariant interatomic potential; see :class:`ModelSpec` for the knobs."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        n_el, c = len(spec.elements), spec.channels
        self.cutoff = spec.cutoff
        z_to_index = torch.full((119,), -1, dtype=torch.long)
        z_to_index[torch.tensor(spec.elements)] = torch.arange(n_el)
        self.register_buffer("z_to_index", z_to_index, persistent=False)
        dtype = torch.get_default_dtype()
        self.register_buffer("e0", torch.tensor([spec.e0s.get(z, 0.0) for z in spec.elements], dtype=dtype))
        self.register_buffer("energy_scale", torch.tensor(spec.energy_scale, dtype=dtype))
        self.register_buffer("energy_shift", torch.tensor(spec.energy_shift, dtype=dtype))
        # per-element correction of the shift, refitted by least squares during training (see refit_shift)
        self.register_buffer("shift_correction", torch.zeros(n_el, dtype=dtype))
        self.embedding = nn.Linear(n_el, c, bias=False)
        nn.init.normal_(self.embedding.weight, std=1.0)
        self.basis = BesselBasis(spec.cutoff, spec.num_radial)
        self.envelope = PolynomialEnvelope(spec.cutoff, spec.envelope_p)
        self.blocks = nn.ModuleList()
        self.readouts = nn.ModuleList()
        for t in range(spec.num_layers):
            last = t == spec.num_layers - 1
            lmax_in = 0 if t == 0 else spec.max_l
            lmax_out = 0 if last else spec.max_l
            self.blocks.append(InteractionBlock(spec, lmax_in, lmax_out, first=t == 0))
            if last:
                readout = nn.Sequential(nn.Linear(c, spec.readout_hidden, bias=False), nn.SiLU(),
                                        nn.Linear(spec.readout_hidden, 1, bias=False))
            else:
                readout = nn.Linear(c, 1, bias=False)
            self.readouts.append(readout)
        self.zbl = ZBLRepulsion(spec.elements, spec.cutoff) if spec.zbl else None
        if spec.shift_gate == "bonds":
            from ase.data import covalent_radii

            self.register_buffer("covalent_radius", torch.tensor([float(covalent_radii[z]) for z in spec.elements],
                                                                 dtype=dtype), persistent=False)
        if spec.short_range_fade:
            # [elements, elements, 2]: (r_in, r_out) per pair; pairs not listed get a range below zero (never faded)
            fade = torch.tensor([-2.0, -1.0], dtype=dtype).repeat(n_el, n_el, 1)
            index = {z: i for i, z in enumerate(spec.elements)}
            for key, (r_in, r_out) in spec.short_range_fade.items():
                a, b = (index[z] for z in pair_numbers(key))
                fade[a, b] = fade[b, a] = torch.tensor([r_in, r_out], dtype=dtype)
            self.register_buffer("fade_range", fade, persistent=False)
        self.scalar_norm = 1.0 / math.sqrt(c)

    @property
    def elements(self) -> list[int]:
        return list(self.spec.elements)

    def set_edge_chunk(self, edges: int | str | None) -> Potential:
        """Compute messages ``edges`` at a time (``None``: all at once); results are unchanged.

        For large systems: the per-edge tensors of one pass (edges × channels × coupled components) are
        what fills memory; chunked, with each chunk recomputed in the backward pass, only node-sized
        tensors and one chunk's are alive at a time, for the cost of computing the messages twice.  On a
        CPU that is also faster (measured: an 864-atom Cu box at the issue's model size, 1.96 against
        3.27 s per MD step — the unchunked tensors of ~0.4 GB each are memory traffic, not arithmetic).
        ``"auto"`` (the default): chunks of ``AUTO_EDGE_CHUNK`` edges on a CPU, in evaluation mode, for
        more than ``AUTO_CHUNK_MIN_EDGES`` edges; otherwise all at once (GPUs: not yet measured).
        """
        set_edge_chunk(self, edges)
        return self

    def check_elements(self, numbers) -> None:
        """Raise :class:`UnknownElementError` naming any element the model was not trained on."""
        from ase.data import chemical_symbols

        unknown = sorted({int(z) for z in numbers} - set(self.spec.elements))
        if unknown:
            names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
            known = ", ".join(chemical_symbols[z] for z in self.spec.elements)
            raise UnknownElementError(f"element(s) {names} not known to this model (trained on {known})")

    def descriptors(self, graph: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-layer invariant (scalar) node features ``[N, C]`` (for uncertainty and active-learning selection)."""
        return [h[..., 0] for h in self._energy_and_features(graph, graph[K.POSITIONS], graph[K.CELL])[2]]

    def _edges(self, graph: dict[str, torch.Tensor], positions: torch.Tensor, cell: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Edge vectors r_j - r_i + S·cell and their lengths."""
        edge_index = graph[K.EDGE_INDEX]
        batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(graph[K.NUMBERS])
        vectors = edge_vectors(positions, edge_index, graph[K.SHIFTS], cell, batch)
        return vectors, torch.linalg.vector_norm(vectors, dim=-1)

    def _gate(self, species: torch.Tensor, edge_index: torch.Tensor, lengths: torch.Tensor, envelope: torch.Tensor
              ) -> torch.Tensor:
        """The shift's gate per atom: 0 for an isolated atom, ~1 for a bonded one (see ``ModelSpec.shift_gate``)."""
        centre = edge_index[0]
        zeros = torch.zeros(species.shape[0], dtype=envelope.dtype, device=envelope.device)
        if self.spec.shift_gate == "coordination":  # 1 - exp(-n_i), n_i = Σ_j u(r_ij)
            return 1.0 - torch.exp(-zeros.index_add(0, centre, envelope))
        # 1 - Π_j (1 - s_ij): "at least one bond", as a sum of logs; s = 1 (a bond) makes the product exactly 0
        # (the clamp's zero gradient there is also the switch's), s = 0 (no bond) leaves it unchanged
        bond = self.covalent_radius[species[centre]] + self.covalent_radius[species[edge_index[1]]]
        # the switch ends inside the cutoff even for very large atoms, so the gate stays smooth when an edge leaves
        on, off = self.spec.bond_switch
        r_off = torch.clamp(off * bond, max=self.cutoff)
        r_on = r_off * (on / off)
        t = ((lengths - r_on) / (r_off - r_on)).clamp(0.0, 1.0)
        switch = 1.0 - t**3 * (10.0 - 15.0 * t + 6.0 * t**2)  # smootherstep: C² at both ends
        log_free = torch.log((1.0 - switch).clamp(min=1e-30))
        return 1.0 - torch.exp(zeros.index_add(0, centre, log_free))

    def _short_range_fade(self, species: torch.Tensor, edge_index: torch.Tensor, lengths: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per edge: the fade (0 below the pair's r_in, 1 beyond its r_out, smootherstep (C²) in between) and
        whether the pair has a fade range at all (unlisted pairs carry a range below zero, so always 1)."""
        bounds = self.fade_range[species[edge_index[0]], species[edge_index[1]]]  # [E, 2]
        r_in, r_out = bounds[:, 0], bounds[:, 1]
        t = ((lengths - r_in) / (r_out - r_in)).clamp(0.0, 1.0)
        return t**3 * (10.0 - 15.0 * t + 6.0 * t**2), r_in >= 0.0

    @torch.no_grad()
    def shift_design(self, graph: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, elements]``: Σ of the shift gate over each graph's atoms of each element.

        The energy is linear in the per-element shifts with these coefficients, so the shifts can be refitted
        by least squares on energy residuals; for bonded atoms the gate is ~1, so that moves energies by
        per-element constants and forces hardly at all, and isolated atoms stay at exactly E0.
        """
        species = self.z_to_index[graph[K.NUMBERS]]
        _, lengths = self._edges(graph, graph[K.POSITIONS], graph[K.CELL])
        gate = self._gate(species, graph[K.EDGE_INDEX], lengths, self.envelope(lengths))
        batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(species)
        onehot = torch.nn.functional.one_hot(species, len(self.spec.elements)).to(gate.dtype)
        design = torch.zeros(graph[K.CELL].shape[0], onehot.shape[1], dtype=gate.dtype, device=gate.device)
        return design.index_add(0, batch, onehot * gate[:, None])

    def _energy_and_features(self, graph: dict[str, torch.Tensor], positions: torch.Tensor, cell: torch.Tensor):
        species = self.z_to_index[graph[K.NUMBERS]]
        edge_index = graph[K.EDGE_INDEX]
        batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(species)
        centre, neighbour = edge_index[0], edge_index[1]
        vectors, lengths = self._edges(graph, positions, cell)
        sh = spherical_harmonics(self.spec.sh_lmax, vectors)
        envelope = self.envelope(lengths)
        radial = self.basis(lengths) * envelope.unsqueeze(-1)
        fade = listed = None
        if self.spec.short_range_fade:  # pairs closer than the data ever saw: the network lets go, ZBL stays
            fade, listed = self._short_range_fade(species, edge_index, lengths)
            radial = radial * fade.unsqueeze(-1)
        onehot = torch.nn.functional.one_hot(species, len(self.spec.elements)).to(positions.dtype)
        h = self.embedding(onehot).unsqueeze(-1)
        atomic = torch.zeros_like(positions[:, 0])
        features = []
        for block, readout in zip(self.blocks, self.readouts):
            h = block(h, sh, radial, edge_index, species, onehot)
            features.append(h)
            atomic = atomic + readout(h[..., 0]).squeeze(-1)
        # the shift applies to bonded atoms only, switched on smoothly by the gate (ModelSpec.shift_gate)
        shift = self.energy_shift + self.shift_correction[species]
        node_energy = (self.e0[species] + shift * self._gate(species, edge_index, lengths, envelope)
                       + self.energy_scale * atomic)
        if self.zbl is not None:
            zi, zj = species[centre], species[neighbour]
            if fade is not None and self.spec.zbl_range == "handover":  # the prior takes exactly what the network
                # lets go of a listed pair (no covalent switch: for H-H it would end before the fade begins)
                pair = torch.where(listed, self.zbl.unswitched(zi, zj, lengths) * (1.0 - fade),
                                   self.zbl(zi, zj, lengths))
            else:
                pair = self.zbl(zi, zj, lengths)
                if fade is not None and self.spec.zbl_range == "fade":  # the prior acts only where the network
                    pair = pair * torch.where(listed, 1.0 - fade, torch.ones_like(fade))  # lets go
            node_energy = node_energy.index_add(0, centre, pair)
        return sum_per_graph(node_energy, batch, graph[K.CELL].shape[0]), node_energy, features

    def forward(self, graph: dict[str, torch.Tensor], compute_forces: bool = True, compute_stress: bool = False,
                create_graph: bool = False, return_features: bool = False) -> dict[str, torch.Tensor]:
        """Energies and, when asked, forces/virial/stress as exact derivatives of the energy.

        ``return_features=True`` adds ``node_features``: a list with each layer's full equivariant node
        features ``[N, C, (L+1)^2]`` (computed in the same pass, for uncertainty heads and selection).
        """
        positions, cell = graph[K.POSITIONS], graph[K.CELL]
        num_graphs = cell.shape[0]
        inputs = []
        if compute_forces or compute_stress:
            if not positions.requires_grad:  # a caller differentiating further (Hessians) keeps its graph
                positions = positions.detach().requires_grad_(True)
            inputs.append(positions)
        if compute_stress:
            batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(graph[K.NUMBERS])
            strain = torch.zeros(num_graphs, 3, 3, dtype=positions.dtype, device=positions.device,
                                 requires_grad=True)
            symmetric = 0.5 * (strain + strain.transpose(1, 2))
            positions_in = positions + torch.einsum("ni,nij->nj", positions, symmetric[batch])
            cell_in = cell + torch.bmm(cell, symmetric)
            inputs.append(strain)
        else:
            positions_in, cell_in = positions, cell
        energy, node_energy, features = self._energy_and_features(graph, positions_in, cell_in)
        out = {K.ENERGY: energy, K.NODE_ENERGY: node_energy}
        if return_features:
            out[K.NODE_FEATURES] = features
        if inputs:
            grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
            if compute_forces:
                out[K.FORCES] = -grads[0] if grads[0] is not None else torch.zeros_like(positions)
            if compute_stress:
                d_strain = grads[-1] if grads[-1] is not None else torch.zeros_like(cell)
                periodic, safe = stress_volume(graph, cell)  # a molecule in a box (pbc all False) has none
                out[K.VIRIAL] = -d_strain
                out[K.STRESS] = torch.where(periodic[:, None, None], d_strain / safe[:, None, None],
                                            torch.zeros_like(d_strain))
        return out


def set_edge_chunk(module: nn.Module, edges: int | str | None) -> None:
    """:meth:`Potential.set_edge_chunk` for every potential inside ``module`` (an ensemble, a model with
    uncertainty heads, or a plain potential)."""
    if edges != "auto" and edges is not None and (isinstance(edges, str) or edges < 1):
        raise ValueError(f"edge chunk must be a positive number of edges, 'auto' or None, got {edges!r}")
    for sub in module.modules():
        # an ensemble's member template is deliberately not a submodule (see EnsemblePotential)
        hidden = sub.unregistered_modules() if hasattr(sub, "unregistered_modules") else []
        for inner in [sub, *hidden]:
            for block in inner.modules():
                if isinstance(block, InteractionBlock):
                    block.edge_chunk = edges


def with_short_range_fade(model: Potential, fade: dict[str, tuple[float, float]] | None) -> Potential:
    """A copy of ``model`` (same weights, dtype and device) whose network fades out below ``fade``'s ranges.

    The ranges are not weights (a buffer derived from the spec), so a model continued on more data — an
    active-learning round whose new structures come closer than the last ones — can move them and keep
    everything it learnt.
    """
    return _with_spec(model, short_range_fade=fade)


def with_zbl_range(model: Potential, zbl_range: str) -> Potential:
    """A copy of ``model`` whose ZBL prior acts over ``zbl_range`` — between ``fade`` and ``handover`` the very
    model it was trained as (every training pair lies beyond its fade range, where both give the prior zero)."""
    allowed = {"fade", "handover"}
    if zbl_range != model.spec.zbl_range and not (
            model.spec.zbl and model.spec.short_range_fade and {zbl_range, model.spec.zbl_range} <= allowed):
        raise ValueError(f"zbl_range {model.spec.zbl_range!r} -> {zbl_range!r} would change what the trained model "
                         "predicts on its own data; only 'fade' <-> 'handover' (with a short-range fade) keeps it")
    return _with_spec(model, zbl_range=zbl_range)


def _with_spec(model: Potential, **changes: Any) -> Potential:
    """A copy of ``model`` (same weights, dtype, device, edge chunk) with spec entries that are not weights changed."""
    spec = ModelSpec.model_validate({**model.spec.model_dump(), **changes})
    reference = next(model.parameters())
    new = build_model(spec, dtype=reference.dtype)
    new.load_state_dict(model.state_dict())
    set_edge_chunk(new, model.blocks[0].edge_chunk)  # a runtime setting, not in the spec
    return new.to(reference.device).train(model.training)


def build_model(spec: ModelSpec | dict, dtype: torch.dtype = torch.float64) -> Potential:
    """Build a fresh potential from a spec (deterministic given ``torch.manual_seed``).  Its weights are drawn in
    float64 and then cast, so float32 and float64 models of one seed start from the same weights (drawn in float32,
    they were other random numbers, and a precision comparison compared two initialisations)."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.model_validate(spec)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        model = Potential(spec)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype=dtype)
