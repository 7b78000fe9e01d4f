"""MD with a trained potential, checked against the reference calculator along its own trajectory.

Why: low test errors on the training distribution do not prove a potential is usable; running it and
asking the reference what the forces *should* have been on the frames it visits does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import Calculator as AseCalculator
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary

from equiforce.demo.emt_data import A_CU, A_NI, NI, thermalize_momenta
from equiforce.models.potential import Potential
from equiforce.sim.calculator import Calculator


def cu_ni_alloy(repeat: int = 3, x_ni: float = 0.5, seed: int = 0) -> Atoms:
    """A random fcc Cu/Ni alloy of ``4·repeat³`` atoms at its Vegard lattice constant."""
    rng = np.random.default_rng(seed)
    a = (1.0 - x_ni) * A_CU + x_ni * A_NI
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((repeat,) * 3)
    atoms.numbers[rng.permutation(len(atoms))[: int(round(x_ni * len(atoms)))]] = NI
    return atoms


def md_against_reference(model: Potential, reference: AseCalculator, out: Path, steps: int = 300,
                         temperature_K: float = 800.0, timestep_fs: float = 2.0, check_every: int = 10,
                         seed: int = 0) -> dict[str, Any]:
    """Langevin MD with ``model``; every ``check_every`` steps compare energy and forces with ``reference``.

    Writes ``trajectory.xyz`` (model and reference labels per checked frame) into ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    atoms = cu_ni_alloy(seed=seed)
    atoms.calc = Calculator(model)
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature_K, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)
    frames, force_err, energy_err, temps, min_dist = [], [], [], [], []
    start = time.perf_counter()
    for _ in range(max(steps // check_every, 1)):
        dyn.run(check_every)
        temps.append(atoms.get_temperature())
        e_model, f_model = atoms.get_potential_energy(), atoms.get_forces()
        probe = atoms.copy()
        probe.calc = reference
        e_ref, f_ref = probe.get_potential_energy(), probe.get_forces()
        force_err.append(np.abs(f_model - f_ref).mean())
        energy_err.append(abs(e_model - e_ref) / len(atoms))
        distances = atoms.get_all_distances(mic=True) + np.eye(len(atoms)) * 1e3
        min_dist.append(float(distances.min()))
        frame = atoms.copy()
        frame.info.update(energy_model=e_model, energy_reference=e_ref, step=dyn.nsteps)
        frame.arrays["forces_model"], frame.arrays["forces_reference"] = f_model, f_ref
        frames.append(frame)
    elapsed = time.perf_counter() - start
    write(out / "trajectory.xyz", frames, format="extxyz")
    return {"steps": int(dyn.nsteps), "timestep_fs": timestep_fs, "temperature_K": temperature_K,
            "natoms": len(atoms), "mean_temperature_K": float(np.mean(temps)),
            "force_mae_vs_reference_mev_a": 1000.0 * float(np.mean(force_err)),
            "energy_mae_vs_reference_mev_atom": 1000.0 * float(np.mean(energy_err)),
            "min_distance_A": float(min(min_dist)), "ms_per_step": 1000.0 * elapsed / max(int(dyn.nsteps), 1)}
