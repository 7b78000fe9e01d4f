"""The per-element shift refit is the least-squares solution on the gate-weighted design, removes an offset
that the design can express exactly, keeps isolated atoms at E0, and barely moves bonded forces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from equiforce.data import atoms_to_graph, collate
from equiforce.data import keys as K
from equiforce.train.trainer import refit_shift
from tests.conftest import make_model


def frames():
    out = []
    for i, name in enumerate(["CH3CH2OH", "CH4", "H2O", "CH3OH", "C2H6", "H2CO", "CH3CHO"]):
        atoms = molecule(name)
        atoms.rattle(0.02, seed=i)
        out.append(atoms)
    return out


def graphs_with_energies(model, atoms_list, extra):
    graphs = []
    for atoms, e in zip(atoms_list, extra):
        g = atoms_to_graph(atoms, model.cutoff)
        g[K.ENERGY] = model(collate([g]), compute_forces=False)[K.ENERGY].detach() + e
        g[K.HAS_ENERGY] = torch.ones(1, dtype=torch.float64)
        graphs.append(g)
    return graphs


def test_refit_recovers_an_offset_the_design_expresses():
    model = make_model("L1-corr3")
    atoms_list = frames()
    design = torch.cat([model.shift_design(collate([atoms_to_graph(a, model.cutoff)])) for a in atoms_list])
    delta = torch.zeros(len(model.spec.elements), dtype=torch.float64)
    index = {z: k for k, z in enumerate(model.spec.elements)}
    delta[index[1]], delta[index[6]], delta[index[8]] = 0.05, -0.3, 0.2
    graphs = graphs_with_energies(model, atoms_list, design @ delta)
    before = model(collate([atoms_to_graph(atoms_list[0], model.cutoff)]))
    refit_shift(model, [model], graphs, batch_size=3)
    torch.testing.assert_close(model.shift_correction[[index[1], index[6], index[8]]], delta[[index[1], index[6],
                                                                                             index[8]]],
                               rtol=0, atol=1e-10)
    residual = [float(g[K.ENERGY] - model(collate([g]), compute_forces=False)[K.ENERGY].detach()) for g in graphs]
    assert np.abs(residual).max() < 1e-10
    after = model(collate([atoms_to_graph(atoms_list[0], model.cutoff)]))
    assert float((after[K.FORCES] - before[K.FORCES]).abs().max()) < 0.05  # only the gate's small gradient
    isolated = model(collate([atoms_to_graph(Atoms("O", positions=[[0, 0, 0]]), model.cutoff)]))
    assert float(isolated[K.ENERGY].detach()) == pytest.approx(model.spec.e0s.get(8, 0.0), abs=1e-12)


def test_refit_is_least_squares_on_per_atom_residuals():
    model = make_model("L1-corr3")
    atoms_list = frames()
    rng = np.random.default_rng(0)
    offsets = torch.as_tensor(rng.normal(0.0, 0.2, len(atoms_list)))
    graphs = graphs_with_energies(model, atoms_list, offsets)
    design = torch.cat([model.shift_design(collate([g])) for g in graphs]).numpy()
    n = np.array([len(a) for a in atoms_list], dtype=float)
    used = [model.spec.elements.index(z) for z in (1, 6, 8)]
    expected, *_ = np.linalg.lstsq(design[:, used] / n[:, None], offsets.numpy() / n, rcond=None)
    refit_shift(model, [model], graphs, batch_size=4)
    np.testing.assert_allclose(model.shift_correction.numpy()[used], expected, atol=1e-9)


def test_single_composition_refit_moves_only_the_composition_direction():
    """One composition: the design's columns differ only by the gates' tiny variation between structures.
    Energy noise must not be fitted through that variation (it once gave shifts of tens of eV of opposite sign
    per element, harmless for the training geometries and ruinous for every other one)."""
    model = make_model("L1-corr3")
    atoms_list = []
    for i in range(24):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=100 + i)
        atoms_list.append(atoms)
    rng = np.random.default_rng(1)
    offsets = torch.as_tensor(0.6 + rng.normal(0.0, 0.05, len(atoms_list)))
    graphs = graphs_with_energies(model, atoms_list, offsets)
    refit_shift(model, [model], graphs, batch_size=8)
    used = [model.spec.elements.index(z) for z in (1, 6, 8)]
    correction = model.shift_correction[used]
    assert float(correction.abs().max()) < 0.5  # 0.6 eV over 9 atoms: a small, shared shift
    residual = np.array([float(g[K.ENERGY] - model(collate([g]), compute_forces=False)[K.ENERGY].detach())
                         for g in graphs])
    assert abs(residual.mean()) < 0.01  # the common offset is removed
    dimer = model(collate([atoms_to_graph(Atoms("OO", positions=[[0, 0, 0], [1.2, 0, 0]]), model.cutoff)]),
                  compute_forces=False)[K.ENERGY].detach()
    assert abs(float(dimer) - 2 * model.spec.e0s.get(8, 0.0)) < 50.0
