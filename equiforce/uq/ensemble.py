"""An ensemble of potentials evaluated in one batched pass: stacked weights, ``vmap`` over members.

Members are identical architectures with different weights, so their weights are stacked along a new
leading axis and ``torch.func.vmap`` runs one forward over all of them (one kernel per op instead of M;
geometry and neighbour lists are shared).  ``vmap`` cannot wrap ``autograd.grad``, so the energy is
vmapped over *member-expanded* positions ``[M, N, 3]`` (and strains ``[M, B, 3, 3]``) and forces/stress
come from one ordinary ``autograd.grad`` outside the vmap: member m's energy depends only on its own
copy, so the gradient of the summed energies gives every member's exact forces at once.

Large systems on a CPU are the exception: there the members run one after the other (``member_pass``,
"auto"), because a member alone can compute its messages in checkpointed edge chunks, which ``vmap``
cannot, and the chunked pass is the faster one once the arithmetic, not the per-op overhead, dominates.

Predictions are the member means (still conservative: the mean force is the gradient of the mean
energy); σ is the members' spread (population standard deviation), calibrated on held-out data.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from equiforce.data import keys as K
from equiforce.data.graph import stress_volume
from equiforce.errors import ModelFileError
from equiforce.models.potential import InteractionBlock, Potential, build_model
from equiforce.models.spec import ModelSpec
from equiforce.uq import keys as UK
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import Calibration

MEMBER_PASSES = ("auto", "batched", "sequential")


class MemberMismatchError(ModelFileError):
    """Ensemble members that cannot be stacked (different architecture, statistics, dtype or weights)."""


def _safe(name: str) -> str:
    return "m__" + name.replace(".", "__")


def check_members(specs: Sequence[ModelSpec], shapes: Sequence[dict[str, tuple[torch.Size, torch.dtype]]]) -> None:
    """Raise :class:`MemberMismatchError` naming the first member and field that differ from member 0."""
    if len(specs) < 2:
        raise MemberMismatchError(f"an ensemble needs at least 2 members, got {len(specs)}")
    ref = specs[0].model_dump()
    for i, spec in enumerate(specs[1:], 1):
        other = spec.model_dump()
        fields = sorted(k for k in ref if ref[k] != other.get(k))
        if fields:
            detail = "; ".join(f"{k}: {ref[k]!r} vs {other.get(k)!r}" for k in fields[:4])
            raise MemberMismatchError(f"ensemble member {i} differs from member 0 in {', '.join(fields)} ({detail}); "
                                      "members must share architecture, elements and data statistics")
    for i, entry in enumerate(shapes[1:], 1):
        if set(entry) != set(shapes[0]):
            diff = sorted(set(entry) ^ set(shapes[0]))
            raise MemberMismatchError(f"ensemble member {i} has different weights from member 0: {diff[:4]}")
        for name, (shape, dtype) in entry.items():
            if (shape, dtype) != shapes[0][name]:
                raise MemberMismatchError(f"ensemble member {i}: weight {name} is {tuple(shape)} {dtype}, member 0 "
                                          f"has {tuple(shapes[0][name][0])} {shapes[0][name][1]}")


class EnsemblePotential(UQModel):
    """M potentials with stacked weights; the Potential interface plus σ and per-member outputs.

    Build with :meth:`from_members` (trained :class:`Potential` objects) or :meth:`from_stacked`
    (a model file's tensors).
    """

    def __init__(self, spec: ModelSpec, stacked: dict[str, torch.Tensor], dtype: torch.dtype,
                 calibration: Calibration | None = None, seen_elements: Sequence[int] | None = None,
                 members_info: list[dict[str, Any]] | None = None) -> None:
        template = build_model(spec, dtype=dtype)
        expected = template.state_dict()
        sizes = {int(t.shape[0]) if t.dim() else 0 for t in stacked.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise MemberMismatchError(f"stacked ensemble weights disagree on the number of members: {sorted(sizes)}")
        n_members = sizes.pop()
        missing, extra = sorted(set(expected) - set(stacked)), sorted(set(stacked) - set(expected))
        if missing or extra:
            raise MemberMismatchError(f"stacked weights do not match the member architecture: missing {missing[:4]}, "
                                      f"unexpected {extra[:4]}")
        for name, tensor in stacked.items():
            if tuple(tensor.shape[1:]) != tuple(expected[name].shape):
                raise MemberMismatchError(f"ensemble weight {name} is {tuple(tensor.shape)}, expected "
                                          f"({n_members}, {', '.join(map(str, expected[name].shape))})")
        super().__init__(spec, calibration, seen_elements)
        if n_members < 2:
            raise MemberMismatchError(f"an ensemble needs at least 2 members, got {n_members}")
        self.n_members = n_members
        self.members_info = list(members_info or [{} for _ in range(n_members)])
        self._names = list(expected)
        parameter_names = {name for name, _ in template.named_parameters()}
        for name in self._names:
            value = stacked[name].detach().to(dtype=expected[name].dtype).clone()
            if name in parameter_names:
                self.register_parameter(_safe(name), nn.Parameter(value, requires_grad=False))
            else:
                self.register_buffer(_safe(name), value)
        # the template carries the non-persistent buffers (index tables) shared by all members; its own
        # weights are never used (every persistent tensor is passed to functional_call)
        object.__setattr__(self, "_template", template.eval())  # not a submodule: no duplicate weights
        self.member_pass = "auto"

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_members(cls, members: Sequence[Potential], **kwargs: Any) -> EnsemblePotential:
        """Stack trained potentials (same spec, dtype and weight shapes, else :class:`MemberMismatchError`)."""
        for i, m in enumerate(members):
            if not isinstance(m, Potential):
                raise MemberMismatchError(f"ensemble member {i} is a {type(m).__name__}, not a Potential")
        states = [m.state_dict() for m in members]
        check_members([m.spec for m in members],
                      [{k: (v.shape, v.dtype) for k, v in s.items()} for s in states])
        stacked = {name: torch.stack([s[name].detach() for s in states]) for name in states[0]}
        dtype = next(members[0].parameters()).dtype
        device = next(members[0].parameters()).device
        return cls(copy.deepcopy(members[0].spec), stacked, dtype, **kwargs).to(device)

    def stacked_state(self) -> dict[str, torch.Tensor]:
        """``{weight name: [M, ...] tensor}`` — what the model file stores."""
        return {name: getattr(self, _safe(name)) for name in self._names}

    def member(self, index: int) -> Potential:
        """Member ``index`` as a stand-alone :class:`Potential` (a copy)."""
        model = copy.deepcopy(self._template)
        model.load_state_dict({name: t[index] for name, t in self.stacked_state().items()})
        return model.eval()

    def unregistered_modules(self) -> list[nn.Module]:
        """The member template (holding the runtime settings every member runs with, e.g. edge chunks)."""
        return [self._template]

    def set_member_pass(self, mode: str) -> EnsemblePotential:
        """How the members are evaluated: ``"batched"`` (one ``vmap`` pass), ``"sequential"`` (one after the
        other, each free to use checkpointed edge chunks) or ``"auto"`` (the default: sequential exactly when
        a member alone would chunk its edges, i.e. large systems on a CPU; measured on a 999-atom box at the
        benchmark's model size, 1 thread: see docs/uncertainty.md).  Results are the same either way."""
        if mode not in MEMBER_PASSES:
            raise ValueError(f"member pass must be one of {', '.join(MEMBER_PASSES)}, got {mode!r}")
        self.member_pass = mode
        return self

    def _sequential(self, num_edges: int, device: torch.device) -> bool:
        """Whether this call runs the members one by one (see :meth:`set_member_pass`)."""
        if self.member_pass != "auto":
            return self.member_pass == "sequential"
        return any(block.chunk_size(num_edges, device) is not None for block in self._template.modules()
                   if isinstance(block, InteractionBlock))

    def _apply(self, fn, recurse: bool = True):  # keep the (unregistered) template on the same device/dtype
        super()._apply(fn, recurse)
        self._template._apply(fn, recurse)
        return self

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, graph: dict[str, torch.Tensor], compute_forces: bool = True, compute_stress: bool = False,
                create_graph: bool = False, return_features: bool = False, calibrated: bool = True
                ) -> dict[str, torch.Tensor]:
        """Member-mean predictions, σ (``energy_std``, ``forces_std``, ``stress_std``) and member outputs."""
        args = (graph, compute_forces, compute_stress, create_graph, return_features)
        if self._sequential(int(graph[K.EDGE_INDEX].shape[1]), graph[K.POSITIONS].device):
            members = self._members_one_by_one(*args)
        else:
            members = self._members_batched(*args)
        energies = members[K.ENERGY]
        out: dict[str, torch.Tensor] = {K.ENERGY: energies.mean(0), K.NODE_ENERGY: members[K.NODE_ENERGY].mean(0),
                                        UK.ENERGY_MEMBERS: energies}
        raw = {"energy": energies.std(0, correction=0)}
        if return_features:
            out[K.NODE_FEATURES] = members[K.NODE_FEATURES]
        if compute_forces:
            forces = members[K.FORCES]
            mean = forces.mean(0)
            out[K.FORCES], out[UK.FORCES_MEMBERS] = mean, forces
            raw["forces"] = (forces - mean).square().sum(-1).mean(0).sqrt()
        if compute_stress:
            out[K.VIRIAL], out[K.STRESS] = members[K.VIRIAL].mean(0), members[K.STRESS].mean(0)
            raw["stress"] = members[K.STRESS].std(0, correction=0)
        return self._finish(out, graph, raw, calibrated)

    def _members_one_by_one(self, graph: dict[str, torch.Tensor], compute_forces: bool, compute_stress: bool,
                            create_graph: bool, return_features: bool) -> dict[str, Any]:
        """Each member's own full forward (forces and stress inside it, so a checkpointed edge chunk is
        recomputed while that member's weights are in place); outputs stacked ``[M, ...]``."""
        member_graph = {**graph, K.POSITIONS: graph[K.POSITIONS].detach()}
        options = {"compute_forces": compute_forces, "compute_stress": compute_stress, "create_graph": create_graph,
                   "return_features": return_features}
        stacked = self.stacked_state()
        outputs = [functional_call(self._template, {name: t[i] for name, t in stacked.items()}, (member_graph,),
                                   options) for i in range(self.n_members)]
        members: dict[str, Any] = {key: torch.stack([o[key] for o in outputs])
                                   for key in (K.ENERGY, K.NODE_ENERGY, K.FORCES, K.STRESS, K.VIRIAL)
                                   if key in outputs[0]}
        if return_features:
            members[K.NODE_FEATURES] = list(outputs[0][K.NODE_FEATURES])  # member 0's, as in the batched pass
        return members

    def _members_batched(self, graph: dict[str, torch.Tensor], compute_forces: bool, compute_stress: bool,
                         create_graph: bool, return_features: bool) -> dict[str, Any]:
        """All members in one ``vmap`` pass over member-expanded positions; forces/stress by one
        ``autograd.grad`` outside it (member m's energy depends on its own copy only)."""
        m = self.n_members
        stacked = self.stacked_state()
        positions, cell = graph[K.POSITIONS], graph[K.CELL]
        num_graphs = cell.shape[0]
        batch = graph[K.BATCH] if K.BATCH in graph else torch.zeros_like(graph[K.NUMBERS])
        pos_m = positions.detach().unsqueeze(0).expand(m, *positions.shape).clone()
        inputs = []
        if compute_forces or compute_stress:
            pos_m.requires_grad_(True)
            inputs.append(pos_m)
        if compute_stress:
            strain = torch.zeros(m, num_graphs, 3, 3, dtype=positions.dtype, device=positions.device,
                                 requires_grad=True)
            symmetric = 0.5 * (strain + strain.transpose(-1, -2))
            pos_in = pos_m + torch.einsum("mni,mnij->mnj", pos_m, symmetric[:, batch])
            cell_in = cell.unsqueeze(0) + torch.einsum("bij,mbjk->mbik", cell, symmetric)
            inputs.append(strain)
            cell_dim = 0
        else:
            pos_in, cell_in, cell_dim = pos_m, cell, None
        template = self._template

        def energy_of_member(weights: dict[str, torch.Tensor], pos: torch.Tensor, cell_: torch.Tensor):
            member_graph = {**graph, K.POSITIONS: pos, K.CELL: cell_}
            out = functional_call(template, weights, (member_graph,),
                                  {"compute_forces": False, "return_features": return_features})
            feats = tuple(out[K.NODE_FEATURES]) if return_features else ()
            return out[K.ENERGY], out[K.NODE_ENERGY], feats

        energies, node_energies, features = vmap(energy_of_member, in_dims=(0, 0, cell_dim))(stacked, pos_in, cell_in)
        members: dict[str, Any] = {K.ENERGY: energies, K.NODE_ENERGY: node_energies}
        if return_features:
            members[K.NODE_FEATURES] = [f[0] for f in features]
        if inputs:
            grads = torch.autograd.grad(energies.sum(), inputs, create_graph=create_graph, allow_unused=True)
            if compute_forces:
                members[K.FORCES] = -grads[0] if grads[0] is not None else torch.zeros_like(pos_m)
            if compute_stress:
                d_strain = grads[-1] if grads[-1] is not None else torch.zeros_like(strain)
                periodic, safe = stress_volume(graph, cell)  # as Potential: a molecule in a box has no stress
                members[K.STRESS] = torch.where(periodic[None, :, None, None], d_strain / safe[None, :, None, None],
                                                torch.zeros_like(d_strain))
                members[K.VIRIAL] = -d_strain
        return members

    def descriptors(self, graph: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Member 0's per-layer invariant node features ``[N, C]``."""
        weights = {name: t[0] for name, t in self.stacked_state().items()}
        out = functional_call(self._template, weights, (graph,), {"compute_forces": False, "return_features": True})
        return [h[..., 0] for h in out[K.NODE_FEATURES]]
