"""Energy, forces and stress of a potential as one compiled graph, for training (``training.compile``).

Training on forces differentiates twice: forces are a gradient of the energy, and the loss on them is
differentiated again for the weights.  ``torch.compile`` cannot take a second derivative of a compiled
forward (and breaks the graph at ``torch.autograd.grad``), so the usual route does not apply.  Here the
whole energy → forces (→ stress) computation, autograd's backward included, is traced once into a graph
of plain operators (``make_fx``, symbolic sizes); to that graph the forces are an ordinary output, so
``torch.compile`` (Inductor) fuses it and AOTAutograd derives the weight gradients as a first derivative.

One subtlety makes this correct: autograd saves the *outputs* of some operators (``exp``, ``rsqrt``,
``sigmoid``, norms) for their backward as detached aliases and reattaches their history when it unpacks
them.  A trace records only the ``detach``, which would silently cut the second-order path the force loss
needs (the weight gradients of early layers came out 10-40 % wrong).  The potential's forward detaches
nothing on purpose, so every ``detach`` of the trace is removed; the tests compare the weight gradients of
the force loss with the uncompiled model's to round-off.

Sizes: the trace keeps atoms, edges and graphs symbolic (without "duck" sizing, so two sizes that happen
to be equal in the first batch are not assumed equal), and the compiled graph is marked dynamic in them,
so batches of other sizes reuse it.  A batch of one graph (an MD run of one system) has a trace of its own.
Edge chunking (``set_edge_chunk``) is off inside the trace.  Should compiling or running the graph fail,
the model runs uncompiled from then on, with a warning and the reason in :meth:`CompiledForces.report`.

A potential with uncertainty heads (:class:`~equiforce.uq.heads.UQPotential`) compiles for inference too:
its σ outputs are more outputs of the same graph, and its calibration is a constant of the trace (a model
whose calibration changes needs a new ``CompiledForces``).  Only for inference: the heads read the
backbone's features through a ``detach``, which the trace loses, so training through it would be wrong.
An ensemble does not compile (its ``vmap`` over members fixes sizes in the trace); it runs as it is.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from equiforce.data import keys as K
from equiforce.models.potential import InteractionBlock, Potential

Tensor = torch.Tensor
INPUT_KEYS = (K.POSITIONS, K.CELL, K.NUMBERS, K.EDGE_INDEX, K.SHIFTS, K.BATCH, K.PBC)
# the dimension of each input that changes from batch to batch (atoms, graphs, atoms, edges, edges, atoms, graphs)
DYNAMIC_DIMS = {K.POSITIONS: 0, K.CELL: 0, K.NUMBERS: 0, K.EDGE_INDEX: 1, K.SHIFTS: 0, K.BATCH: 0, K.PBC: 0}
OUTPUT_KEYS = (K.ENERGY, K.FORCES, K.VIRIAL, K.STRESS)


def compilable(model: nn.Module) -> bool:
    """Whether :class:`CompiledForces` takes this model: a plain potential, or one with uncertainty heads."""
    from equiforce.uq.heads import UQPotential

    return isinstance(model, (Potential, UQPotential))


def strip_detach(graph_module: torch.fx.GraphModule) -> int:
    """Remove every ``aten.detach`` from a traced graph (see the module docstring); returns how many."""
    removed = 0
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)
            removed += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return removed


class CompiledForces(nn.Module):
    """Calls like :class:`Potential` (``batch → {energy, forces[, virial, stress]}``), differentiable in the
    weights, through one traced and compiled graph per combination of ``compute_forces``/``compute_stress``
    and of one graph or several in the batch.

    The live parameters and buffers are inputs of the graph on every call, so optimiser steps, EMA and
    refitted energy shifts are seen without retracing.  ``backend`` is ``torch.compile``'s ("inductor";
    "aot_eager" checks the trace without generating code).
    """

    def __init__(self, model: nn.Module, backend: str = "inductor") -> None:
        super().__init__()
        if not compilable(model):
            raise ValueError(f"compile needs a plain potential or one with uncertainty heads, not a "
                             f"{type(model).__name__} (an ensemble runs uncompiled)")
        self.model = model
        self.backend = backend
        self._graphs: dict[tuple[bool, bool, bool], Callable[..., tuple[Tensor, ...]]] = {}
        self._outputs: dict[tuple[bool, bool, bool], list[str]] = {}  # each graph's output names, in order
        self.compile_seconds = 0.0  # tracing, and the first call of each graph (where compilation happens)
        self.removed_detach = 0
        self.error: str | None = None  # why compiling or running a graph failed (then the model runs as it is)

    def report(self) -> dict[str, object]:
        """For the training log: whether steps run compiled, the one-off cost, and a failure's reason."""
        out: dict[str, object] = {"compiled": self.error is None and bool(self._graphs),
                                  "compile_s": round(self.compile_seconds, 3)}
        if self.error is not None:
            out["compile_error"] = self.error
        return out

    def _trace(self, batch: dict[str, Tensor], forces: bool, stress: bool) -> tuple[torch.fx.GraphModule, list[str]]:
        model = self.model
        names = [name for name, _ in model.named_parameters()]
        buffer_names = [name for name, _ in model.named_buffers()]
        outputs: list[str] = []  # the model's tensor outputs (σ too, for a model with heads), named at trace time

        def energy_and_derivatives(params: list[Tensor], buffers: list[Tensor], *inputs: Tensor
                                   ) -> tuple[Tensor, ...]:
            graph = dict(zip(INPUT_KEYS, inputs))
            if forces:
                graph[K.POSITIONS] = graph[K.POSITIONS].requires_grad_(True)
            state = {**dict(zip(names, params)), **dict(zip(buffer_names, buffers))}
            out = torch.func.functional_call(model, (state,), (graph,), {
                "compute_forces": forces, "compute_stress": stress, "create_graph": True})
            if isinstance(model, Potential):
                outputs[:] = [key for key in OUTPUT_KEYS if key in out]
            else:
                outputs[:] = [key for key, value in out.items() if isinstance(value, Tensor)]
            return tuple(out[key] for key in outputs)

        from torch.fx.experimental import _config as fx_config
        from torch.fx.experimental.proxy_tensor import make_fx

        chunks = {block: block.edge_chunk for block in model.modules() if isinstance(block, InteractionBlock)}
        try:
            for block in chunks:
                block.edge_chunk = None
            with fx_config.patch(use_duck_shape=False), torch.enable_grad():
                traced = make_fx(energy_and_derivatives, tracing_mode="symbolic")(
                    list(model.parameters()), list(model.buffers()), *(batch[key] for key in INPUT_KEYS))
        finally:
            for block, chunk in chunks.items():
                block.edge_chunk = chunk
        self.removed_detach += strip_detach(traced)
        return traced, outputs

    def forward(self, batch: dict[str, Tensor], compute_forces: bool = True, compute_stress: bool = False,
                create_graph: bool = False) -> dict[str, Tensor]:
        """``create_graph=True`` (training): outputs differentiable in the weights.  ``False`` (simulation,
        the default as for :class:`Potential`): the graph runs without autograd (an inference graph that
        saves nothing for a backward pass), and the outputs are plain tensors."""
        if create_graph and not isinstance(self.model, Potential):  # heads: inference only (module docstring)
            raise ValueError(f"a compiled {type(self.model).__name__} is for inference only (create_graph=False): "
                             "its heads' inputs are detached, which the trace does not keep")
        if not create_graph and torch.is_grad_enabled():
            with torch.no_grad():
                return self.forward(batch, compute_forces, compute_stress, create_graph)
        if K.PBC not in batch:  # as the eager model reads a batch without pbc: periodic wherever it has a volume
            batch = {**batch, K.PBC: torch.ones(batch[K.CELL].shape[0], 3, dtype=torch.bool,
                                                device=batch[K.CELL].device)}
        missing = [key for key in INPUT_KEYS if key not in batch]
        if missing:
            raise KeyError(f"a compiled model needs a collated batch; missing {missing}")
        if self.error is not None:
            with torch.enable_grad():  # the model's forces are autograd derivatives even in inference
                return self.model(batch, compute_forces=compute_forces, compute_stress=compute_stress,
                                  create_graph=create_graph)
        # a batch of one graph gets its own trace: sizes of 1 are specialised, and the model sums its energy
        # instead of scattering it (see Potential), so neither kind of graph may serve the other
        key = (bool(compute_forces), bool(compute_stress), int(batch[K.CELL].shape[0]) == 1)
        inputs = [batch[name] for name in INPUT_KEYS]
        state = (list(self.model.parameters()), list(self.model.buffers()))
        start = time.perf_counter()
        first = key not in self._graphs
        try:
            if first:
                traced, self._outputs[key] = self._trace(batch, *key[:2])
                self._graphs[key] = torch.compile(traced, backend=self.backend, dynamic=None)
                for name, tensor in zip(INPUT_KEYS, inputs):
                    torch._dynamo.maybe_mark_dynamic(tensor, DYNAMIC_DIMS[name])
            values = self._graphs[key](*state, *inputs)
        except Exception as err:  # no compiler, an unsupported operator: carry on uncompiled, and say why
            self.error = f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"
            self._graphs.clear()
            warnings.warn(f"compile: compilation failed, continuing uncompiled ({self.error})", RuntimeWarning,
                          stacklevel=2)
            return self.forward(batch, compute_forces, compute_stress, create_graph)
        finally:
            if first:
                self.compile_seconds += time.perf_counter() - start
        return dict(zip(self._outputs[key], values))
