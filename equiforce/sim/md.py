"""Batched molecular dynamics: the loop, per-system stopping, logging — and :func:`run_md` for ASE users.

A run advances many systems at once.  ``stop_when(state, outputs) -> bool [B]`` flags systems (say, an
uncertainty above a threshold); with ``stop_mode="freeze"`` a flagged system stops moving while the rest go
on, with ``"flag"`` it only records the first step it was flagged.  Systems whose positions or forces
become non-finite are always frozen.  Neither needs a host synchronisation per step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from torch import nn

from equiforce.data import keys as K
from equiforce.errors import ConfigError
from equiforce.sim import resumable
from equiforce.sim.checkpoint import load_md_checkpoint
from equiforce.sim.evaluator import BatchEvaluator, Outputs, model_device, model_dtype, state_graph
from equiforce.sim.integrators import CSVR, Integrator, Langevin, StochasticCellRescaling, VelocityVerlet, pressure
from equiforce.sim.io import ThermoLog, TrajectoryWriter, open_trajectory
from equiforce.sim.state import SimState, maxwell_boltzmann

StopFn = Callable[[SimState, Outputs], torch.Tensor]
ENSEMBLES = ("nve", "nvt", "nvt-langevin", "nvt-csvr", "npt")


@dataclass
class MDResult:
    """What a run produced.  ``stopped_step[b]`` is the first step system ``b`` was flagged (−1: never)."""

    state: SimState
    thermo: list[dict[str, Any]]
    stopped_step: np.ndarray
    nonfinite_step: np.ndarray
    steps: int
    wall_time_s: float
    neighbor_builds: int
    info: dict[str, Any] = field(default_factory=dict)
    outputs: Outputs | None = None  # the model's outputs at the final state

    @property
    def atoms(self) -> list[Atoms]:
        """One ASE structure per system, with momenta and (when known) its final energy and forces attached."""
        atoms = self.state.to_atoms()
        if self.outputs is None or K.FORCES not in self.outputs:
            return atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        energy = self.outputs[K.ENERGY].detach().cpu().double().numpy()
        forces = self.outputs[K.FORCES].detach().cpu().double().numpy()
        ptr = self.state.ptr.cpu().tolist()
        for b, structure in enumerate(atoms):
            structure.calc = SinglePointCalculator(structure, energy=float(energy[b]), forces=forces[ptr[b]:ptr[b + 1]])
        return atoms


def thermo_rows(state: SimState, outputs: Outputs, integrator: Integrator, time_ps: float,
                stopped: torch.Tensor) -> list[dict[str, Any]]:
    """Per-system thermodynamics (one host transfer for the whole batch)."""
    kinetic = state.kinetic_energy()
    columns = {
        "epot": outputs[K.ENERGY], "ekin": kinetic, "etot": outputs[K.ENERGY] + kinetic,
        "temperature": state.temperature(),
        "conserved": outputs[K.ENERGY] + kinetic + integrator.conserved_correction(),
        "volume": state.volume(), "pressure_bar": pressure(state, outputs) / units.bar,
    }
    if not integrator.tracks_conserved:
        del columns["conserved"]
    names = list(columns)
    table = torch.stack([columns[n].to(state.dtype).expand(state.n_systems) for n in names], 1).cpu().tolist()
    n_atoms, flags, periodic = state.n_atoms.tolist(), stopped.tolist(), state.periodic.tolist()
    rows = []
    for b, values in enumerate(table):
        row: dict[str, Any] = {"step": state.step, "time_ps": time_ps, "system": b, "n_atoms": n_atoms[b]}
        row.update({n: v for n, v in zip(names, values) if periodic[b] or n not in ("volume", "pressure_bar")})
        if not periodic[b]:
            row.update(volume=0.0, pressure_bar=0.0)
        row["stopped"] = bool(flags[b])
        rows.append(row)
    return rows


def _position(output: Any) -> int | None:
    """Where a trajectory writer or thermo log stands (None for one that cannot say: a user's own observer)."""
    position = getattr(output, "position", None)
    return position() if callable(position) else None


class MolecularDynamics:
    """A batched MD driver: integrator + evaluator + stopping + output.

    ``frozen``, ``stopped_step`` and ``nonfinite_step`` ([B] tensors) persist between calls of :meth:`run`.
    """

    def __init__(self, model: nn.Module, integrator: Integrator, skin: float = 0.5,
                 stop_when: StopFn | None = None, stop_mode: str = "freeze", stop_check_interval: int = 1,
                 neighbor_check_interval: int | str = "auto", cuda_graph: bool = False,
                 compile: bool | str = False) -> None:
        """``cuda_graph=True`` runs each step through :class:`~equiforce.sim.graphed.GraphedStep`: on a CUDA
        device the whole step is captured once and replayed (for small systems, where launches dominate);
        elsewhere it runs eagerly through the same buffers.  Same results either way.  ``compile=True``:
        the model's energy → forces through one traced, compiled graph (see :class:`BatchEvaluator`)."""
        if stop_mode not in ("freeze", "flag"):
            raise ConfigError("stop_mode must be 'freeze' or 'flag'")
        self.cuda_graph = bool(cuda_graph)
        self._graphed = None
        self.integrator = integrator
        self.evaluate = BatchEvaluator(model, skin=skin, check_interval=neighbor_check_interval, compile=compile)
        self.stop_when, self.stop_mode = stop_when, stop_mode
        self.stop_check_interval = max(1, int(stop_check_interval))
        self.frozen: torch.Tensor | None = None  # [B] kept across runs, so a run may be done in chunks
        self.stopped_step: torch.Tensor | None = None
        self.nonfinite_step: torch.Tensor | None = None

    def reset_flags(self, state: SimState) -> None:
        """Unfreeze every system and forget when each was flagged."""
        b = state.n_systems
        self.frozen = torch.zeros(b, dtype=torch.bool, device=state.device)
        self.stopped_step = torch.full((b,), -1, dtype=torch.long, device=state.device)
        self.nonfinite_step = torch.full((b,), -1, dtype=torch.long, device=state.device)

    @property
    def flags(self) -> dict[str, torch.Tensor | None]:
        """``frozen``, ``stopped_step`` and ``nonfinite_step`` (for a checkpoint: see ``equiforce.sim.checkpoint``)."""
        return {"frozen": self.frozen, "stopped_step": self.stopped_step, "nonfinite_step": self.nonfinite_step}

    def restore_flags(self, flags: dict[str, torch.Tensor], state: SimState) -> None:
        """Continue from a checkpoint's flags (systems frozen there stay frozen, with their stop steps)."""
        self.reset_flags(state)
        for name, value in flags.items():
            current = getattr(self, name)
            if value.shape != current.shape:
                raise ConfigError(f"checkpoint flag {name!r} has shape {tuple(value.shape)}, the state needs "
                                  f"{tuple(current.shape)}")
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))

    def run(self, state: SimState, steps: int, trajectory: str | os.PathLike | TrajectoryWriter | None = None,
            trajectory_interval: int = 100, log: str | os.PathLike | ThermoLog | None = None,
            log_interval: int = 100, progress: bool = False, keep_thermo: bool = True, precision: str = "float64",
            record_start: bool = True) -> MDResult:
        """Advance ``state`` in place by ``steps`` steps (fewer if every system is frozen).

        A writer or log passed as an object stays open (a run in chunks); ``record_start=False`` skips the
        record of the starting state (a run resumed from a checkpoint, whose output already holds it)."""
        self.evaluate.check(state)
        self.integrator.check(state)
        dt_ps = self.integrator.dt / (1000 * units.fs)
        b = state.n_systems
        if self.frozen is None or self.frozen.shape[0] != b:
            self.reset_flags(state)
        frozen, stopped_step, nonfinite_step = self.frozen, self.stopped_step, self.nonfinite_step
        thermo: list[dict[str, Any]] = []
        start_step = state.step
        outputs, continued = self._initial_outputs(state)
        with ExitStack() as stack:
            writer = None
            if trajectory is not None:
                writer = trajectory if isinstance(trajectory, TrajectoryWriter) else open_trajectory(trajectory,
                                                                                                       precision)
                if writer is not trajectory:  # a writer handed in belongs to the caller (a run in chunks)
                    stack.callback(writer.close)
            logger = log if isinstance(log, ThermoLog) or log is None else ThermoLog(log)
            if logger is not None and logger is not log:
                stack.callback(logger.close)
            bar = _progress(stack, steps) if progress else None

            # records fall on the run's step grid (step 0, interval, 2 interval, ...), also for a run continued from
            # an off-grid step, so an extended run writes the frames one uninterrupted run would; ``grid_at``: where
            # the outputs stood after this run's last record on the grid (a resumed extension cuts an off-grid
            # final record back to it), None where this run wrote none
            grid_at: dict[str, int | None] = {"trajectory": None, "log": None}  # None: no grid record this run

            def record(final: bool = False) -> None:
                time_ps = state.step * dt_ps
                on_traj, on_log = state.step % trajectory_interval == 0, state.step % log_interval == 0
                if writer is not None and (final or on_traj):
                    writer.write(state, outputs, time_ps)
                    if on_traj:
                        grid_at["trajectory"] = _position(writer)
                if (logger is not None or keep_thermo) and (final or on_log):
                    rows = thermo_rows(state, self._with_virial(state, outputs), self.integrator, time_ps,
                                       frozen | (stopped_step >= 0))
                    if keep_thermo:
                        thermo.extend(rows)
                    if logger is not None:
                        logger.write(rows)
                        if on_log:
                            grid_at["log"] = _position(logger)

            if not continued and record_start:  # a continued run recorded this state when the previous one ended
                record(final=True)  # the starting state, on the grid or not
            graphed = self._graphed_step() if self.cuda_graph else None
            if graphed is not None:
                self.integrator.prepare(state)
            t0 = time.perf_counter()
            for _ in range(steps):
                if graphed is not None:
                    check = (state.step + 1) % self.stop_check_interval == 0  # on the run's step grid
                    outputs, (frozen, stopped_step, nonfinite_step) = graphed.step(
                        state, outputs, (frozen, stopped_step, nonfinite_step), check)
                    state.step += 1
                else:
                    state.step += 1
                    check = state.step % self.stop_check_interval == 0  # on the run's grid, as the records
                    outputs, (frozen, stopped_step, nonfinite_step) = self._advance(
                        state, outputs, (frozen, stopped_step, nonfinite_step), self.evaluate, check)
                done = state.step - start_step
                last = done == steps
                if last or state.step % log_interval == 0 or state.step % trajectory_interval == 0:
                    record(final=last)
                if bar is not None and (last or done % max(1, steps // 200) == 0):
                    bar[0].update(bar[1], completed=done)
                if state.step % log_interval == 0 and bool(frozen.all()):  # this step's thermo was just recorded
                    if writer is not None and not last and state.step % trajectory_interval != 0:
                        writer.write(state, outputs, state.step * dt_ps)  # the frame every system ended on
                    break
            wall = time.perf_counter() - t0
        self._last = (self._key(state), outputs)
        self.frozen, self.stopped_step, self.nonfinite_step = frozen, stopped_step, nonfinite_step
        info: dict[str, Any] = {"model_calls": self.evaluate.calls, "grid_at": grid_at}
        if self._graphed is not None:
            info["cuda_graph"] = self.graph_info
        compiled = self.evaluate.compile_report()
        if compiled is not None:  # whether it ran compiled, and the one-off cost
            info["compile"] = compiled
        return MDResult(state=state, thermo=thermo, stopped_step=stopped_step.cpu().numpy(),
                        nonfinite_step=nonfinite_step.cpu().numpy(), steps=state.step - start_step,
                        wall_time_s=wall, neighbor_builds=self.evaluate.neighbors.builds, info=info,
                        outputs=outputs)

    def _with_virial(self, state: SimState, outputs: Outputs) -> Outputs:
        """``outputs`` with the virial the pressure column needs: ensembles without a barostat do not compute it
        per step, so for periodic systems it is evaluated here, once per logged step (the plain model, so a
        compiled step is not compiled a second time for stress)."""
        if K.VIRIAL in outputs or not bool(state.periodic.any()):
            return outputs
        graph = state_graph(state, *self.evaluate.edges(state))
        extra = self.evaluate.model(graph, compute_forces=True, compute_stress=True)
        return {**outputs, K.VIRIAL: extra[K.VIRIAL].detach()}

    @property
    def graph_info(self) -> dict[str, Any] | None:
        """Captures, replays, eager steps and (if capture failed) why — None without ``cuda_graph``."""
        return self._graphed.info() if self._graphed is not None else None

    def _graphed_step(self):
        """The captured-step runner, kept across calls of :meth:`run` (so a run in chunks captures once)."""
        if self._graphed is None:
            from equiforce.sim.graphed import GraphedStep

            self._graphed = GraphedStep(self)
        return self._graphed

    @staticmethod
    def _key(state: SimState) -> tuple:
        """What the forces depend on, with each tensor's in-place version: a changed state is re-evaluated."""
        return tuple((t, t._version) for t in (state.positions, state.cell, state.numbers, state.pbc))

    def _initial_outputs(self, state: SimState) -> tuple[Outputs, bool]:
        """Forces at the start, and whether this run continues the previous one on an unchanged state (then
        they are reused)."""
        last = getattr(self, "_last", None)
        if last is not None and all(a is b and va == vb for (a, va), (b, vb) in zip(last[0], self._key(state))):
            return last[1], True
        return self.integrator.evaluate(state, self.evaluate), False

    def _advance(self, state: SimState, outputs: Outputs, flags: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 evaluate, check: bool, step: torch.Tensor | None = None
                 ) -> tuple[Outputs, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One integrator step, the stop checks (when ``check``), and frozen systems put back where they were
        — the step of the ordinary loop and of a captured one (``step``: its device counter)."""
        previous = (state.positions, state.momenta, state.cell)
        carried = {name: getattr(self.integrator, name, None) for name in self.integrator.carried}
        before = outputs
        outputs = self.integrator.step(state, outputs, evaluate)
        if check:
            flags = self._check_stops(state, outputs, *flags, step)
        frozen = flags[0]
        keep = frozen[state.system, None]
        state.positions = torch.where(keep, previous[0], state.positions)
        state.momenta = torch.where(keep, previous[1], state.momenta)
        state.cell = torch.where(frozen[:, None, None], previous[2], state.cell)
        # a frozen system keeps the forces, energies and thermostat heat of the state it is held at: those of the
        # thrown-away step would drift into its log rows, and a resume (which evaluates the held state) would differ
        outputs = {key: _hold(value, before.get(key), frozen, state.system) for key, value in outputs.items()}
        for name, value in carried.items():
            if value is not None:
                setattr(self.integrator, name, _hold(getattr(self.integrator, name), value, frozen, state.system))
        return outputs, flags

    def _check_stops(self, state: SimState, outputs: Outputs, frozen: torch.Tensor, stopped_step: torch.Tensor,
                     nonfinite_step: torch.Tensor, step: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Freeze/flag systems; ``step`` (a device counter inside a captured step) defaults to ``state.step``."""
        now = state.step if step is None else step
        finite = torch.isfinite(state.positions).all(-1) & torch.isfinite(outputs[K.FORCES]).all(-1)
        bad = state.per_system((~finite).to(state.dtype)) > 0
        nonfinite_step = torch.where(bad & (nonfinite_step < 0), now, nonfinite_step)
        frozen = frozen | bad
        if self.stop_when is not None:
            flag = self.stop_when(state, outputs).to(device=state.device, dtype=torch.bool).reshape(-1)
            stopped_step = torch.where(flag & (stopped_step < 0), now, stopped_step)
            if self.stop_mode == "freeze":
                frozen = frozen | flag
        return frozen, stopped_step, nonfinite_step


def _hold(new: Any, old: Any, frozen: torch.Tensor, system: torch.Tensor) -> Any:
    """``new`` with the entries of frozen systems taken from ``old``: per system (leading size B) or per atom
    (leading size N); anything else (or nothing to hold) is ``new``."""
    if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor) or old.shape != new.shape \
            or new.dim() == 0:
        return new
    if new.shape[0] == frozen.shape[0]:
        mask = frozen
    elif new.shape[0] == system.shape[0]:
        mask = frozen[system]
    else:
        return new
    return torch.where(mask.reshape(-1, *([1] * (new.dim() - 1))), old, new)


def _progress(stack: ExitStack, steps: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("MD"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    stack.enter_context(bar)
    return bar, bar.add_task("md", total=steps)


def make_integrator(ensemble: str, timestep_fs: float, temperature_K: float | torch.Tensor,
                    friction_per_fs: float = 0.01, tau_fs: float = 100.0, pressure_bar: float = 1.0,
                    tau_p_fs: float = 1000.0, compressibility_per_bar: float = 4.5e-5,
                    generator: torch.Generator | None = None) -> Integrator:
    """The integrator for an ensemble name (see :data:`ENSEMBLES`); ``nvt`` means Langevin.  Settings that are not
    physical (a negative temperature or friction, a time constant ≤ 0) are a :class:`ConfigError`, as on the CLI:
    they would otherwise turn the run into NaNs at its first step."""
    ensemble = ensemble.lower()
    _check_settings(timestep_fs, temperature_K, friction_per_fs, tau_fs, pressure_bar, tau_p_fs,
                    compressibility_per_bar)
    if ensemble == "nve":
        return VelocityVerlet(timestep_fs)
    if ensemble in ("nvt", "nvt-langevin"):
        return Langevin(timestep_fs, temperature_K, friction_per_fs, generator)
    if ensemble == "nvt-csvr":
        return CSVR(timestep_fs, temperature_K, tau_fs, generator)
    if ensemble == "npt":
        return StochasticCellRescaling(timestep_fs, temperature_K, pressure_bar, tau_fs, tau_p_fs,
                                       compressibility_per_bar, generator)
    raise ConfigError(f"unknown ensemble {ensemble!r}; choose one of {', '.join(ENSEMBLES)}")


def _check_settings(timestep_fs: float, temperature_K: float | torch.Tensor, friction_per_fs: float, tau_fs: float,
                    pressure_bar: float, tau_p_fs: float, compressibility_per_bar: float) -> None:
    temperatures = torch.as_tensor(temperature_K, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(temperatures).all()) or bool((temperatures < 0).any()):
        raise ConfigError(f"temperatures must be finite and ≥ 0 K, got {temperatures.tolist()}")
    checks = {"timestep_fs": (timestep_fs, "> 0"), "friction_per_fs": (friction_per_fs, "≥ 0"),
              "tau_fs": (tau_fs, "> 0"), "tau_p_fs": (tau_p_fs, "> 0"),
              "compressibility_per_bar": (compressibility_per_bar, "> 0"), "pressure_bar": (pressure_bar, "finite")}
    for name, (value, rule) in checks.items():
        value = float(value)
        bad = not math.isfinite(value) or (rule == "> 0" and value <= 0) or (rule == "≥ 0" and value < 0)
        if bad:
            raise ConfigError(f"{name} must be {rule}, got {value:g}")


def run_md(model: nn.Module, atoms_list: Atoms | Sequence[Atoms], ensemble: str = "nvt",
           temperature_K: float | Sequence[float] = 300.0, timestep_fs: float = 0.5, steps: int = 1000, *,
           friction_per_fs: float = 0.01, tau_fs: float = 100.0, pressure_bar: float = 1.0,
           tau_p_fs: float = 1000.0, compressibility_per_bar: float = 4.5e-5,
           initial_temperature_K: float | None = None,
           seed: int | None = None, device: str | None = None, skin: float = 0.5,
           trajectory: str | os.PathLike | None = None, trajectory_interval: int = 100,
           log: str | os.PathLike | None = None, log_interval: int = 100, progress: bool = False,
           stop_when: StopFn | None = None, stop_mode: str = "freeze", stop_check_interval: int = 1,
           precision: str = "float64", keep_thermo: bool = True, cuda_graph: bool = False,
           compile: bool | str = False, checkpoint: str | os.PathLike | None = None,
           checkpoint_interval: int = 10_000, resume: bool = False,
           checkpoint_tag: dict[str, Any] | None = None) -> MDResult:
    """Run MD on ASE structures, all systems batched into one state.

    Momenta already set on a structure are used; a structure without them gets momenta drawn from
    Maxwell–Boltzmann at ``initial_temperature_K`` (default ``temperature_K``).  Ensembles: ``nve``, ``nvt``
    (Langevin BAOAB), ``nvt-csvr`` (Bussi) and ``npt`` (stochastic cell rescaling + CSVR; ``pressure_bar``).  Conserving
    ensembles remove the centre-of-mass momentum and count ``3N − 3`` degrees of freedom.  Trajectories go to
    ``.h5``/``.extxyz``/``.traj`` and the thermo log to ``.csv``/``.jsonl`` (by suffix).  ``cuda_graph``: see
    :class:`MolecularDynamics` (``stop_when`` must then be tensor operations only); so is ``compile``.

    ``checkpoint``: a file (safetensors) written every ``checkpoint_interval`` steps (rounded up to a multiple
    of the trajectory and log intervals); with ``resume=True`` and that file present, the run continues from
    it — ``steps`` counts from the original start, the trajectory (``.h5``/``.extxyz``) and the log are cut
    back to the checkpoint and continued, and the settings (plus ``checkpoint_tag``, e.g. the model file's
    digest) must match.  :mod:`equiforce.sim.resumable` has the details.
    """
    if isinstance(atoms_list, Atoms):
        atoms_list = [atoms_list]
    device = device or str(model_device(model))
    state = SimState.from_atoms(atoms_list, device=device, dtype=model_dtype(model))
    temperature = torch.as_tensor(temperature_K, dtype=state.dtype, device=state.device).expand(state.n_systems)
    # a checkpointed run needs its own random stream (seeded at random without a seed) to save and restore
    generator = resumable.new_generator(state.device, seed) if checkpoint is not None or seed is not None else None
    conserving = ensemble.lower() not in ("nvt", "nvt-langevin")
    integrator = make_integrator(ensemble, timestep_fs, temperature, friction_per_fs, tau_fs, pressure_bar,
                                 tau_p_fs, compressibility_per_bar, generator)
    md = MolecularDynamics(model, integrator, skin=skin, stop_when=stop_when, stop_mode=stop_mode,
                           stop_check_interval=stop_check_interval, cuda_graph=cuda_graph, compile=compile)
    resumed = None
    if checkpoint is not None:
        settings = {"ensemble": ensemble.lower(), "timestep_fs": timestep_fs, "temperature_K": temperature.tolist(),
                    "friction_per_fs": friction_per_fs, "tau_fs": tau_fs, "pressure_bar": pressure_bar,
                    "tau_p_fs": tau_p_fs, "compressibility_per_bar": compressibility_per_bar,
                    "structures": resumable.structure_digest(state), "dtype": str(state.dtype).split(".")[-1],
                    # what a continued run writes and when it stops: a change would mix two runs in one output
                    "seed": seed, "outputs": resumable.output_settings(trajectory, trajectory_interval, log,
                                                                      log_interval),
                    "stop": {"criterion": stop_when is not None, "mode": stop_mode,
                             "check_interval": stop_check_interval},
                    **(checkpoint_tag or {})}
        if resume and os.path.exists(checkpoint):
            resumed = load_md_checkpoint(checkpoint, device=state.device, dtype=state.dtype)
            resumable.check_settings(resumed.meta.get("settings", {}), settings, checkpoint)
            state = resumed.state
    if resumed is None:  # each structure keeps its own momenta; those without any are drawn
        given = [bool(np.any(a.get_momenta() != 0)) for a in atoms_list]
        if not all(given):
            kept = state.momenta.clone()
            initial = temperature if initial_temperature_K is None else initial_temperature_K
            maxwell_boltzmann(state, initial, generator=generator, remove_com=conserving)
            if any(given):
                keep = torch.tensor(given, device=state.device)[state.system, None]
                state.momenta = torch.where(keep, kept, state.momenta)
        if any(given) and conserving:
            state.remove_com_momentum()
    if checkpoint is not None:
        return resumable.run_resumable(md, state, steps, checkpoint, checkpoint_interval, settings, resumed,
                                       trajectory=trajectory, trajectory_interval=trajectory_interval, log=log,
                                       log_interval=log_interval, progress=progress, keep_thermo=keep_thermo,
                                       precision=precision)
    return md.run(state, steps, trajectory=trajectory, trajectory_interval=trajectory_interval, log=log,
                  log_interval=log_interval, progress=progress, precision=precision, keep_thermo=keep_thermo)
