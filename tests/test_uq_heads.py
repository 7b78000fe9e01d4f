"""The single-model estimator: heads on a frozen backbone, invariant σ, unchanged predictions, bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from ase.build import molecule
from scipy.spatial.transform import Rotation

from equiforce.data import keys as K
from equiforce.errors import UnknownElementError
from equiforce.models import ModelSpec, build_model
from equiforce.uq import keys as UK
from equiforce.uq.calibration import CalibrationError
from equiforce.uq.fit import build_uq_potential, calibrate
from equiforce.uq.heads import UQPotential
from tests.conftest import MODEL_CONFIGS, make_model
from tests.uq_helpers import batch_of, graphs, labelled, single_thread  # noqa: F401


@pytest.fixture(scope="module")
def uq_model() -> UQPotential:
    torch.manual_seed(0)
    backbone = make_model("L1-corr3", seed=0)
    train, valid = graphs(labelled(24, seed=1, periodic=True)), graphs(labelled(12, seed=2, periodic=True))
    return build_uq_potential(backbone, train, valid, steps=40, n_heads=4, hidden=8)


def test_backbone_predictions_are_unchanged(uq_model):
    batch = batch_of([molecule("CH3CH2OH"), molecule("H2O")])
    plain = make_model("L1-corr3", seed=0)(batch)
    out = uq_model(batch)
    assert torch.equal(out[K.ENERGY], plain[K.ENERGY])
    assert torch.equal(out[K.FORCES], plain[K.FORCES])
    assert out[UK.ENERGY_STD].shape == (2,) and out[UK.FORCES_STD].shape == (12,)
    assert bool((out[UK.FORCES_STD] > 0).all()) and bool((out[UK.ENERGY_STD] > 0).all())


def test_sigma_is_rotation_invariant(uq_model):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=5)
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ Rotation.random(random_state=3).as_matrix().T
    a, b = uq_model(batch_of([atoms])), uq_model(batch_of([rotated]))
    torch.testing.assert_close(a[UK.FORCES_STD], b[UK.FORCES_STD], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(a[UK.ENERGY_STD], b[UK.ENERGY_STD], atol=1e-9, rtol=1e-9)


def test_stress_sigma_for_periodic_cells(uq_model):
    from ase.build import bulk

    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.03, seed=1)
    boxed = molecule("H2O")  # a molecule in a box (pbc all False): no stress, so no stress σ either
    boxed.set_cell([8.0, 8.0, 8.0])
    boxed.center()
    out = uq_model(batch_of([cu, molecule("H2O"), boxed]), compute_stress=True)
    assert uq_model.heads.stress_trained
    assert bool((out[UK.STRESS_STD][0] > 0).all()) and float(out[UK.STRESS_STD][1:].abs().max()) == 0.0
    assert float(out[K.STRESS][2].abs().max()) == 0.0


def test_extrapolation_raises_sigma_far_from_training(uq_model):
    """A squeezed molecule lies outside the training environments: its σ must grow, not stay put."""
    atoms = molecule("CH3CH2OH")
    squeezed = atoms.copy()
    squeezed.positions *= 0.75
    sigma = uq_model(batch_of([atoms, squeezed]))[UK.FORCES_STD]
    assert float(sigma[9:].mean()) > float(sigma[:9].mean())


def test_tiny_calibration_set_is_refused(uq_model):
    with pytest.raises(CalibrationError, match="at least 10"):
        calibrate(uq_model, graphs(labelled(5, seed=3)))


def test_element_never_seen_is_refused_by_name():
    backbone = make_model("L1-corr3", seed=0)
    molecules_only = graphs(labelled(12, seed=1, periodic=False))
    model = build_uq_potential(backbone, molecules_only, graphs(labelled(12, seed=2)), steps=5, n_heads=2, hidden=4)
    assert 29 not in model.seen_elements and 29 in model.elements
    with pytest.raises(UnknownElementError, match=r"Cu \(Z=29\) never appeared"):
        model.check_elements([1, 6, 29])
    from ase import Atoms

    out = model(batch_of([Atoms("CuH", positions=[[0, 0, 0], [1.5, 0, 0]]), molecule("H2O")]))
    assert torch.isinf(out[UK.FORCES_STD][0]) and torch.isfinite(out[UK.FORCES_STD][1:]).all()
    assert torch.isinf(out[UK.ENERGY_STD][0]) and torch.isfinite(out[UK.ENERGY_STD][1])


def test_element_only_in_the_calibration_set_is_not_seen(caplog):
    """Heads fitted without Cu have no extrapolation statistics for it: Cu in the calibration data alone does not
    make it a seen element (its σ would lack the out-of-distribution term); those structures are left out."""
    backbone = make_model("L1-corr3", seed=0)
    molecules_only = graphs(labelled(12, seed=1, periodic=False))
    with_copper = graphs(labelled(12, seed=2) + labelled(4, seed=3, periodic=True))
    assert any(29 in g[K.NUMBERS].tolist() for g in with_copper)
    with caplog.at_level("WARNING"):
        model = build_uq_potential(backbone, molecules_only, with_copper, steps=5, n_heads=2, hidden=4)
    assert 29 not in model.seen_elements and "calibrated without them" in caplog.text
    with pytest.raises(UnknownElementError, match=r"Cu \(Z=29\) never appeared"):
        model.check_elements([29])
    assert model.calibration.fitted("forces")


def test_heads_need_l1_features():
    spec = dict(MODEL_CONFIGS["L1-corr3"], max_l=0)
    with pytest.raises(ValueError, match="max_l"):
        build_uq_potential(build_model(ModelSpec(**spec)), [], [])


def test_single_model_cost_is_measured(uq_model):
    """Cost with heads relative to the plain backbone (printed, not asserted: timings are noisy)."""
    batch = batch_of([molecule("CH3CH2OH")] * 8)
    times = {"plain": [], "heads": []}
    for _ in range(3):
        for label, model in (("plain", uq_model.backbone), ("heads", uq_model)):
            start = time.perf_counter()
            out = model(batch)
            times[label].append(time.perf_counter() - start)
            assert torch.isfinite(out[K.FORCES]).all()
    print(f"heads / plain (8 ethanols, tiny model): {np.median(times['heads']) / np.median(times['plain']):.2f}x")


def test_quantity_with_too_few_labels_stays_uncalibrated_with_a_warning(uq_model, caplog):
    """12 calibration structures, 4 of them periodic with stress: forces and energy are calibrated, stress is
    left as it is (documented fallback) and the log says why."""
    import copy
    import logging

    model = copy.deepcopy(uq_model)
    with caplog.at_level(logging.WARNING):
        cal = calibrate(model, graphs(labelled(12, seed=4, periodic=True)))
    assert cal.fitted("forces") and cal.fitted("energy") and not cal.fitted("stress")
    assert "stress σ left uncalibrated: only 4 calibration structures have stress" in caplog.text


def test_heads_trained_without_stress_give_no_stress_sigma():
    import dataclasses

    from ase.build import bulk

    from equiforce.sim.calculator import Calculator

    backbone = make_model("L1-corr3", seed=0)
    no_stress = [dataclasses.replace(c, stress=None) for c in labelled(12, seed=1, periodic=True)]
    assert any(c.pbc.any() for c in no_stress)  # periodic cells, but not one stress label
    model = build_uq_potential(backbone, graphs(no_stress), graphs(labelled(12, seed=2)), steps=5, n_heads=2,
                               hidden=4)
    assert not model.heads.stress_trained
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.03, seed=1)
    out = model(batch_of([cu]), compute_stress=True)
    assert K.STRESS in out and UK.STRESS_STD not in out
    cu.calc = Calculator(model)
    cu.get_stress()
    assert "stress" in cu.calc.results and "stress_std" not in cu.calc.results
    assert cu.calc.results["forces_std"].shape == (len(cu),)
