"""One MD step as a CUDA graph: integrator, model, forces and stop checks replayed with a single launch.

Why: a small molecule on a GPU is launch-bound — one step of one aspirin is a few hundred small kernels
(the model's forward and its backward for the forces), each costing more to launch from Python than to
run.  Captured once as a CUDA graph, the whole step is one ``replay()``; the host only decides when the
neighbour list must be rebuilt, and logs.

How: everything a step carries to the next one — positions, momenta, cell, the model outputs (forces),
the integrator's carried tensors (e.g. CSVR's ``heat``), the stop flags and a device-side step counter —
lives in static buffers.  The captured step reads them and writes its results back into them in place.
The neighbour list is checked *before* each step, outside the graph, with a one-step lookahead
(:meth:`~equiforce.sim.neighbors.VerletNeighborList.update`); a rebuild gives new edge tensors (often of a
new size), so the next step is captured again.  Host-side bookkeeping (``state.step``, logs, trajectory
frames) stays outside the graph.

Without CUDA (or with ``capture=False``) the same step runs eagerly through the same buffers — which is
how the buffer logic is tested on machines without a GPU.  If a capture fails (an operation that needs
the host inside the step, an unsupported generator), the run goes on eagerly and says why in
``reason``; results are the same either way.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from equiforce.sim.evaluator import Outputs
from equiforce.sim.state import SimState

if TYPE_CHECKING:
    from equiforce.sim.md import MolecularDynamics

Flags = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # frozen, stopped_step, nonfinite_step
STATE_FIELDS = ("positions", "momenta", "cell")


class GraphedStep:
    """The step of a :class:`~equiforce.sim.md.MolecularDynamics` run, captured and replayed.

    ``capture``: ``None`` captures on CUDA devices and runs eagerly elsewhere; ``False`` always eagerly
    (through the same static buffers).  ``warmup`` eager steps precede the first capture (CUDA libraries
    initialise lazily, which must not happen during a capture), and each variant of the step (with and
    without stop checks) runs eagerly once before its own capture; these are real steps of the run.
    """

    def __init__(self, md: MolecularDynamics, capture: bool | None = None, warmup: int = 3) -> None:
        self.md = md
        self.capture = capture
        self.warmup = int(warmup)
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.captures = 0
        self.replays = 0
        self.eager_steps = 0
        self._eager_runs = {True: 0, False: 0}
        self.reason: str | None = None  # why steps run eagerly, when capture was wanted
        self._buffers: dict[str, torch.Tensor] = {}
        self._outputs: Outputs = {}
        self._flags: list[torch.Tensor] = []
        self._step = None  # device step counter (a 0-d long tensor)
        self._step_shadow: int | None = None
        self._inputs: tuple[torch.Tensor, ...] | None = None

    # ------------------------------------------------------------------------------------------- buffers
    def _adopt(self, state: SimState, outputs: Outputs, flags: Flags) -> None:
        """Make the state, outputs and flags live in the static buffers (copying in what changed outside)."""
        integrator = self.md.integrator
        current = {name: getattr(state, name) for name in STATE_FIELDS}
        current.update({"integrator." + name: getattr(integrator, name) for name in integrator.carried})
        fresh = False
        for name, tensor in current.items():
            buffer = self._buffers.get(name)
            if buffer is tensor:
                continue
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                self._buffers[name] = tensor.detach().clone()
                fresh = True
            else:
                buffer.copy_(tensor)
        if set(outputs) != set(self._outputs) or any(
                self._outputs[k].shape != v.shape for k, v in outputs.items()):
            self._outputs = {k: v.detach().clone() for k, v in outputs.items()}
            fresh = True
        else:
            for key, value in outputs.items():
                if value is not self._outputs[key]:
                    self._outputs[key].copy_(value)
        if len(self._flags) != 3 or any(a.shape != b.shape for a, b in zip(self._flags, flags)):
            self._flags = [f.clone() for f in flags]
            fresh = True
        else:
            for buffer, flag in zip(self._flags, flags):
                if buffer is not flag:
                    buffer.copy_(flag)
        if self._step is None:
            self._step = torch.zeros((), dtype=torch.long, device=state.device)
            fresh = True
        if self._step_shadow != state.step:
            self._step.fill_(state.step)
            self._step_shadow = state.step
        if fresh:
            self.graphs.clear()
        self._point_at_buffers(state)

    def _point_at_buffers(self, state: SimState) -> None:
        for name in STATE_FIELDS:
            setattr(state, name, self._buffers[name])
        for name in self.md.integrator.carried:
            setattr(self.md.integrator, name, self._buffers["integrator." + name])

    def _fixed_inputs(self, state: SimState) -> list[torch.Tensor]:
        """Tensors a step reads but never replaces: the atoms' data and the integrator's settings."""
        integrator = self.md.integrator
        fixed = [state.numbers, state.masses, state.system, state.ptr, state.pbc]
        fixed += [v for v in (state.dof,) if isinstance(v, torch.Tensor)]
        fixed += [v for k, v in sorted(vars(integrator).items())
                  if isinstance(v, torch.Tensor) and k not in integrator.carried]
        return fixed

    # ------------------------------------------------------------------------------------------- the step
    def _evaluate(self, state: SimState, compute_stress: bool = False, dt: float | None = None) -> Outputs:
        """The model on the current (fixed) neighbour list: no rebuild check, no trimming, no host sync."""
        neighbors = self.md.evaluate.neighbors
        return self.md.evaluate.on_edges(state, neighbors.edge_index, neighbors.shifts, compute_stress)

    def _body(self, state: SimState, check: bool) -> None:
        """One step from the buffers back into the buffers (what a capture records)."""
        md = self.md
        self._step.add_(1)
        outputs, flags = md._advance(state, self._outputs, tuple(self._flags), self._evaluate, check, self._step)
        for name in STATE_FIELDS:
            self._buffers[name].copy_(getattr(state, name))
        for name in md.integrator.carried:
            self._buffers["integrator." + name].copy_(getattr(md.integrator, name))
        for key, value in outputs.items():
            self._outputs[key].copy_(value)
        for buffer, flag in zip(self._flags, flags):
            if buffer is not flag:
                buffer.copy_(flag)
        self._point_at_buffers(state)

    def _capture(self, state: SimState, check: bool) -> bool:
        """Record the step; False (and ``reason``) when it cannot be captured."""
        generator = getattr(self.md.integrator, "generator", None)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            if not hasattr(graph, "register_generator_state"):
                self.reason = "this torch cannot capture a step that draws from its own torch.Generator"
                return False
            graph.register_generator_state(generator)
        torch.cuda.synchronize(state.device)
        try:
            with torch.cuda.graph(graph):  # a pool of its own: the check/no-check graphs replay in any order
                self._body(state, check)
        except Exception as err:  # any operation that needs the host inside the step
            self.reason = f"capture failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            self._point_at_buffers(state)  # the body may have pointed the state at never-computed tensors
            torch.cuda.synchronize(state.device)
            return False
        self._point_at_buffers(state)
        self.graphs[check] = graph
        self.captures += 1
        return True

    def step(self, state: SimState, outputs: Outputs, flags: Flags, check: bool) -> tuple[Outputs, Flags]:
        """Advance ``state`` by one step (``state.step`` is left to the caller)."""
        md = self.md
        evaluator = md.evaluate
        self._adopt(state, outputs, flags)
        neighbors = evaluator.neighbors
        velocities = state.velocities if neighbors.due else None  # no kernel at all between tests
        rebuilt = neighbors.update(state.positions, state.cell, state.pbc, state.ptr, state.system,
                                   velocities=velocities, dt=md.integrator.dt, lookahead=1)
        # a graph reads the tensors it was captured with: new edges (a rebuild), or any other input the
        # step reads but does not carry (atom data, an integrator setting changed between runs), recapture
        inputs = (neighbors.edge_index, neighbors.shifts, *self._fixed_inputs(state))
        if rebuilt or self._inputs is None or len(inputs) != len(self._inputs) or any(
                a is not b for a, b in zip(inputs, self._inputs)):
            self.graphs.clear()
            self._inputs = inputs
        if self.capture is not False and state.device.type != "cuda" and self.reason is None:
            self.reason = f"no CUDA device: the state is on {state.device.type}, where steps run eagerly"
            warnings.warn(f"MD step not captured as a CUDA graph ({self.reason})", stacklevel=3)
        wants_graph = self.capture is not False and state.device.type == "cuda" and self.reason is None
        # each variant (with / without stop checks) runs eagerly at least once before its capture, so that
        # first-call work of a stop hook (caches built on the host) never happens inside a capture
        warm = self.eager_steps >= self.warmup and self._eager_runs[check] > 0
        if wants_graph and check not in self.graphs and warm:
            self._capture(state, check)
            if self.reason is not None:
                warnings.warn(f"MD step not captured as a CUDA graph ({self.reason}); running it eagerly",
                              stacklevel=3)
        graph = self.graphs.get(check) if wants_graph else None
        if graph is not None:
            graph.replay()
            self.replays += 1
        elif wants_graph and not warm:  # warm up on a side stream, as capture wants
            side = torch.cuda.Stream(device=state.device)
            side.wait_stream(torch.cuda.current_stream(state.device))
            with torch.cuda.stream(side):
                self._body(state, check)
            torch.cuda.current_stream(state.device).wait_stream(side)
            self.eager_steps += 1
            self._eager_runs[check] += 1
        else:
            self._body(state, check)
            self.eager_steps += 1
            self._eager_runs[check] += 1
        evaluator.calls += 1
        self._step_shadow = state.step + 1
        return self._outputs, tuple(self._flags)

    def info(self) -> dict[str, object]:
        return {"captures": self.captures, "replays": self.replays, "eager_steps": self.eager_steps,
                "reason": self.reason}

