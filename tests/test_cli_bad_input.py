"""Bad input to the command line: one `error:` line naming the file, frame and field, exit status 2, before any
work is done, and nothing of an earlier run left to be mistaken for this one's (found by a sweep of every command)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.io import write

import equiforce
from equiforce.cli import main
from tests.conftest import make_model


@pytest.fixture
def files(tmp_path):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    good = [molecule("H2O"), molecule("CH4")]
    for a in good:  # labelled, so eval has something to rate
        a.calc = EMT()
        a.get_forces()
    write(tmp_path / "good.extxyz", good)
    return model, tmp_path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err, err
    return err


def test_outputs_that_cannot_be_written_are_said_before_any_work(files, capsys):
    model, tmp = files
    (tmp / "afile").write_text("x")
    assert main(["eval", str(model), str(tmp / "good.extxyz"), "--out", str(tmp / "afile")]) == 2
    assert "--out" in (err := _error(capsys)) and "afile is a file, not a directory" in err
    assert main(["md", str(model), str(tmp / "good.extxyz"), "--out", str(tmp / "afile" / "md")]) == 2
    assert "--out" in (err := _error(capsys)) and "afile is a file, not a directory" in err
    config = tmp / "to_a_file.yaml"
    config.write_text(f"data: {{train: {tmp / 'good.extxyz'}}}\noutput: {{directory: {tmp / 'afile'}}}\n")
    assert main(["train", str(config)]) == 2
    assert "output.directory" in (err := _error(capsys)) and "afile is a file, not a directory" in err
    for out in ("r.unknownext", str(tmp)):
        assert main(["relax", str(model), str(tmp / "good.extxyz"), "--out", out, "--device", "cpu"]) == 2
        assert "--out" in _error(capsys)


def test_malformed_index_and_device_are_errors(files, capsys):
    model, tmp = files
    assert main(["eval", str(model), str(tmp / "good.extxyz"), "--index", "abc"]) == 2
    assert "neither a frame number nor a slice" in _error(capsys)
    assert main(["eval", str(model), str(tmp / "good.extxyz"), "--device", "gpu"]) == 2
    assert "'gpu'" in _error(capsys)
    with pytest.raises(SystemExit) as exit_:
        main(["md", str(model), str(tmp / "good.extxyz"), "--pressure", "nan"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("case", ["zero_cell", "nan_positions", "duplicate_atoms", "unknown_element"])
def test_md_and_relax_name_the_broken_frame(files, capsys, case):
    model, tmp = files
    bad = molecule("H2O")
    if case == "zero_cell":
        bad.cell, bad.pbc = [[5, 0, 0], [0, 0, 0], [0, 0, 5]], True
    elif case == "nan_positions":
        bad.positions[1] = np.nan
    elif case == "duplicate_atoms":
        bad = bad + Atoms("H", positions=[bad.positions[0]])
    else:
        bad = Atoms("Al", positions=[[0.0, 0.0, 0.0]])
    write(tmp / "bad.extxyz", [molecule("CH4"), bad])
    field = {"zero_cell": "cell", "nan_positions": "positions", "duplicate_atoms": "positions",
             "unknown_element": "numbers"}[case]
    for command in (["md", "--steps", "2", "--out", str(tmp / "md")], ["relax", "--out", str(tmp / "r.extxyz")]):
        assert main([command[0], str(model), str(tmp / "bad.extxyz"), "--device", "cpu", *command[1:]]) == 2
        err = _error(capsys)
        assert "bad.extxyz" in err and "frame 1" in err and f"'{field}'" in err, err


def test_a_failed_md_run_leaves_no_end_state_of_the_previous_one(files, capsys):
    model, tmp = files
    out = tmp / "md"
    assert main(["md", str(model), str(tmp / "good.extxyz"), "--steps", "2", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    assert (out / "final.extxyz").exists() and (out / "summary.json").exists()
    assert main(["md", str(model), str(tmp / "good.extxyz"), "--steps", "2", "--device", "cpu", "--out", str(out),
                 "--no-progress", "--ensemble", "npt"]) == 2  # an earlier run is not replaced unless asked
    assert "holds an earlier run (summary.json, thermo.csv, final.extxyz, trajectory.h5): pass --overwrite" in (
        " ".join(_error(capsys).split()))
    assert main(["md", str(model), str(tmp / "good.extxyz"), "--steps", "2", "--device", "cpu", "--out", str(out),
                 "--no-progress", "--ensemble", "npt", "--overwrite"]) == 2  # molecules only: refused at the start
    _error(capsys)
    assert not (out / "final.extxyz").exists() and not (out / "summary.json").exists()
    assert not (out / "trajectory.h5").exists()


def test_model_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")  # safetensors replaces the file
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_eval_metrics_are_strict_json_for_one_structure(files):
    model, tmp = files
    assert main(["eval", str(model), str(tmp / "good.extxyz"), "--index", "0", "--out", str(tmp / "ev")]) == 0

    def refuse(token):
        raise ValueError(token)

    json.loads((tmp / "ev" / "metrics.json").read_text(), parse_constant=refuse)


def test_equiforce_warnings_print_as_one_line():
    """Our warnings say what to do; Python's source line after them is noise (other libraries' keep it)."""
    import equiforce.cli as cli

    ours = Path(cli.__file__).parent / "train" / "trainer.py"
    assert cli._format_warning("E0s of elements [1, 6] are\n  not determined", UserWarning, str(ours), 643) == (
        "warning: E0s of elements [1, 6] are not determined\n")
    theirs = cli._format_warning("deprecated", DeprecationWarning, "/usr/lib/python3/somewhere.py", 7)
    assert "somewhere.py:7" in theirs
