"""Calibration and σ-quality metrics on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from equiforce.uq.calibration import Calibration, CalibrationError, QuantityCalibration, fit_quantity
from equiforce.uq.metrics import calibration_curve, gaussian_nll, miscalibration_area, spearman, uq_report
from equiforce.uq.predict import UQPredictions

RNG = np.random.default_rng(0)


def test_scale_recovers_a_known_factor_for_energy_and_forces():
    raw = RNG.lognormal(-3.0, 0.7, 20000)
    energy_residual = RNG.normal(0.0, 2.5 * raw)
    cal = fit_quantity("energy", energy_residual, raw, n_structures=20000)
    assert cal.method == "scale" and cal.scale == pytest.approx(2.5, rel=0.03)
    # forces: σ is the norm convention, each component has σ/√3
    force_residual = RNG.normal(0.0, (0.4 * raw / math.sqrt(3))[:, None], size=(20000, 3))
    cal = fit_quantity("forces", force_residual, raw, n_structures=2000)
    assert cal.scale == pytest.approx(0.4, rel=0.03)
    calibrated = cal.apply(torch.as_tensor(raw)).numpy()
    assert miscalibration_area(force_residual, np.repeat(calibrated[:, None] / math.sqrt(3), 3, 1)) < 0.01


def test_isotonic_recovers_a_monotone_map_and_extrapolates_proportionally():
    raw = RNG.uniform(0.1, 1.0, 40000)
    true_sigma = raw**2  # the raw σ ranks right but is wrong in shape: a scale cannot fix it
    residual = RNG.normal(0.0, true_sigma)
    iso = fit_quantity("energy", residual, raw, n_structures=40000, method="isotonic")
    scale = fit_quantity("energy", residual, raw, n_structures=40000, method="scale")
    probe = torch.tensor([0.3, 0.5, 0.8])
    np.testing.assert_allclose(iso.apply(probe).numpy(), probe.numpy() ** 2, rtol=0.12)
    assert gaussian_nll(residual, iso.apply(torch.as_tensor(raw)).numpy()) < \
        gaussian_nll(residual, scale.apply(torch.as_tensor(raw)).numpy())
    far = iso.apply(torch.tensor([2.0, 4.0])).numpy()  # beyond the data: proportional, never capped
    assert far[1] == pytest.approx(2 * far[0], rel=1e-9) and far[0] > iso.knots_y[-1]
    assert np.all(np.diff(iso.apply(torch.linspace(0.0, 5.0, 200)).numpy()) >= -1e-12)


def test_too_few_structures_and_bad_sigma_are_refused():
    with pytest.raises(CalibrationError, match="at least 10"):
        fit_quantity("energy", np.ones(9), np.ones(9), n_structures=9)
    with pytest.raises(CalibrationError, match="non-finite"):
        fit_quantity("energy", np.ones(20), np.full(20, np.nan), n_structures=20)
    with pytest.raises(CalibrationError, match="method"):
        fit_quantity("energy", np.ones(20), np.ones(20), n_structures=20, method="magic")


def test_calibration_json_round_trip():
    cal = Calibration({"energy": QuantityCalibration("scale", 1.7, n_structures=12, n_samples=12),
                       "forces": QuantityCalibration("isotonic", 1.0, [0.1, 0.2], [0.3, 0.5], 12, 100)})
    again = Calibration.from_json(cal.to_json())
    assert again == cal and again.fitted("forces") and not again.fitted("stress")
    sigma = torch.tensor([0.05, 0.15, 0.4])
    torch.testing.assert_close(again.apply("forces", sigma), torch.tensor([0.15, 0.4, 1.0]))
    assert torch.equal(again.apply("stress", sigma), sigma)


def test_spearman_known_answers():
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.ones(10), x))


def test_miscalibration_area_known_answers():
    sigma = np.ones(400000)
    assert miscalibration_area(RNG.normal(0, 1, sigma.size), sigma) < 0.005  # calibrated
    assert miscalibration_area(np.zeros(100), np.ones(100)) == pytest.approx(0.5)  # σ infinitely too large
    # σ half the true spread: observed(p) = 2Φ(Φ⁻¹((1+p)/2) / 2) − 1, integrated analytically
    exact = quad(lambda p: abs(2 * norm.cdf(norm.ppf((1 + p) / 2) / 2) - 1 - p), 0, 1)[0]
    area = miscalibration_area(RNG.normal(0, 2, sigma.size), sigma)
    assert area == pytest.approx(exact, abs=0.005)
    expected, observed = calibration_curve(np.array([0.0, 10.0]), np.ones(2))
    assert observed[0] == 0.5 and observed[-1] == 1.0 and expected[-1] == 1.0


def test_gaussian_nll_known_answer():
    assert gaussian_nll(np.ones(5), np.ones(5)) == pytest.approx(0.5 * math.log(2 * math.pi) + 0.5)
    assert gaussian_nll(np.zeros(3), np.full(3, 2.0)) == pytest.approx(0.5 * math.log(2 * math.pi * 4))


def _predictions(n_structures: int = 30, atoms: int = 4) -> UQPredictions:
    rng = np.random.default_rng(1)
    n = n_structures * atoms
    sigma_atom = rng.uniform(0.05, 0.5, n)
    residual = rng.normal(0, sigma_atom[:, None] / math.sqrt(3), (n, 3))
    sigma_e = rng.uniform(0.01, 0.1, n_structures)
    return UQPredictions(
        energy_pred=np.zeros(n_structures), energy_ref=rng.normal(0, sigma_e), energy_sigma=sigma_e,
        has_energy=np.ones(n_structures, bool), n_atoms=np.full(n_structures, atoms), forces_pred=np.zeros((n, 3)),
        forces_ref=residual, forces_sigma=sigma_atom, has_forces=np.ones(n, bool),
        structure=np.repeat(np.arange(n_structures), atoms), numbers=np.ones(n, np.int64))


def test_report_on_synthetic_predictions():
    pred = _predictions()
    report = uq_report(pred)
    assert report["basis"] == "forces" and report["n_structures"] == 30
    assert report["spearman_atom"] > 0.3 and report["spearman_struct"] > 0.0
    assert report["mean_force_sigma"] == pytest.approx(pred.forces_sigma.mean())
    assert report["mean_force_error"] == pytest.approx(np.linalg.norm(pred.forces_ref, axis=1).mean())
    subset = pred.subset(np.array([3, 1]))
    assert subset.n_structures == 2 and subset.forces_sigma.size == 8 and subset.structure.tolist() == [0] * 4 + [1] * 4
    both = UQPredictions.concatenate([pred, subset])
    assert both.n_structures == 32 and both.structure.max() == 31
    no_forces = UQPredictions(**{**pred.__dict__, "has_forces": np.zeros(pred.has_forces.size, bool)})
    report = uq_report(no_forces)
    assert report["basis"] == "energy" and report["mean_force_error"] is None
    assert report["spearman_struct"] == report["energy_spearman"]


def test_forces_in_too_few_calibration_structures_are_left_uncalibrated_with_a_warning(caplog):
    """12 structures with energies, forces on 5 of them: energy calibrated, forces left raw — and said."""
    from equiforce.uq.fit import fit_calibration

    n, per = 12, 3
    sigma = RNG.uniform(0.05, 0.2, n * per)
    has_forces = np.repeat(np.arange(n) < 5, per)
    raw = UQPredictions(
        energy_pred=np.zeros(n), energy_ref=RNG.normal(0.0, 0.1, n), energy_sigma=RNG.uniform(0.05, 0.2, n),
        has_energy=np.ones(n, bool), n_atoms=np.full(n, per), forces_pred=np.zeros((n * per, 3)),
        forces_ref=RNG.normal(0.0, 0.1, (n * per, 3)), forces_sigma=sigma, has_forces=has_forces,
        structure=np.repeat(np.arange(n), per), numbers=np.ones(n * per, np.int64))
    with caplog.at_level("WARNING"):
        cal = fit_calibration(raw)
    assert cal.fitted("energy") and not cal.fitted("forces")
    assert "force σ left uncalibrated: only 5 calibration structures have forces" in caplog.text
