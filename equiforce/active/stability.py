"""Is the potential usable?  Batched MD replicas checked by Fu et al.'s bond-length criterion.

Low test errors do not guarantee a potential survives MD (Fu et al. 2023, "Forces are not enough"), so
the loop's ``stop.stable_md_ps`` criterion and the demo's final check run real trajectories: molecules
fail once a bond deviates more than ``threshold`` (0.5 Å) from its reference length; any system fails
when its positions or forces become non-finite.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase import Atoms

from equiforce.models.potential import Potential
from equiforce.sim.analysis.structure import BondCriterion
from equiforce.sim.md import run_md


def same_molecule(structures: Sequence[Atoms]) -> bool:
    """All non-periodic with identical atom lists: the bond criterion applies."""
    first = structures[0]
    return all(not a.pbc.any() and len(a) == len(first) and (a.numbers == first.numbers).all() for a in structures)


def stability_test(model: torch.nn.Module, starts: Sequence[Atoms], temperature_K: float, time_ps: float,
                   replicas: int = 2, timestep_fs: float = 0.5, seed: int = 0, threshold: float = 0.5,
                   reference: Sequence[Atoms] | None = None, trajectory: str | os.PathLike | None = None,
                   progress: bool = False, compile: bool | str = False) -> dict[str, Any]:
    """Run ``replicas`` Langevin trajectories of ``time_ps`` from ``starts`` (cycled) and report failures.

    ``compile=True`` (or a ``torch.compile`` backend's name): the forces through one compiled graph
    (:mod:`equiforce.models.compiled`) — for small molecules on a CPU about twice the steps per second, after
    ~30-60 s of compilation, so it pays for runs of many thousand steps.  A model with uncertainty heads runs
    as its backbone then (the same energies and forces; σ is not needed here); an ensemble runs uncompiled.
    ``wall_s`` is the stepping alone; the compilation's seconds are ``compile_s``.
    """
    if compile:
        model = getattr(model, "backbone", model)
        compile = compile if isinstance(model, Potential) else False
    systems = [Atoms(numbers=starts[r % len(starts)].numbers, positions=starts[r % len(starts)].positions,
                     cell=starts[r % len(starts)].cell, pbc=starts[r % len(starts)].pbc) for r in range(replicas)]
    steps = int(round(time_ps * 1000.0 / timestep_fs))
    stop_when, criterion = None, None
    if same_molecule(systems):
        ref = list(reference) if reference else list(starts)
        positions = np.stack([a.positions for a in ref if len(a) == len(systems[0])])
        criterion = BondCriterion(systems[0].numbers, positions, threshold=threshold)
        stop_when = criterion.stop_when()
    result = run_md(model, systems, ensemble="nvt", temperature_K=temperature_K, timestep_fs=timestep_fs, steps=steps,
                    seed=seed, stop_when=stop_when, stop_check_interval=10, keep_thermo=False,
                    trajectory=trajectory, trajectory_interval=max(1, steps // 100), log_interval=max(1, steps // 100),
                    progress=progress, compile=compile)
    failed = (result.stopped_step >= 0) | (result.nonfinite_step >= 0)
    first = np.where(result.nonfinite_step >= 0, result.nonfinite_step, result.stopped_step)
    dt_ps = timestep_fs / 1000.0
    times = [float((first[b] if failed[b] else steps) * dt_ps) for b in range(replicas)]
    compiled = result.info.get("compile", {})
    max_dev = None
    if criterion is not None:
        max_dev = float(criterion.deviation(np.stack([a.positions for a in result.atoms])).max())
    return {"temperature_K": float(temperature_K), "time_ps": float(time_ps), "timestep_fs": float(timestep_fs),
            "replicas": replicas, "stable": int((~failed).sum()), "all_stable": bool((~failed).all()),
            "time_to_failure_ps": times, "criterion": "bond length (Fu et al.)" if criterion else "non-finite only",
            "bond_threshold_A": threshold if criterion else None, "final_max_bond_deviation_A": max_dev,
            "steps": int(result.steps), "wall_s": float(result.wall_time_s),
            "compiled": bool(compiled.get("compiled", False)), "compile_s": float(compiled.get("compile_s", 0.0)),
            "ms_per_step": 1000.0 * float(result.wall_time_s) / max(1, int(result.steps))}
