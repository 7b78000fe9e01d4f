"""Adding elements to a trained model: on structures of the old elements the extended model is the old model
(energies, forces, stress to rounding), for every kind of layer; the new elements get working weights, their
E0s, and a model file that loads; a ZBL prior covers them too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from equiforce.models import ModelSpec, build_model
from equiforce.models.extend import with_elements
from equiforce.models.file import load_model, save_model
from tests.conftest import MODEL_CONFIGS
from tests.test_physics import alloy_system, predict

OLD = [1, 8, 29]  # H, O, Cu; C (6) and Ni (28) are added: each lands between old elements
ADDED = {6: -1030.5, 28: -1370.25}


def reduced(name: str, seed: int = 0):
    """The fixture model ``name`` trained (here: perturbed) on H, O and Cu only."""
    config = dict(MODEL_CONFIGS[name], elements=OLD)
    config["e0s"] = {z: v for z, v in config.get("e0s", {}).items() if z in OLD}
    if config.get("short_range_fade"):
        config["short_range_fade"] = {"Cu-Cu": config["short_range_fade"]["Cu-Cu"]}
    torch.manual_seed(seed)
    model = build_model(ModelSpec(**config), dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.shift_correction.copy_(torch.tensor([0.05, -0.1, 0.2]))
    return model.eval()


def old_structures() -> list[Atoms]:
    water = molecule("H2O")
    water += Atoms("Cu2", positions=[[0.0, 0.0, 2.3], [0.0, 2.2, 2.6]])
    water.rattle(0.05, seed=1)
    box = alloy_system(seed=2)
    box.numbers[box.numbers == 28] = 8
    box.numbers[0] = 1
    return [water, box]


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_extended_model_equals_the_old_one_on_old_elements(name):
    model = reduced(name)
    grown = with_elements(model, [6, 28], ADDED).eval()
    assert grown.spec.elements == [1, 6, 8, 28, 29]
    assert grown.spec.e0s == {**model.spec.e0s, **ADDED}
    for atoms in old_structures():
        stress = bool(atoms.pbc.any())
        before, after = predict(model, [atoms], stress=stress), predict(grown, [atoms], stress=stress)
        for key, value in before.items():
            np.testing.assert_allclose(after[key], value, rtol=1e-12, atol=1e-12, err_msg=f"{name}: {key}")


def test_new_elements_get_weights_e0s_and_a_loadable_file(tmp_path):
    model = reduced("L2-corr2-zbl")
    grown = with_elements(model, [6, 28], ADDED, seed=3).eval()
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=4)
    out = predict(grown, [ethanol])
    assert np.isfinite(out["energy"]).all() and np.isfinite(out["forces"]).all()
    # an isolated new atom: its E0 (the shift is gated off without neighbours), and the ZBL prior acts on it
    ni = predict(grown, [Atoms("Ni", positions=[[0, 0, 0]])])["energy"][0]
    hydrogen = predict(grown, [Atoms("H", positions=[[0, 0, 0]])])["energy"][0]
    assert abs((ni - hydrogen) - (ADDED[28] - grown.spec.e0s.get(1, 0.0))) < 1e-9
    close = Atoms("NiC", positions=[[0, 0, 0], [0, 0, 0.3]])
    assert predict(grown, [close])["forces"][1, 2] > 10.0  # pushed apart hard
    path = save_model(grown, tmp_path / "grown.eqf")
    loaded = load_model(path)
    np.testing.assert_allclose(predict(loaded, [ethanol])["forces"], out["forces"], rtol=1e-12, atol=1e-12)


def test_nothing_to_add_and_missing_e0s():
    model = reduced("L1-corr3")
    assert with_elements(model, [1, 29], {}) is model
    with pytest.raises(ValueError, match=r"no E0 given for the new element\(s\) \[28\]"):
        with_elements(model, [28], {6: 0.0})
