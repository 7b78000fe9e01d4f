"""Smoke run of benchmarks/uq.py (tiny budget; the plumbing and the JSON contract are checked, not the numbers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ase.io import write

from tests.emt_ethanol import emt_ethanols

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("spearman_struct", "spearman_atom", "miscalibration_area", "nll", "mean_force_sigma", "mean_force_error")


def _run(*args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "uq.py"), *args], capture_output=True,
                          text=True, timeout=600, check=False, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_uq_benchmark_trains_rates_times_and_reuses(tmp_path):
    write(tmp_path / "train.extxyz", emt_ethanols(110, 0.05, 0))
    write(tmp_path / "test_md.extxyz", emt_ethanols(6, 0.05, 100))
    write(tmp_path / "test_far.extxyz", emt_ethanols(6, 0.25, 200))
    common = ["--train", str(tmp_path / "train.extxyz"), "--test", str(tmp_path / "test_md.extxyz"),
              str(tmp_path / "test_far.extxyz"), "--members", "2", "--repeats", "1", "--batch-size", "8",
              "--device", "cpu", "--work-dir", str(tmp_path / "work"), "--quiet"]
    _run(*common, "--budget-min", "0.15", "--out", str(tmp_path / "first.json"))
    first = json.loads((tmp_path / "first.json").read_text())
    for estimator in ("ensemble", "single"):
        assert set(first[estimator]) == {"test_md", "test_far", "all", "valid"}
        for key in METRICS:
            assert key in first[estimator]["all"]
    for case in ("molecule", "molecules", "box"):
        ratio = first["cost"][case]["ratio"]
        assert set(ratio) == {"one_model", "ensemble", "ensemble_batched", "ensemble_sequential", "single"}
        assert all(value > 0 for value in ratio.values())
    assert first["cost"]["box"]["n_atoms"] > 900
    assert first["cost_ratio_ensemble"] > 0 and first["cost_ratio_single"] > 0
    _run(*common, "--reuse", "--out", str(tmp_path / "again.json"))
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["meta"]["reused_models"] and again["meta"]["train_seconds"] == 0.0
    for estimator in ("ensemble", "single"):  # the same models on the same data: the same σ metrics
        assert again[estimator]["all"]["mean_force_sigma"] == pytest.approx(first[estimator]["all"]["mean_force_sigma"],
                                                                           rel=1e-5)
