"""Long MD runs survive being killed: checkpoints, cut-back outputs and resumption (equiforce/sim/resumable.py)."""

from __future__ import annotations

import csv
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.io import read, write

import equiforce
from equiforce.cli import main
from equiforce.errors import ConfigError
from equiforce.sim.md import run_md
from equiforce.utils.locking import RunInUseError, exclusive_lock, release
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401

MOLECULES = [molecule("CH3CH2OH"), molecule("H2O")]


def _positions(result) -> np.ndarray:
    return result.state.positions.detach().numpy()


@pytest.mark.parametrize("ensemble,fmt", [("nvt", "h5"), ("nvt-csvr", "extxyz")])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, ensemble, fmt):
    """Killed after step 30 with its last checkpoint at step 20 (so the trajectory and log hold frames past the
    checkpoint), the resumed run cuts them back and ends exactly as one uninterrupted run does."""
    model = make_model("L1-corr3")
    common = dict(ensemble=ensemble, temperature_K=400.0, timestep_fs=0.5, seed=4, trajectory_interval=5,
                  log_interval=5)
    whole = run_md(model, MOLECULES, steps=40, trajectory=tmp_path / f"whole.{fmt}", log=tmp_path / "whole.csv",
                   **common)
    parts = dict(trajectory=tmp_path / f"parts.{fmt}", log=tmp_path / "parts.csv", checkpoint=tmp_path / "md.ckpt",
                 checkpoint_interval=10)
    run_md(model, MOLECULES, steps=20, **common, **parts)
    shutil.copy(tmp_path / "md.ckpt", tmp_path / "at20.ckpt")
    run_md(model, MOLECULES, steps=30, resume=True, **common, **parts)  # ... and killed before step 40
    shutil.copy(tmp_path / "at20.ckpt", tmp_path / "md.ckpt")  # the checkpoint of step 30 never made it
    resumed = run_md(model, MOLECULES, steps=40, resume=True, **common, **parts)
    assert resumed.info["resumed"] and resumed.steps == 20 and resumed.state.step == 40
    np.testing.assert_array_equal(_positions(resumed), _positions(whole))  # bit for bit: edges in canonical order
    assert (tmp_path / "parts.csv").read_text() == (tmp_path / "whole.csv").read_text()
    if fmt == "h5":
        with h5py.File(tmp_path / "whole.h5") as a, h5py.File(tmp_path / "parts.h5") as b:
            assert b["step"][:].tolist() == a["step"][:].tolist() == list(range(0, 41, 5))
            np.testing.assert_array_equal(b["positions"][:], a["positions"][:])
    else:
        a, b = read(tmp_path / "whole.extxyz", index=":"), read(tmp_path / "parts.extxyz", index=":")
        assert [f.info["step"] for f in b] == [f.info["step"] for f in a] and len(a) == 2 * 9


