"""σ everywhere the model goes: the ASE calculator, the batched MD stop hook, `equiforce eval --uq`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk, molecule

import equiforce
from equiforce.cli import main
from equiforce.uq.file import save_uq_model
from equiforce.uq.stop import sigma_stop
from tests.conftest import make_model
from tests.uq_helpers import ensemble, labelled, single_thread, write_labelled  # noqa: F401


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory):
    return save_uq_model(ensemble(3), tmp_path_factory.mktemp("uq") / "ens.eqf")


def test_calculator_fills_uncertainty_results(ensemble_file):
    calc = equiforce.Calculator(ensemble_file)
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.numbers[:2] = 28
    cu.rattle(0.05, seed=0)
    cu.calc = calc
    cu.get_potential_energy()
    assert isinstance(calc.results["energy_std"], float) and calc.results["energy_std"] > 0
    assert calc.results["forces_std"].shape == (len(cu),) and calc.results["stress_std"].shape == (6,)
    assert calc.get_property("forces_std", cu).shape == (len(cu),)
    ethanol = molecule("CH3CH2OH")
    ethanol.calc = calc
    ethanol.get_forces()
    assert calc.results["forces_std"].shape == (9,) and "stress_std" not in calc.results
    plain = equiforce.Calculator(make_model("L1-corr3"))
    ethanol.calc = plain
    ethanol.get_forces()
    assert not any(key.endswith("_std") for key in plain.results)


def test_sigma_stop_flags_systems_in_batched_md():
    from equiforce.sim.md import run_md

    model = ensemble(3)
    systems = [molecule("H2O"), molecule("CH3CH2OH")]
    sigma = [float(np.max(equiforce.Calculator(model).get_property("forces_std", a.copy()))) for a in systems]
    threshold = float(np.sqrt(sigma[0] * sigma[1]))  # between the two systems' largest atomic σ
    low, high = int(np.argmin(sigma)), int(np.argmax(sigma))
    assert sigma[high] > 1.2 * sigma[low]  # a clear margin: 3 steps at 10 K move σ by far less
    result = run_md(model, [a.copy() for a in systems], ensemble="nve", temperature_K=10, timestep_fs=0.1, steps=3,
                    seed=0, stop_when=sigma_stop(forces=threshold), stop_mode="flag", log_interval=1)
    assert result.stopped_step[high] == 1 and result.stopped_step[low] == -1
    never = run_md(model, [a.copy() for a in systems], ensemble="nve", steps=2, seed=0,
                   stop_when=sigma_stop(forces=1e9, energy_per_atom=1e9))
    assert never.stopped_step.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="threshold"):
        sigma_stop()


def test_sigma_stop_needs_uncertainty():
    from equiforce.sim.md import run_md

    with pytest.raises(KeyError, match="forces_std"):
        run_md(make_model("L1-corr3"), [molecule("H2O")], ensemble="nve", steps=1, stop_when=sigma_stop(forces=0.1))


def test_md_command_stops_on_sigma(ensemble_file, tmp_path, capsys):
    """``equiforce md --stop-sigma``: the more uncertain system is frozen at once, the other runs on."""
    from ase.io import read, write

    systems = [molecule("H2O"), molecule("CH3CH2OH")]
    calc = equiforce.Calculator(ensemble_file)
    sigma = [float(np.max(calc.get_property("forces_std", a.copy()))) for a in systems]
    threshold = float(np.sqrt(sigma[0] * sigma[1]))
    low, high = int(np.argmin(sigma)), int(np.argmax(sigma))
    assert sigma[high] > 1.2 * sigma[low]
    write(tmp_path / "in.extxyz", systems)
    out = tmp_path / "md"
    common = ["md", str(ensemble_file), str(tmp_path / "in.extxyz"), "--ensemble", "nve", "--temperature", "10",
              "--timestep", "0.1", "--steps", "3", "--device", "cpu", "--seed", "0", "--no-progress"]
    assert main([*common, "--out", str(out), "--stop-sigma", str(threshold)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sigma_stopped"] == {str(high): 1} and summary["stop_mode"] == "freeze"
    assert "σ threshold crossed by 1 of 2" in capsys.readouterr().out
    start, final = read(tmp_path / "in.extxyz", index=":"), read(out / "final.extxyz", index=":")
    assert np.abs(final[low].positions - start[low].positions).max() > 0
    plain = equiforce.save_model(make_model("L1-corr3"), tmp_path / "plain.eqf")
    assert main(["md", str(plain), *common[2:], "--out", str(tmp_path / "p"), "--stop-sigma", "0.1"]) == 2
    assert "need a model with uncertainty" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "c"), "--compile"]) == 2  # an ensemble runs uncompiled only
    assert "--compile" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_eval_uq_writes_metrics_and_plots(ensemble_file, tmp_path, capsys):
    data = tmp_path / "data.xyz"
    write_labelled(data, labelled(12, seed=4))
    out = tmp_path / "eval"
    assert main(["eval", str(ensemble_file), str(data), "--uq", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "metrics.json").read_text())["uq"]
    for key in ("spearman_struct", "spearman_atom", "miscalibration_area", "nll", "mean_force_sigma",
                "mean_force_error", "energy_spearman"):
        assert np.isfinite(report[key]), key
    for name in ("calibration.png", "error_vs_sigma.png", "parity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "miscalibration area" in capsys.readouterr().out
    plain = equiforce.save_model(make_model("L1-corr3"), tmp_path / "plain.eqf")
    assert main(["eval", str(plain), str(data), "--uq", "--out", str(out)]) == 2
    assert "carries none" in capsys.readouterr().err


def test_eval_gathers_sigma_in_its_own_pass_as_predict_would():
    """`equiforce eval --uq` takes σ from the errors' pass (grouped by config_type, molecules and periodic cells
    with stress mixed): the same arrays, structure for structure, as a separate predict() pass."""
    from equiforce.evaluate import as_graphs, evaluate
    from equiforce.uq.predict import UQCollector, predict

    model = ensemble(3)
    configs = [*labelled(5, seed=4), *labelled(3, seed=5, periodic=True)]
    for i, config in enumerate(configs):
        config.config_type = ("md", "dimer")[i % 2]
    collector = UQCollector()
    evaluate(model, configs, batch_size=2, by_config_type=True, observers=[collector])
    gathered = collector.result()
    order = sorted(range(len(configs)), key=lambda i: (configs[i].config_type, i))  # groups in name order
    direct = predict(model, as_graphs(model, [configs[i] for i in order]), batch_size=2)
    assert gathered.n_structures == len(configs) and set(gathered.stress) == set(direct.stress) != set()
    for name in ("energy_pred", "energy_sigma", "forces_sigma", "forces_ref", "structure", "numbers"):
        np.testing.assert_allclose(getattr(gathered, name), getattr(direct, name), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gathered.stress["sigma"], direct.stress["sigma"], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(gathered.stress["has"], direct.stress["has"])
