"""Reference data made with the oracle itself: frames from oracle-driven MD at several temperatures.

The demo and ``benchmarks/active_vs_random.py`` need a fixed test set (and the benchmark a pool of MD
frames for random selection) labelled by the same oracle as the loop.  Frames are sampled from ASE
Langevin MD driven by the oracle, so every frame carries the oracle's energy and forces at no extra
call; the set is cached as extxyz, keyed by its parameters, and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units

from equiforce.active.oracle import import_object
from equiforce.data.io import read_configurations, write_extxyz
from equiforce.data.structure import Configuration
from equiforce.utils.ase_compat import thermalize_momenta
from equiforce.utils.atomic_io import atomic_write


def oracle_md_frames(start: Atoms, calculator: Any, temperatures: Sequence[float], frames_per_temperature: int,
                     interval: int = 20, equilibration: int = 200, timestep_fs: float = 0.5, seed: int = 0,
                     friction_per_fs: float = 0.01) -> list[Configuration]:
    """Langevin MD with the oracle at each temperature; one labelled frame every ``interval`` steps.

    (``Configuration.from_atoms`` keeps a view of the positions, hence the copy of each frame.)
    """
    from ase.md.langevin import Langevin

    out: list[Configuration] = []
    for k, temperature in enumerate(temperatures):
        atoms = start.copy()
        atoms.calc = calculator
        rng = np.random.default_rng([seed, k])
        thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature, friction=friction_per_fs / units.fs,
                       rng=rng, fixcm=False)
        dyn.run(equilibration)
        for n in range(frames_per_temperature):
            dyn.run(interval)
            config = Configuration.from_atoms(atoms.copy(), energy=float(atoms.get_potential_energy()),
                                              forces=np.array(atoms.get_forces()), source=f"oracle-md:{temperature:g}K",
                                              frame=n, config_type=f"md{temperature:g}K")
            out.append(config)
    return out


def cached_md_set(cache_dir: str | os.PathLike, start: Atoms, oracle: tuple[str, dict[str, Any]],
                  temperatures: Sequence[float], frames_per_temperature: int, interval: int = 20,
                  equilibration: int = 200, timestep_fs: float = 0.5, seed: int = 0, generate: bool = True
                  ) -> tuple[list[Configuration], Path]:
    """:func:`oracle_md_frames`, read from ``cache_dir`` when already made with the same parameters.

    ``generate=False``: only read back, never call the oracle (``FileNotFoundError`` naming the expected file) —
    for tools that re-rate a finished run and must rate it on the very frames it used."""
    key = json.dumps({"numbers": start.numbers.tolist(), "positions": np.round(start.positions, 6).tolist(),
                      "oracle": oracle, "temperatures": list(temperatures), "n": frames_per_temperature,
                      "interval": interval, "equilibration": equilibration, "dt": timestep_fs, "seed": seed},
                     sort_keys=True, default=str)
    path = Path(cache_dir) / f"oracle_md_{hashlib.sha256(key.encode()).hexdigest()[:12]}.xyz"
    if path.is_file():
        return read_configurations(path), path
    if not generate:
        raise FileNotFoundError(f"{path}: no cached oracle MD set with these parameters in {cache_dir}")
    calculator = import_object(oracle[0])(**oracle[1])
    configs = oracle_md_frames(start, calculator, temperatures, frames_per_temperature, interval, equilibration,
                               timestep_fs, seed)
    atomic_write(path, lambda tmp: write_extxyz(configs, tmp))
    return read_configurations(path), path
