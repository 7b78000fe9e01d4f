"""A Cu/Ni training set generated on the fly with ASE's EMT potential.

Why: ``make demo`` has to show a full train → evaluate loop without shipping first-principles data or
needing a quantum code, and in under ten minutes on two cores.  EMT is an analytic many-body
potential, fast enough to run short MD for a few dozen small cells in seconds, and its Cu/Ni
parameters give realistic alloy, surface and vacancy chemistry to learn.

The pieces are kept calculator-agnostic so a later oracle (e.g. xTB) can reuse them:

* :func:`label` turns any ASE ``Atoms`` + calculator into a labelled :class:`Configuration`;
* :func:`run_md_snapshots` runs Langevin MD with any calculator and returns labelled frames;
* :func:`generate_cu_ni_dataset` only decides *which* structures to build and *how* to sample them.

Test data: :func:`generate_cu_ni_test_set` is the same generator with a different seed (different
compositions, strains and velocities), so it is statistically matched but not overlapping.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc111
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary

from equiforce.data.structure import Configuration
from equiforce.utils.ase_compat import thermalize_momenta

SOURCE = "emt:cu-ni"
CU, NI = 29, 28
A_CU, A_NI = 3.61, 3.52  # Å, fcc lattice constants used for Vegard's law

# Per-system sampling.  Each system contributes 1 ideal frame + FRAMES_PER_SYSTEM - 1 MD frames.
# Tuned so that 300 configurations take ~10 s on one core (EMT ≈ 3–4 ms per 32-atom call).
FRAMES_PER_SYSTEM = 7
MD_TIMESTEP_FS = 2.0
MD_STRIDE = 12  # 24 fs apart (~1/6 of a Cu/Ni vibrational period); only 6 MD frames per system
MD_EQUILIBRATION = 20  # steps before the first kept frame
LANGEVIN_FRICTION_PER_FS = 0.02  # 50 fs thermostat time: fast equilibration from the ideal lattice

# System types in generation order: bulk is half the data, surfaces and vacancies a quarter each.
SYSTEM_CYCLE = ("bulk", "surface", "vacancy", "bulk")


def label(atoms: Atoms, calculator: Calculator, **fields) -> Configuration:
    """Evaluate ``calculator`` on ``atoms`` and pack energy, forces and (if fully periodic) stress.

    Forces are the raw calculator forces (constraints on ``atoms`` are ignored).  Results already
    cached by the calculator for these positions (e.g. after an MD step) are reused, so labelling MD
    frames with the driving calculator costs nothing extra.  Arrays are copied, so
    later changes to ``atoms`` (the next MD step) cannot alter the returned configuration.
    ``fields`` go straight to :class:`Configuration` (config_type, source, frame, weight, info).
    """
    if atoms.calc is not calculator:
        atoms.calc = calculator
    energy = float(atoms.get_potential_energy())
    forces = np.array(atoms.get_forces(apply_constraint=False), dtype=np.float64)
    stress = np.array(atoms.get_stress(voigt=False), dtype=np.float64) if atoms.pbc.all() else None
    return Configuration(numbers=atoms.numbers.copy(), positions=atoms.positions.copy(),
                         cell=np.array(atoms.cell, dtype=np.float64), pbc=atoms.pbc.copy(),
                         energy=energy, forces=forces, stress=stress, **fields)


def run_md_snapshots(atoms: Atoms, calculator: Calculator, temperature: float, n_frames: int, stride: int,
                     rng: np.random.Generator, *, timestep_fs: float = MD_TIMESTEP_FS,
                     equilibration: int = MD_EQUILIBRATION,
                     friction_per_fs: float = LANGEVIN_FRICTION_PER_FS, **fields) -> list[Configuration]:
    """Langevin NVT MD at ``temperature`` (K); keep every ``stride``-th frame after ``equilibration`` steps.

    Velocities start Maxwell–Boltzmann at ``temperature`` (centre-of-mass motion removed) and all
    randomness comes from ``rng``, so the result is reproducible.  ``fixcm=False``: ASE's ``fixcm``
    is deprecated and biased for small cells, and a slow centre-of-mass drift changes no label.
    ``atoms`` is copied, not moved.
    Frames are labelled by ``calculator`` itself (free, cached); to label with a different oracle
    call :func:`label` on ``frame.to_atoms()``.  ``fields`` are passed to every :class:`Configuration`;
    ``info`` gets the MD temperature and step added.
    """
    atoms = atoms.copy()
    atoms.calc = calculator
    thermalize_momenta(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature,
                   friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    if equilibration > 0:
        dyn.run(equilibration)
    base_info = dict(fields.pop("info", {}))
    frames: list[Configuration] = []
    for _ in range(n_frames):
        dyn.run(stride)
        info = {**base_info, "temperature_K": float(temperature), "md_step": int(dyn.nsteps)}
        frames.append(label(atoms, calculator, info=info, **fields))
    return frames


def _random_alloy(atoms: Atoms, rng: np.random.Generator) -> float:
    """Replace a random fraction (uniform in [0, 1]) of the sites by Ni, the rest Cu; return x_Ni."""
    x_ni = float(rng.uniform(0.0, 1.0))
    n_ni = int(round(x_ni * len(atoms)))
    numbers = np.full(len(atoms), CU)
    numbers[rng.permutation(len(atoms))[:n_ni]] = NI
    atoms.numbers = numbers
    return n_ni / len(atoms)


def _vegard(x_ni: float) -> float:
    return (1.0 - x_ni) * A_CU + x_ni * A_NI


def _random_strain(rng: np.random.Generator, iso: float = 0.025, shear: float = 0.02) -> np.ndarray:
    """Symmetric strain: isotropic ±``iso`` plus independent normal/shear parts ±``shear``, so stress varies."""
    e = rng.uniform(-shear, shear, size=(3, 3))
    e = 0.5 * (e + e.T)
    return np.eye(3) * (1.0 + rng.uniform(-iso, iso)) + e


def _build_bulk(rng: np.random.Generator, vacancy: bool) -> tuple[Atoms, dict]:
    """2×2×2 conventional fcc (32 sites), random composition, Vegard lattice, random strain."""
    atoms = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat((2, 2, 2))
    x_ni = _random_alloy(atoms, rng)
    atoms.set_cell(np.asarray(atoms.cell) * (_vegard(x_ni) / A_CU), scale_atoms=True)
    atoms.set_cell(np.asarray(atoms.cell) @ _random_strain(rng), scale_atoms=True)
    if vacancy:
        del atoms[int(rng.integers(len(atoms)))]
    atoms.pbc = True
    return atoms, {"x_ni": x_ni}


def _build_surface(rng: np.random.Generator) -> tuple[Atoms, dict]:
    """3×3×3 (27-atom) fcc(111) or (100) slab, 12 Å of vacuum, periodic in all directions.

    Only the in-plane cell is strained (±2 %); the vacuum gap is far beyond EMT's cutoff, so full pbc is
    harmless and gives every frame a defined (cell-volume normalised) stress.
    """
    facet = "111" if rng.uniform() < 0.5 else "100"
    x_guess = float(rng.uniform(0.0, 1.0))
    builder = fcc111 if facet == "111" else fcc100
    atoms = builder("Cu", size=(3, 3, 3), a=_vegard(x_guess), vacuum=6.0)
    x_ni = _random_alloy(atoms, rng)
    strain = np.eye(3)
    strain[:2, :2] = _random_strain(rng, iso=0.02, shear=0.02)[:2, :2]
    atoms.set_cell(np.asarray(atoms.cell) @ strain, scale_atoms=True)
    atoms.pbc = True
    return atoms, {"x_ni": x_ni, "facet": facet}


def _frames_per_system(n_configs: int) -> int:
    """Use fewer frames per system for tiny sets so every system type still appears."""
    return int(max(1, min(FRAMES_PER_SYSTEM, n_configs // len(set(SYSTEM_CYCLE)))))


def generate_cu_ni_dataset(n_configs: int = 300, seed: int = 0, temperatures: Sequence[float] = (300, 800, 1400),
                           progress: bool = False, calculator: Calculator | None = None) -> list[Configuration]:
    """Build ``n_configs`` labelled Cu/Ni configurations: bulk alloys, surface slabs and vacancies.

    Systems cycle through ``SYSTEM_CYCLE`` (50 % bulk, 25 % surface, 25 % vacancy) and
    ``temperatures``; each contributes its ideal (strained, unrelaxed) structure plus short-MD
    snapshots.  Deterministic for a given ``seed`` (one ``numpy.random.Generator`` drives
    compositions, strains, initial velocities and the Langevin noise).  ``calculator`` defaults to
    EMT; another (any ASE calculator) changes the labels but not the structure-building logic
    (``source`` stays "emt:cu-ni" only for EMT).  ``frame`` is the running index 0..n_configs-1.
    """
    if n_configs <= 0:
        return []
    if not temperatures:
        raise ValueError("temperatures must not be empty")
    rng = np.random.default_rng(seed)
    calc = calculator if calculator is not None else EMT()
    source = SOURCE if calculator is None else f"{type(calc).__name__.lower()}:cu-ni"
    per_system = _frames_per_system(n_configs)
    configs: list[Configuration] = []
    system = 0
    while len(configs) < n_configs:
        kind = SYSTEM_CYCLE[system % len(SYSTEM_CYCLE)]
        temperature = float(temperatures[system % len(temperatures)])
        if kind == "surface":
            atoms, info = _build_surface(rng)
        else:
            atoms, info = _build_bulk(rng, vacancy=kind == "vacancy")
        info["system"] = system
        fields = dict(config_type=kind, source=source)
        configs.append(label(atoms, calc, info={**info, "temperature_K": 0.0, "md_step": 0}, **fields))
        n_md = min(per_system, n_configs - len(configs) + 1) - 1
        if n_md > 0:
            configs += run_md_snapshots(atoms, calc, temperature, n_md, MD_STRIDE, rng, info=info, **fields)
        if progress:
            print(f"[emt-data] system {system} {kind:8s} T={temperature:6.0f} K "
                  f"n_atoms={len(atoms)} -> {len(configs)}/{n_configs}", file=sys.stderr, flush=True)
        system += 1
    configs = configs[:n_configs]
    for i, c in enumerate(configs):
        c.frame = i
    return configs


def generate_cu_ni_test_set(n_configs: int = 60, seed: int = 1_000_003, **kwargs) -> list[Configuration]:
    """Held-out set: the same generator with an unrelated seed, so no structure is shared with training."""
    return generate_cu_ni_dataset(n_configs=n_configs, seed=seed, **kwargs)
