"""Smoke runs of the simulation benchmarks (tiny settings; numbers are not checked, the plumbing is)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ase.build import molecule
from ase.io import write

import equiforce
from equiforce.models import ModelSpec, build_model

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, check=False, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_stability_benchmark_smoke(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(elements=[1, 6, 8], channels=4, max_l=1, correlation=2, num_layers=2, radial_mlp=[8],
                     cutoff=4.0, avg_num_neighbors=8.0)
    model_path = equiforce.save_model(build_model(spec), tmp_path / "m.eqf")
    frames = []
    for seed in range(6):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.02, seed=seed)
        frames.append(atoms)
    write(tmp_path / "ref.extxyz", frames)
    out = tmp_path / "stability.json"
    _run("stability.py", "--model", str(model_path), "--data", str(tmp_path / "ref.extxyz"), "--out", str(out),
         "--trajectories", "3", "--time-ps", "0.004", "--nve-ps", "0.002", "--temperature", "100",
         "--sample-fs", "1", "--check-every", "1", "--device", "cpu")
    result = json.loads(out.read_text())
    for key in ("trajectories", "stable", "mean_time_to_failure_ps", "nve_drift_mev_atom_ps", "hr_distance"):
        assert key in result
    assert result["trajectories"] == 3 and 0 <= result["stable"] <= 3
    assert 0 < result["mean_time_to_failure_ps"] <= 0.004
    assert result["bonds"] == 8


@pytest.mark.slow
def test_md_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    _run("md_speed.py", "--sizes", "32", "--molecules", "2", "--steps", "1", "--warmup", "0", "--no-mace",
         "--device", "cpu", "--cuda-graph", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["system"], r["mode"], r["n_systems"]) for r in rows) == [
        ("aspirin", "ase", 1), ("aspirin", "graph", 1), ("aspirin", "graph", 2), ("aspirin", "native", 1),
        ("aspirin", "native", 2), ("fcc-Cu", "graph", 1), ("fcc-Cu", "native", 1)]
    for row in rows:
        if row["mode"] == "graph":  # on a CPU the graphed loop runs eagerly, and says so
            assert row["cuda_graph"]["replays"] == 0 and row["cuda_graph"]["eager_steps"] >= 6
    for row in rows:
        assert row["engine"] == "equiforce" and row["atom_steps_per_s"] > 0 and row["peak_mem_mb_per_atom"] >= 0