@pytest.mark.parametrize("fmt", ["h5", "extxyz"])
def test_finished_run_off_the_grid_extends_onto_it(tmp_path, fmt):
    """A run of 13 steps (records every 5, plus its last step) extended to 30 writes the frames and rows of one run
    of 30 steps: the off-grid record of step 13 is cut off and the grid stays at multiples of 5."""
    model = make_model("L1-corr3")

    def stop_first_from_step_14(state, outputs):  # checked every 4 steps of the run: at step 16, not 17
        return torch.tensor([state.step >= 14, False])

    common = dict(ensemble="nvt", temperature_K=400.0, timestep_fs=0.5, seed=4, trajectory_interval=5,
                  log_interval=5, stop_when=stop_first_from_step_14, stop_check_interval=4)
    whole = run_md(model, MOLECULES, steps=30, trajectory=tmp_path / f"whole.{fmt}", log=tmp_path / "whole.csv",
                   **common)
    assert whole.stopped_step.tolist() == [16, -1]
    parts = dict(trajectory=tmp_path / f"parts.{fmt}", log=tmp_path / "parts.csv", checkpoint=tmp_path / "md.ckpt",
                 checkpoint_interval=10)
    run_md(model, MOLECULES, steps=13, **common, **parts)
    with open(tmp_path / "parts.csv", newline="") as handle:
        assert sorted({int(r["step"]) for r in csv.DictReader(handle)}) == [0, 5, 10, 13]  # its last step kept
    run_md(model, MOLECULES, steps=13, resume=True, **common, **parts)  # rerun when finished: nothing to do
    extended = run_md(model, MOLECULES, steps=30, resume=True, **common, **parts)
    assert extended.stopped_step.tolist() == [16, -1]
    assert extended.state.step == 30
    np.testing.assert_array_equal(_positions(extended), _positions(whole))
    assert (tmp_path / "parts.csv").read_text() == (tmp_path / "whole.csv").read_text()
    if fmt == "h5":
        with h5py.File(tmp_path / "parts.h5") as b:
            assert b["step"][:].tolist() == list(range(0, 31, 5))
    else:
        assert [f.info["step"] for f in read(tmp_path / "parts.extxyz", index=":")][::2] == list(range(0, 31, 5))


def test_npt_resumes_with_its_cell_and_thermostat(tmp_path):
    model = make_model("L1-corr3")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    common = dict(ensemble="npt", temperature_K=300.0, timestep_fs=1.0, seed=2, pressure_bar=1000.0,
                  tau_p_fs=100.0, log_interval=5, trajectory_interval=5)
    whole = run_md(model, atoms, steps=20, **common)
    run_md(model, atoms, steps=10, checkpoint=tmp_path / "c", checkpoint_interval=10, **common)
    resumed = run_md(model, atoms, steps=20, checkpoint=tmp_path / "c", resume=True, **common)
    np.testing.assert_array_equal(resumed.state.cell.numpy(), whole.state.cell.numpy())
    np.testing.assert_array_equal(_positions(resumed), _positions(whole))


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model = make_model("L1-corr3")
    run_md(model, MOLECULES, steps=5, seed=0, checkpoint=tmp_path / "c", checkpoint_interval=5)
    with pytest.raises(ValueError, match=r"temperature_K \(\[300.0, 300.0\] there, \[500.0, 500.0\] now\)"):
        run_md(model, MOLECULES, temperature_K=500.0, steps=10, seed=0, checkpoint=tmp_path / "c", resume=True)
    with pytest.raises(ValueError, match="structures"):
        run_md(model, MOLECULES[:1], steps=10, seed=0, checkpoint=tmp_path / "c", resume=True)


def test_output_shorter_than_the_checkpoint_saw_is_refused(tmp_path):
    model = make_model("L1-corr3")
    kwargs = dict(steps=10, seed=0, checkpoint=tmp_path / "c", checkpoint_interval=5, log=tmp_path / "t.csv",
                  log_interval=5)
    run_md(model, MOLECULES, **kwargs)
    (tmp_path / "t.csv").write_text("step\n")
    with pytest.raises(ValueError, match="t.csv: has 5 bytes, the checkpoint saw"):
        run_md(model, MOLECULES, resume=True, **{**kwargs, "steps": 20})


