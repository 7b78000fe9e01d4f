"""Small labelled data sets and models for the uncertainty tests (teacher-labelled, no files needed)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from equiforce.data import keys as K
from equiforce.data.graph import collate, config_to_graph
from equiforce.data.structure import Configuration
from equiforce.uq.ensemble import EnsemblePotential
from tests.conftest import make_model

MOLECULES = ("CH4", "H2O", "CH3CH2OH", "CH3OH", "C2H4", "HCOOH")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models are overhead bound: one thread avoids OpenMP spinning on a shared 2-core machine.

    Test modules import this fixture so that it applies to them.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def structures(n: int, seed: int = 0, periodic: bool = False) -> list:
    """Rattled molecules (and, when asked, small Cu/Ni cells)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if periodic and i % 3 == 2:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
            atoms.numbers[:2] = 28
        else:
            atoms = molecule(MOLECULES[i % len(MOLECULES)])
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


@lru_cache(maxsize=16)
def labelled(n: int, seed: int = 0, periodic: bool = False, teacher_seed: int = 7) -> tuple[Configuration, ...]:
    """Structures labelled with a random 'teacher' model, so a student's residuals are non-trivial (cached)."""
    teacher = make_model("L1-corr3", seed=teacher_seed)
    configs = []
    for atoms in structures(n, seed, periodic):
        config = Configuration.from_atoms(atoms)
        g = collate([config_to_graph(config, teacher.cutoff)])
        is_periodic = bool(atoms.pbc.any())
        out = teacher(g, compute_stress=is_periodic)
        config.energy = float(out[K.ENERGY][0].detach())
        config.forces = out[K.FORCES].detach().numpy()
        if is_periodic:
            config.stress = out[K.STRESS][0].detach().numpy()
        configs.append(config)
    return tuple(configs)


def graphs(configs, cutoff: float = 4.0) -> list:
    return [config_to_graph(c, cutoff) for c in configs]


def ensemble(n_members: int = 3, name: str = "L1-corr3") -> EnsemblePotential:
    return EnsemblePotential.from_members([make_model(name, seed=s) for s in range(n_members)])


def batch_of(atoms_list, cutoff: float = 4.0) -> dict[str, torch.Tensor]:
    return collate([config_to_graph(Configuration.from_atoms(a), cutoff) for a in atoms_list])


def write_labelled(path, configs) -> None:
    """Write labelled configurations as extxyz (energy in info, forces in arrays)."""
    from ase.io import write

    atoms = []
    for config in configs:
        a = config.to_atoms()
        a.info["energy"] = config.energy
        a.arrays["forces"] = config.forces
        atoms.append(a)
    write(path, atoms, format="extxyz")
