"""`equiforce demo` end to end on a tiny budget: every promised file is written and the numbers are real."""

from __future__ import annotations

import json
import math

import pytest

from equiforce.cli import main
from equiforce.demo.main import run_demo
from equiforce.models.file import load_model


def test_cu_ni_demo_writes_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = run_demo(out, system="cu-ni", minutes=0.1, n_train=16, n_test=4, md_steps=10, progress=False)
    for name in ("model.eqf", "summary.md", "summary.json", "metrics.json", "parity.png", "config.yaml",
                 "data/train.xyz", "data/test.xyz", "train/metrics.jsonl", "md/trajectory.xyz"):
        assert (out / name).is_file(), name
    assert "equiforce demo" in capsys.readouterr().out
    assert summary["n_test"] == 4
    for key in ("energy_per_atom_mae", "forces_mae", "stress_mae"):
        assert math.isfinite(summary["test"][key]) and summary["test"][key] > 0
    md = summary["md"]
    assert md["steps"] == 10 and md["natoms"] == 108
    assert math.isfinite(md["force_mae_vs_reference_mev_a"]) and md["min_distance_A"] > 1.0
    assert json.loads((out / "summary.json").read_text())["system"] == "cu-ni"
    assert load_model(out / "model.eqf").elements == [28, 29]


def test_unknown_demo_system_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--system", "unobtainium", "--out", str(tmp_path)]) == 2
    assert "unknown demo system 'unobtainium'" in capsys.readouterr().err


@pytest.mark.slow
def test_default_demo_budget(tmp_path):
    """The full `make demo` job (minutes long): finishes and learns EMT to useful accuracy."""
    summary = run_demo(tmp_path / "demo", system="cu-ni")
    assert summary["test"]["forces_mae"] < 150.0