def test_md_command_checkpoints_resumes_and_extends(tmp_path, capsys):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", MOLECULES)
    base = ["md", str(model), str(tmp_path / "in.extxyz"), "--device", "cpu", "--no-progress", "--seed", "3",
            "--every", "2", "--log-every", "2"]
    assert main([*base, "--steps", "12", "--out", str(tmp_path / "whole")]) == 0
    parts = ["--out", str(tmp_path / "parts"), "--checkpoint-every", "4"]
    assert main([*base, "--steps", "8", *parts]) == 0
    assert main([*base, "--steps", "12", *parts]) != 0  # never silently started again over a checkpointed run
    assert "pass --resume" in capsys.readouterr().err
    assert main([*base, "--steps", "12", *parts, "--resume"]) == 0  # a finished run, extended
    summary = json.loads((tmp_path / "parts" / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == 4 and summary["total_steps"] == 12
    for a, b in zip(read(tmp_path / "whole" / "final.extxyz", index=":"),
                    read(tmp_path / "parts" / "final.extxyz", index=":")):
        assert abs(a.positions - b.positions).max() < 1e-12
    with open(tmp_path / "parts" / "thermo.csv", newline="") as handle:
        assert [int(r["step"]) for r in csv.DictReader(handle)][::2] == list(range(0, 13, 2))
    changed = [*base[:-4], "--every", "4", "--log-every", "2", "--steps", "16", *parts, "--resume"]
    assert main(changed) == 2  # other output intervals: refused with one error line, not a traceback
    err = capsys.readouterr().err
    assert err.startswith("error:") and "belongs to another run" in err and "trajectory_interval" in err
    assert main([*base, "--steps", "4", "--out", str(tmp_path / "none"), "--resume"]) != 0
    assert "no checkpoint" in capsys.readouterr().err
    assert main([*base, "--steps", "16", *parts, "--resume", "--format", "traj"]) != 0
    assert ".traj file cannot be cut back" in capsys.readouterr().err


def test_a_frozen_system_holds_its_energies_and_heat_and_resumes_exactly(tmp_path):
    """A system frozen by the stop criterion keeps the forces, energies and thermostat heat of the state it is held
    at (its log rows stop changing), so a run resumed after the freeze writes what the uninterrupted run wrote."""
    model = make_model("L1-corr3")

    def stop_first_at_step_7(state, outputs):
        return torch.tensor([state.step >= 7, False])

    common = dict(ensemble="nvt", temperature_K=400.0, timestep_fs=0.5, seed=4, trajectory_interval=2,
                  log_interval=2, stop_when=stop_first_at_step_7)
    whole = run_md(model, MOLECULES, steps=20, log=tmp_path / "whole.csv", **common)
    with open(tmp_path / "whole.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["system"] == "0" and int(r["step"]) >= 8]
    assert len(rows) == 7 and all({r["epot"], r["conserved"]} == {rows[0]["epot"], rows[0]["conserved"]} for r in rows)
    parts = dict(log=tmp_path / "parts.csv", checkpoint=tmp_path / "md.ckpt", checkpoint_interval=10)
    run_md(model, MOLECULES, steps=10, **common, **parts)
    resumed = run_md(model, MOLECULES, steps=20, resume=True, **common, **parts)
    np.testing.assert_array_equal(_positions(resumed), _positions(whole))
    assert (tmp_path / "parts.csv").read_text() == (tmp_path / "whole.csv").read_text()


def test_resume_with_another_seed_or_log_interval_is_refused_and_a_held_run_too(tmp_path):
    model = make_model("L1-corr3")
    kwargs = dict(steps=10, seed=0, checkpoint=tmp_path / "c", checkpoint_interval=5, log=tmp_path / "t.csv",
                  log_interval=5)
    run_md(model, MOLECULES, **kwargs)
    with pytest.raises(ConfigError, match="log_interval"):
        run_md(model, MOLECULES, resume=True, **{**kwargs, "steps": 20, "log_interval": 2})
    with pytest.raises(ConfigError, match="seed"):
        run_md(model, MOLECULES, resume=True, **{**kwargs, "steps": 20, "seed": 1})
    lock = exclusive_lock(tmp_path / "c.lock", "a test")  # another process running this checkpoint's run
    try:
        with pytest.raises(RunInUseError, match="in use by another process"):
            run_md(model, MOLECULES, resume=True, **{**kwargs, "steps": 20})
    finally:
        release(lock)
    assert run_md(model, MOLECULES, resume=True, **{**kwargs, "steps": 20}).state.step == 20
