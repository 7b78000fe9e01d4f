"""The per-atom shift's gate: 0 for an isolated atom, and with ``shift_gate: bonds`` exactly 1 for a bonded
atom and exactly 0 for one whose nearest neighbour is beyond bond range — over bond lengths, not over the
whole cutoff (the physics suite runs the gate through its invariance and derivative tests)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.data import covalent_radii

from equiforce.data import atoms_to_graph, collate
from equiforce.data import keys as K
from equiforce.models import ModelSpec, build_model
from equiforce.models.spec import DEFAULT_BOND_SWITCH

BOND_ON, BOND_OFF = DEFAULT_BOND_SWITCH


def gate_model(gate: str, cutoff: float = 5.0, switch: tuple[float, float] = (BOND_ON, BOND_OFF)):
    spec = ModelSpec(elements=[1, 6, 8, 55], channels=4, max_l=1, sh_lmax=2, correlation=2, num_layers=2,
                     radial_mlp=[8], cutoff=cutoff, shift_gate=gate, energy_shift=-4.0, avg_num_neighbors=4.0,
                     bond_switch=switch)
    return build_model(spec).eval()


def gates(model, atoms) -> np.ndarray:
    graph = collate([atoms_to_graph(atoms, model.cutoff)])
    species = model.z_to_index[graph[K.NUMBERS]]
    _, lengths = model._edges(graph, graph[K.POSITIONS], graph[K.CELL])
    return model._gate(species, graph[K.EDGE_INDEX], lengths, model.envelope(lengths)).detach().numpy()


def dimer(a: str, b: str, r: float) -> Atoms:
    return Atoms(a + b, positions=[[0.0, 0.0, 0.0], [0.0, 0.0, r]])


def test_bond_gate_switches_over_bond_lengths():
    model = gate_model("bonds")
    bond = 2 * covalent_radii[6]
    rs = np.linspace(0.8, 4.9, 83)
    g = np.array([gates(model, dimer("C", "C", r))[0] for r in rs])
    assert np.all(g[rs <= BOND_ON * bond] == 1.0) and np.all(g[rs >= BOND_OFF * bond] == 0.0)
    assert np.all(np.diff(g) <= 1e-12)  # monotone: stretching a bond never switches it back on
    # the default gate still reaches out to the cutoff: at 2 bond lengths it is still almost half on
    coordination = gate_model("coordination")
    assert gates(coordination, dimer("C", "C", 2 * bond))[0] > 0.4
    assert gates(model, dimer("C", "C", 2 * bond))[0] == 0.0


def test_a_wider_bond_switch_fades_over_its_own_range():
    """``bond_switch`` moves both ends; the file keeps it (a model rebuilt from its spec switches alike)."""
    on, off = 1.1, 2.4
    model = gate_model("bonds", switch=(on, off))
    bond = covalent_radii[1] + covalent_radii[6]
    rs = np.linspace(0.8, 4.9, 83)
    g = np.array([gates(model, dimer("C", "H", r))[0] for r in rs])
    assert np.all(g[rs <= on * bond] == 1.0) and np.all(g[rs >= off * bond] == 0.0)
    inside = (rs > on * bond) & (rs < off * bond)
    assert np.all((g[inside] > 0) & (g[inside] < 1)) and np.all(np.diff(g) <= 1e-12)
    assert tuple(ModelSpec.model_validate_json(model.spec.model_dump_json()).bond_switch) == (on, off)
    with pytest.raises(ValueError, match="bond_switch"):
        ModelSpec(elements=[1], shift_gate="bonds", bond_switch=(1.8, 1.3))


def test_bonded_atoms_are_exactly_on_whatever_else_is_near():
    model = gate_model("bonds")
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    np.testing.assert_array_equal(gates(model, ethanol), 1.0)  # geminal pairs in the switch change nothing
    assert gates(model, Atoms("C", positions=[[0, 0, 0]]))[0] == 0.0  # an isolated atom: exactly E0


def test_large_atoms_switch_off_inside_the_cutoff():
    """Cs–Cs would be 'bonded' up to 1.3 × 4.88 Å: the switch is pulled inside the cutoff, so the gate is 0
    where the edge leaves and the energy stays continuous there."""
    model = gate_model("bonds", cutoff=5.0)
    assert gates(model, dimer("Cs", "Cs", 4.999))[0] == pytest.approx(0.0, abs=1e-8)  # (1 - t)³ → 0 at the cutoff
    assert gates(model, dimer("Cs", "Cs", 5.001))[0] == 0.0  # the edge is gone
    assert gates(model, dimer("Cs", "Cs", 5.0 * BOND_ON / BOND_OFF))[0] == 1.0


def test_h_removal_loses_the_shift_within_bond_range():
    """Pulling the hydroxyl H off ethanol: with the bond gate the H's shift is gone by 1.8 × (r_O + r_H), while
    the coordination gate keeps most of it to several ångström (H still has C neighbours within the cutoff)."""
    ethanol = molecule("CH3CH2OH")
    o = int(np.where(ethanol.numbers == 8)[0][0])
    h = int(np.argmin([np.inf if ethanol.numbers[i] != 1 else ethanol.get_distance(o, i) for i in range(9)]))
    direction = ethanol.positions[h] - ethanol.positions[o]
    direction /= np.linalg.norm(direction)
    far = BOND_OFF * (covalent_radii[8] + covalent_radii[1]) + 0.05
    stretched = ethanol.copy()
    stretched.positions[h] = ethanol.positions[o] + far * direction
    bonded_elsewhere = min(stretched.get_distance(h, i) / (covalent_radii[1] + covalent_radii[stretched.numbers[i]])
                           for i in range(9) if i != h)
    assert bonded_elsewhere > BOND_OFF  # nothing else within bond range of that H
    assert gates(gate_model("bonds"), stretched)[h] == 0.0
    assert gates(gate_model("coordination"), stretched)[h] > 0.9


def test_bond_gate_energy_is_continuous_and_forces_are_its_derivative():
    """Through the whole switch of a C–H pair (float64): forces equal central differences of the energy."""
    torch.manual_seed(0)
    model = gate_model("bonds")
    bond = covalent_radii[6] + covalent_radii[1]
    for r in np.linspace(BOND_ON * bond - 0.05, BOND_OFF * bond + 0.05, 9):
        atoms = dimer("C", "H", r)
        out = model(collate([atoms_to_graph(atoms, model.cutoff)]))
        h = 1e-5
        plus, minus = dimer("C", "H", r + h), dimer("C", "H", r - h)
        e_plus, e_minus = (float(model(collate([atoms_to_graph(a, model.cutoff)]), compute_forces=False)[K.ENERGY][0]
                                 .detach()) for a in (plus, minus))
        assert float(out[K.FORCES][1, 2]) == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-6)
