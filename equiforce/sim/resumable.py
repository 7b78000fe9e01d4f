"""An MD run that survives being killed: chunks of steps, a checkpoint after each, and resumption.

The run is cut into chunks of ``interval`` steps (a multiple of the trajectory and log intervals, so the
chunks' records fall exactly where one uninterrupted run would put them).  After each chunk the state, the
stop flags, the thermostat's random stream and carried quantities, and how far the trajectory and the
thermo log had been written go to one checkpoint file (:mod:`equiforce.sim.checkpoint`, atomic).  A resumed
run cuts the trajectory and the log back to that point — what was written after it belongs to steps that
are run again — and continues the same trajectories.  Records fall on the absolute step grid, so a finished
run extended to more steps (its off-grid last record cut off) writes what one run of the new length writes.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from equiforce.errors import ConfigError
from equiforce.sim.checkpoint import MDCheckpoint, save_md_checkpoint
from equiforce.sim.io import ThermoLog, open_trajectory
from equiforce.sim.state import SimState
from equiforce.utils.locking import held_lock


def structure_digest(state: SimState) -> str:
    """Identifies the systems of a run (their atoms and sizes) for the resume check."""
    data = state.numbers.cpu().numpy().tobytes() + state.ptr.cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def output_settings(trajectory: str | os.PathLike | None, trajectory_interval: int, log: str | os.PathLike | None,
                    log_interval: int) -> dict[str, Any]:
    """The outputs' formats and intervals, as a checkpoint keeps them (positions in a file are counted in that
    format's units: frames of an .h5, bytes of an .extxyz)."""
    return {"trajectory": Path(trajectory).suffix.lower() if trajectory is not None else None,
            "trajectory_interval": trajectory_interval if trajectory is not None else None,
            "log": Path(log).suffix.lower() if log is not None else None,
            "log_interval": log_interval if log is not None else None}


def check_settings(saved: dict[str, Any], settings: dict[str, Any], path: str | os.PathLike) -> None:
    """A checkpoint continues only the run that wrote it (the total number of steps may change); settings a
    checkpoint of an older version did not keep are not compared."""
    changed = [f"{key} ({saved.get(key)!r} there, {value!r} now)" for key, value in settings.items()
               if key in saved and saved[key] != value]
    if changed:
        raise ConfigError(f"{path}: the checkpoint belongs to another run: " + "; ".join(changed) +
                          "; continue it with the settings it was started with, or start a new run elsewhere")


def restore(md, resumed: MDCheckpoint) -> None:
    """Put a checkpoint's flags, random stream and carried quantities back into ``md`` and its integrator."""
    md.restore_flags(resumed.flags, resumed.state)
    integrator = md.integrator
    generator = getattr(integrator, "generator", None)
    if resumed.generator_state is not None:
        if generator is None:
            raise ValueError("the checkpoint holds a random stream but the integrator has no generator")
        generator.set_state(resumed.generator_state)
    for name in integrator.carried:
        if f"integrator.{name}" in resumed.arrays:
            value = resumed.arrays[f"integrator.{name}"]
            setattr(integrator, name, value.to(device=resumed.state.device, dtype=resumed.state.dtype))


def run_resumable(md, state: SimState, steps: int, path: str | os.PathLike, interval: int,
                  settings: dict[str, Any], resumed: MDCheckpoint | None = None,
                  trajectory: str | os.PathLike | None = None, trajectory_interval: int = 100,
                  log: str | os.PathLike | None = None, log_interval: int = 100, progress: bool = False,
                  keep_thermo: bool = True, precision: str = "float64"):
    """Run ``md`` until ``state.step == steps`` (counted from the run's start), checkpointing to ``path``.

    ``resumed``: the loaded checkpoint to continue (its state is ``state``); ``settings`` are stored with each
    checkpoint for :func:`check_settings`.  Returns an :class:`~equiforce.sim.md.MDResult` for this part.
    One process per checkpoint: a second run on it is refused while the first holds ``PATH.lock``.
    """
    from equiforce.sim.md import MDResult

    if interval < 1:
        raise ValueError(f"checkpoint interval must be at least one step, got {interval}")
    unit = math.lcm(trajectory_interval if trajectory is not None else 1, log_interval if log is not None else 1)
    interval = unit * math.ceil(interval / unit)
    meta = resumed.meta if resumed is not None else {}
    with ExitStack() as stack:
        stack.enter_context(held_lock(Path(str(path) + ".lock"), f"the MD run checkpointed to {path}"))
        if resumed is not None:
            restore(md, resumed)
        # a finished run extended: its off-grid final record (the last step was not a multiple of the intervals)
        # is cut off, so the outputs hold the frames and rows one uninterrupted run of the new length writes
        extending = resumed is not None and state.step < steps and not bool(md.frozen.all())
        traj_at = meta.get("trajectory_grid_at", meta.get("trajectory_at")) if extending else meta.get("trajectory_at")
        log_at = meta.get("log_grid_at", meta.get("log_at")) if extending else meta.get("log_at")
        writer = logger = None
        if trajectory is not None:
            writer = open_trajectory(trajectory, precision, resume_at=traj_at if resumed else None)
            stack.callback(writer.close)
        if log is not None:
            logger = ThermoLog(log, resume_at=log_at if resumed else None)
            stack.callback(logger.close)
        # where the outputs stood after their last record on the step grid, over all chunks and sessions
        grid = {"trajectory": meta.get("trajectory_grid_at", meta.get("trajectory_at")),
                "log": meta.get("log_grid_at", meta.get("log_at"))}
        generator = getattr(md.integrator, "generator", None)
        start_step, thermo, wall = state.step, [], 0.0
        while True:  # at least one call: a run with nothing left still reports its state
            # chunks end on multiples of ``interval`` (on the record grid), also after an off-grid start
            chunk = max(0, min(interval - state.step % interval, steps - state.step))
            result = md.run(state, chunk, trajectory=writer, trajectory_interval=trajectory_interval, log=logger,
                            log_interval=log_interval, progress=progress, keep_thermo=keep_thermo,
                            precision=precision, record_start=resumed is None)
            thermo.extend(result.thermo)
            wall += result.wall_time_s
            carried = {f"integrator.{name}": getattr(md.integrator, name) for name in md.integrator.carried
                       if getattr(md.integrator, name, None) is not None}
            grid.update({k: v for k, v in result.info["grid_at"].items() if v is not None})
            for output in (writer, logger):  # durable before the checkpoint says how far they got: after a
                if output is not None:       # power cut the checkpoint would otherwise outlive their tails
                    output.sync()
            save_md_checkpoint(path, state, md.flags, generator, carried, {
                "settings": settings, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                "trajectory_at": writer.position() if writer is not None else None,
                "log_at": logger.position() if logger is not None else None,
                "trajectory_grid_at": grid["trajectory"], "log_grid_at": grid["log"]})
            if state.step >= steps or bool(md.frozen.all()):
                break
    return MDResult(state=state, thermo=thermo, stopped_step=result.stopped_step,
                    nonfinite_step=result.nonfinite_step, steps=state.step - start_step, wall_time_s=wall,
                    neighbor_builds=result.neighbor_builds, outputs=result.outputs,
                    info={**result.info, "resumed": resumed is not None, "checkpoint": str(Path(path))})


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator whose state a checkpoint can hold (seeded at random when no seed is given)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator
