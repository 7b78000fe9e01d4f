"""`equiforce train-uq`: an ensemble and a heads model from one YAML file each, calibrated, one file."""

from __future__ import annotations

import json

import pytest
import yaml

import equiforce
from equiforce.cli import main
from equiforce.uq.config import load_uq_config
from equiforce.uq.ensemble import EnsemblePotential
from equiforce.uq.heads import UQPotential
from equiforce.uq.train import bootstrap_weights
from tests.uq_helpers import labelled, single_thread, write_labelled  # noqa: F401

MODEL = {"channels": 4, "max_l": 1, "sh_lmax": 1, "correlation": 1, "num_layers": 2, "radial_mlp": [8],
         "cutoff": 4.0, "readout_hidden": 4}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.xyz"
    write_labelled(path, labelled(36, seed=11))
    return path


def _config(tmp_path, data_file, uq):
    config = {"data": {"train": str(data_file), "valid_fraction": 0.34},
              "model": MODEL, "training": {"epochs": 1, "batch_size": 12, "device": "cpu", "ema_decay": 0.0},
              "output": {"directory": str(tmp_path / "run")}, "uq": uq}
    path = tmp_path / "uq.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_ensemble_then_heads(tmp_path, data_file, capsys):
    config = _config(tmp_path, data_file, {"method": "ensemble", "members": 2, "bootstrap": True})
    assert main(["train-ensemble", str(config), "--no-progress"]) == 0
    model = equiforce.load_model(tmp_path / "run" / "uq.eqf")
    assert isinstance(model, EnsemblePotential) and model.n_members == 2
    assert [m["seed"] for m in model.members_info] == [0, 1] and model.calibration.fitted("forces")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())  # what it printed, kept
    assert metrics["method"] == "ensemble" and metrics["valid"]["mean_force_sigma_labelled"] > 0
    assert "Spearman" in capsys.readouterr().out
    backbone = tmp_path / "run" / "members" / "m0" / "best.eqf"
    config = _config(tmp_path, data_file, {"method": "heads", "backbone": str(backbone), "heads": {"steps": 5}})
    assert main(["train-uq", str(config), "--no-progress"]) == 0
    heads = equiforce.load_model(tmp_path / "run" / "uq.eqf")
    assert isinstance(heads, UQPotential) and heads.calibration.fitted("energy")


def test_uq_config_errors_name_the_key(tmp_path, data_file, capsys):
    config = _config(tmp_path, data_file, {"method": "ensemble", "memebers": 3})
    assert main(["train-uq", str(config)]) == 2
    assert "uq.memebers" in capsys.readouterr().err
    assert load_uq_config(_config(tmp_path, data_file, {})).uq.members == 4
    for uq, named in (({"method": "ensemble", "backbone": "m.eqf"}, "uq.backbone"),
                      ({"method": "heads", "members": 5, "bootstrap": True}, "uq.members, uq.bootstrap")):
        assert main(["train-uq", str(_config(tmp_path, data_file, uq))]) == 2
        assert f"{named} belong(s) to method" in " ".join(capsys.readouterr().err.split())
    assert main(["train-uq", str(_config(tmp_path, data_file, {"method": "heads", "backbone": "nope.eqf"}))]) == 2
    assert "uq.backbone: model file nope.eqf does not exist" in capsys.readouterr().err


def test_bootstrap_weights_are_multinomial_counts():
    configs = list(labelled(12, seed=1))
    weights = [c.weight for c in bootstrap_weights(configs, seed=3)]
    assert sum(weights) == len(configs) and all(w == int(w) >= 0 for w in weights) and 0 in weights


def test_too_small_calibration_split_fails_before_any_training(tmp_path, data_file, capsys):
    """36 structures × 0.1 leaves 4 to calibrate on: refused at once, naming the key, with nothing trained."""
    config = _config(tmp_path, data_file, {"method": "ensemble", "members": 2})
    raw = yaml.safe_load(config.read_text())
    raw["data"]["valid_fraction"] = 0.1
    config.write_text(yaml.safe_dump(raw))
    assert main(["train-uq", str(config), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "at least 10 held-out structures" in err and "data.valid_fraction" in err
    assert not (tmp_path / "run" / "members").exists()


def test_heads_on_a_one_layer_model_are_refused_before_training(tmp_path, data_file, capsys):
    config = _config(tmp_path, data_file, {"method": "heads"})
    raw = yaml.safe_load(config.read_text())
    raw["model"]["num_layers"] = 1
    config.write_text(yaml.safe_dump(raw))
    assert main(["train-uq", str(config), "--no-progress"]) == 2
    assert "uncertainty heads need num_layers ≥ 2" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run" / "backbone").exists()


def test_train_uq_from_a_pack_equals_train_uq_from_its_file(tmp_path, data_file):
    """A pack as data.train (and as data.test) is read batch by batch: bootstrap members (loss-weight factors on
    the pack), calibration, heads (fitted on a sample of at most uq.heads.max_structures) and test metrics are
    those the file gives."""
    import torch
    from safetensors.torch import load_file

    from equiforce.data.packed import pack
    from equiforce.uq.train import train_uq

    store = tmp_path / "train.pack"
    pack([data_file], store, cutoff=5.0)  # wider than the model's 4 Å
    results = {}
    for kind, data in (("file", data_file), ("pack", store)):
        for method, uq in (("ensemble", {"method": "ensemble", "members": 2, "bootstrap": True}),
                           ("heads", {"method": "heads", "heads": {"steps": 5, "max_structures": 15}})):
            (tmp_path / kind / method).mkdir(parents=True)
            config = _config(tmp_path / kind / method, data, uq)
            raw = yaml.safe_load(config.read_text())
            raw["data"]["test"] = str(data)
            config.write_text(yaml.safe_dump(raw))
            results[kind, method] = train_uq(load_uq_config(config), progress=False)
    for method in ("ensemble", "heads"):
        ours, theirs = results["pack", method], results["file", method]
        assert ours["calibration"].keys() == theirs["calibration"].keys() == {"energy", "forces"}
        for quantity, fitted in theirs["calibration"].items():
            assert ours["calibration"][quantity]["scale"] == pytest.approx(fitted["scale"], rel=1e-7), quantity
        for part in ("valid", "test"):
            for key, value in theirs[part].items():
                if isinstance(value, float):
                    assert ours[part][key] == pytest.approx(value, rel=1e-7, abs=1e-12), (method, part, key)
        weights = load_file(tmp_path / "pack" / method / "run" / "uq.eqf")
        expected = load_file(tmp_path / "file" / method / "run" / "uq.eqf")
        for key in expected:
            torch.testing.assert_close(weights[key], expected[key], rtol=1e-7, atol=1e-9)
