"""Small labelled data sets and models for the uncertainty tests (teacher-labelled, no files needed)."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk, molecule

from equiforce.data import keys as K
from equiforce.data.graph import collate, config_to_graph
from equiforce.data.structure import Configuration
from equiforce.uq.ensemble import EnsemblePotential
from tests.conftest import make_model

MOLECULES = ("CH4", "H2O", "CH3CH2OH", "CH3OH", "C2H4", "HCOOH")


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


def labelled(n: int, seed: int = 0, periodic: bool = False, teacher_seed: int = 7) -> list[Configuration]:
    """Structures labelled with a random 'teacher' model, so a student's residuals are non-trivial."""
    teacher = make_model("L1-corr3", seed=teacher_seed)
    configs = []
    for atoms in structures(n, seed, periodic):
        config = Configuration.from_atoms(atoms)
        g = collate([config_to_graph(config, teacher.cutoff)])
        is_periodic = bool(atoms.pbc.any())
        out = teacher(g, compute_stress=is_periodic)
        config.energy = float(out[K.ENERGY][0])
        config.forces = out[K.FORCES].detach().numpy()
        if is_periodic:
            config.stress = out[K.STRESS][0].detach().numpy()
        configs.append(config)
    return configs


def graphs(configs, cutoff: float = 4.0) -> list:
    return [config_to_graph(c, cutoff) for c in configs]


def ensemble(n_members: int = 3, name: str = "L1-corr3") -> EnsemblePotential:
    return EnsemblePotential.from_members([make_model(name, seed=s) for s in range(n_members)])


def batch_of(atoms_list, cutoff: float = 4.0) -> dict[str, torch.Tensor]:
    return collate([config_to_graph(Configuration.from_atoms(a), cutoff) for a in atoms_list])
