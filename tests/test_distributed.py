"""Multi-process training through torchrun + DDP (gloo on CPU) trains exactly what one process trains.

Two ranks with batches of 2 see, at every step, the union of what one process sees with batches of 4 (same
shuffled order); with equal-size structures the averaged gradients are then the same, so the weights must
agree to rounding.  Only rank 0 writes the log and the model files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ase.io import write
from safetensors.torch import load_file

from equiforce.models.file import read_header
from equiforce.train.config import load_config
from equiforce.train.trainer import train
from tests.test_train import emt_frames

TORCHRUN = Path(sys.executable).parent / "torchrun"


def config(path: Path, data: Path, out: Path, batch_size: int, compiled: bool = False) -> Path:
    training = {"epochs": 3, "batch_size": batch_size, "lr": 0.01, "device": "cpu", "seed": 5,
                "scheduler": "cosine", "warmup_steps": 2}
    if compiled:  # the traced step under DDP (aot_eager: the trace and its gradients, without code generation)
        training.update(compile=True, compile_backend="aot_eager")
    path.write_text(yaml.safe_dump({
        "data": {"train": str(data), "valid_fraction": 0.2},
        "model": {"channels": 8, "radial_mlp": [16], "num_layers": 2, "max_l": 1, "sh_lmax": 2, "correlation": 2,
                  "cutoff": 4.0},
        "training": training,
        "output": {"directory": str(out)}}))
    return path


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="no torchrun")
# compiled: both ranks trace the step at once on the 2 cores (~55 s); the trace itself is tested in test_compiled
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_two_ranks_equal_one_process_with_the_union_batch(tmp_path, compiled):
    data = tmp_path / "train.xyz"
    write(data, emt_frames(20, seed=4), format="extxyz")  # 16 train / 4 valid, all 4-atom cells
    single = train(load_config(config(tmp_path / "one.yaml", data, tmp_path / "one", 4)), progress=False)

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "equiforce.cli", "train",
               str(config(tmp_path / "two.yaml", data, tmp_path / "two", 2, compiled)), "--no-progress"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # one writer
    assert all(r.get("compiled", False) == compiled for r in records)
    ones = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(records, ones):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-8)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-8)
        assert a["lr_end"] == pytest.approx(b["lr_end"], rel=1e-12)
    ours, theirs = load_file(tmp_path / "two" / "last.eqf"), load_file(tmp_path / "one" / "last.eqf")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-8, atol=1e-10)
    assert read_header(tmp_path / "two" / "best.eqf")["extra"]["training"]["epoch"] == single["best_epoch"]


@pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available(), reason="no torchrun")
def test_train_uq_under_torchrun_writes_one_model_and_prints_once(tmp_path):
    data = tmp_path / "train.xyz"
    write(data, emt_frames(30, seed=4), format="extxyz")  # 18 train / 12 valid (calibration needs 10)
    path = config(tmp_path / "uq.yaml", data, tmp_path / "uq", 2)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["valid_fraction"] = 0.4
    cfg["training"]["epochs"] = 1
    cfg["uq"] = {"method": "ensemble", "members": 2}
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "equiforce.cli", "train-uq", str(path),
               "--no-progress"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("model with calibrated uncertainty") == 1  # rank 0 alone reports
    assert read_header(tmp_path / "uq" / "uq.eqf")["extra"]["uq_method"] == "ensemble"
    assert not list((tmp_path / "uq").glob(".uq.eqf.*"))  # no temporary file of a second writer left behind


def test_ranks_come_from_torchrun_environment_without_a_process_group(monkeypatch):
    """A step that trains nothing (heads on a given backbone) joins no group; rank 1 must still know it is not 0."""
    from equiforce.train.distributed import joined

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = joined()
    assert ranks.rank == 1 and ranks.world == 2 and not ranks.main
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert joined().main and not joined().active
