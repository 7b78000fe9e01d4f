"""Trajectories (HDF5, extxyz, .traj) and thermo logs written by batched MD read back to the same numbers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from ase.build import bulk, molecule

from equiforce.sim.io import read_hdf5_system, read_system_frames
from equiforce.sim.md import run_md
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401


@pytest.fixture(scope="module")
def systems():
    cu = bulk("Cu", "fcc", a=3.6, cubic=True)
    cu.rattle(0.02, seed=0)
    return [molecule("H2O"), cu]


@pytest.mark.parametrize("suffix", [".h5", ".extxyz", ".traj"])
def test_trajectory_round_trip(tmp_path, systems, suffix):
    model = make_model("L1-corr3")
    path = tmp_path / f"md{suffix}"
    result = run_md(model, [a.copy() for a in systems], ensemble="nvt", steps=6, seed=0, trajectory=path,
                    trajectory_interval=3)
    final = result.atoms
    atol = 1e-7 if suffix == ".extxyz" else 1e-12  # extxyz is text with 8 decimals
    for b in range(2):
        frames = read_hdf5_system(path, b) if suffix == ".h5" else read_system_frames(path, b)
        assert len(frames) == 3  # steps 0, 3, 6
        np.testing.assert_allclose(frames[-1].positions, final[b].positions, atol=atol)
        np.testing.assert_array_equal(frames[-1].numbers, final[b].numbers)
        np.testing.assert_allclose(frames[-1].cell.array, final[b].cell.array, atol=atol)
        assert np.isfinite(frames[-1].get_potential_energy())
        assert frames[-1].get_forces().shape == (len(final[b]), 3)
        if suffix == ".h5":
            np.testing.assert_allclose(frames[-1].get_momenta(), final[b].get_momenta(), atol=1e-12)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_thermo_log(tmp_path, systems, suffix):
    model = make_model("L1-corr3")
    path = tmp_path / f"thermo{suffix}"
    with pytest.warns(UserWarning, match="not fully periodic"):  # the molecule runs at constant volume
        result = run_md(model, [a.copy() for a in systems], ensemble="npt", steps=4, seed=0, log=path,
                        log_interval=2)
    if suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6  # steps 0, 2, 4 × two systems
    assert [int(r["system"]) for r in rows] == [0, 1] * 3
    assert float(rows[-1]["etot"]) == pytest.approx(result.thermo[-1]["etot"])
    assert float(rows[0]["volume"]) == 0.0 and float(rows[1]["volume"]) > 0
    assert float(rows[-1]["temperature"]) > 0


def test_unknown_trajectory_suffix(tmp_path):
    with pytest.raises(ValueError, match="unknown trajectory format"):
        run_md(make_model("L1-corr3"), molecule("H2O"), steps=1, trajectory=tmp_path / "x.pdb")


@pytest.mark.parametrize("suffix", [".extxyz", ".h5"])
def test_trajectory_writers_are_context_managers(tmp_path, suffix):
    from equiforce.sim.io import open_trajectory

    with open_trajectory(tmp_path / f"t{suffix}") as writer:
        writer.sync()  # nothing written yet: still fine
    assert (tmp_path / f"t{suffix}").exists()
