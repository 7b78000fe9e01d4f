"""``equiforce md`` and ``equiforce relax`` (the sub-commands of equiforce/sim/cli_md.py)."""

from __future__ import annotations

import csv
import json

import pytest
from ase.build import molecule
from ase.io import read, write

import equiforce
from equiforce.cli import main
from tests.conftest import make_model
from tests.sim_models import single_thread  # noqa: F401


def _main(argv: list[str]) -> int:
    return main(argv)  # the real entry point: the sub-commands must be registered there


def test_md_and_relax_commands(tmp_path):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", [molecule("H2O"), molecule("CH4")])
    out = tmp_path / "md"
    assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "4", "--every", "2", "--log-every", "2",
                  "--device", "cpu", "--out", str(out), "--no-progress", "--seed", "0",
                  "--edge-chunk", "5"]) == 0  # chunked messages: the same dynamics, a few edges at a time
    with open(out / "thermo.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 6
    assert len(read(out / "final.extxyz", index=":")) == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "trajectory.h5").stat().st_size > 0
    graphed = tmp_path / "md-graph"  # the step through the CUDA-graph runner (eager on a CPU): same trajectory
    assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "4", "--device", "cpu", "--out",
                  str(graphed), "--no-progress", "--seed", "0", "--cuda-graph"]) == 0
    graph_info = json.loads((graphed / "summary.json").read_text())["cuda_graph"]
    assert graph_info["eager_steps"] == 4 and graph_info["reason"].startswith("no CUDA device")  # and why
    for a, b in zip(read(out / "final.extxyz", index=":"), read(graphed / "final.extxyz", index=":")):
        assert abs(a.positions - b.positions).max() < 1e-9
    status = _main(["relax", str(model), str(tmp_path / "in.extxyz"), "--steps", "3", "--device", "cpu",
                    "--out", str(tmp_path / "relaxed.extxyz")])
    assert status in (0, 1)
    relaxed = read(tmp_path / "relaxed.extxyz", index=":")
    assert len(relaxed) == 2 and "converged" in relaxed[0].info


def test_md_command_names_the_broken_frame(tmp_path, capsys):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    path = tmp_path / "in.extxyz"
    write(path, [molecule("H2O"), molecule("CH4")])
    lines = path.read_text().splitlines()
    lines[5 + 2] = "C 0.0 0.0 oops"  # frame 1 (after H2O's 5 lines), its first atom
    path.write_text("\n".join(lines) + "\n")
    assert _main(["md", str(model), str(path), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "md"),
                  "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "in.extxyz" in message and "frame 1" in message and "cannot read structures" in message
    assert not (tmp_path / "md").exists()
    for missing in ("absent.extxyz", "m.eqf"):  # no such file, an unknown format: no frame to blame
        assert _main(["md", str(model), str(tmp_path / missing), "--steps", "1", "--device", "cpu",
                      "--out", str(tmp_path / "md"), "--no-progress"]) == 2
        message = capsys.readouterr().err
        assert missing in message and "frame" not in message


@pytest.mark.slow  # ~17 s of tracing; the compiled MD itself is tested in test_compiled.py
def test_md_command_compiled_reports_the_compilation(tmp_path, monkeypatch):
    """``--compile`` runs the traced graph (here uncompiled: Inductor's minute is tested elsewhere) and
    summary.json says so; the trajectory equals the eager one."""
    import torch

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # the traced graph, run as it is
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", [molecule("H2O"), molecule("CH4")])
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "4", "--device", "cpu", "--out",
                      str(tmp_path / name), "--no-progress", "--seed", "0", *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert runs["compiled"]["compile"]["compiled"] is True and "compile" not in runs["eager"]
    for a, b in zip(*(read(tmp_path / name / "final.extxyz", index=":") for name in runs)):
        assert abs(a.positions - b.positions).max() < 1e-9


def test_relax_writes_the_potential_energy_with_forces_and_the_enthalpy_apart(tmp_path, capsys):
    """Under pressure FIRE minimises E + pV; the file's energy must stay the potential energy (it is data), with
    the enthalpy beside it, and the forces and stress attached."""
    from ase.build import bulk

    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    cu = bulk("Cu", "fcc", a=3.7, cubic=True)
    cu.rattle(0.02, seed=0)
    write(tmp_path / "cu.extxyz", cu)
    out = tmp_path / "relaxed.extxyz"
    assert _main(["relax", str(model), str(tmp_path / "cu.extxyz"), "--cell", "--pressure", "100000", "--steps",
                  "5", "--device", "cpu", "--out", str(out)]) in (0, 1)
    relaxed = read(out)
    check = relaxed.copy()
    check.calc = equiforce.Calculator(tmp_path / "m.eqf")
    # (extxyz keeps positions to 1e-8 Å: the check's recomputation differs by that much)
    assert relaxed.get_potential_energy() == pytest.approx(check.get_potential_energy(), abs=1e-6)
    assert abs(relaxed.get_forces() - check.get_forces()).max() < 1e-6
    assert abs(relaxed.get_stress() - check.get_stress()).max() < 1e-6
    p_v = 100000 * 1e-4 / 160.21766208 * relaxed.get_volume()  # bar → eV/Å³, times V
    assert relaxed.info["enthalpy"] == pytest.approx(relaxed.get_potential_energy() + p_v, rel=1e-6)
    capsys.readouterr()
    for argv, message in ((["--pressure", "10"], "--pressure acts on the cell"),
                          (["--cell"], "--cell relaxes periodic cells")):
        write(tmp_path / "mol.extxyz", molecule("H2O"))
        out = str(tmp_path / "x.extxyz")
        assert _main(["relax", str(model), str(tmp_path / "mol.extxyz"), *argv, "--out", out]) == 2
        assert message in capsys.readouterr().err


def test_checkpoints_need_a_trajectory_that_can_be_cut_back(tmp_path, capsys):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", molecule("H2O"))
    assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "2", "--checkpoint-every", "2",
                  "--format", "traj", "--out", str(tmp_path / "md"), "--no-progress"]) == 2
    assert "cannot be cut back" in capsys.readouterr().err and not (tmp_path / "md").exists()


def test_md_final_structures_carry_their_energy_and_forces(tmp_path):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", [molecule("H2O"), molecule("CH4")])
    assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "3", "--device", "cpu", "--out",
                  str(tmp_path / "md"), "--no-progress", "--seed", "0"]) == 0
    for atoms in read(tmp_path / "md" / "final.extxyz", index=":"):
        check = atoms.copy()
        check.calc = equiforce.Calculator(tmp_path / "m.eqf")
        assert atoms.get_potential_energy() == pytest.approx(check.get_potential_energy(), abs=1e-6)
        assert abs(atoms.get_forces() - check.get_forces()).max() < 1e-6


def test_md_says_when_a_run_diverged(tmp_path, capsys):
    """A time step far too large breaks the integration: the conserved energy jumps, and the run says so (it
    ended quietly at tens of thousands of kelvin)."""
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", [molecule("H2O"), molecule("CH4")])
    for timestep, diverged in (("0.2", None), ("10", [0, 1])):
        out = tmp_path / f"md{timestep}"
        assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "40", "--timestep", timestep,
                      "--ensemble", "nve", "--device", "cpu", "--out", str(out), "--no-progress", "--seed", "0",
                      "--log-every", "10", "--every", "10"]) == 0
        assert json.loads((out / "summary.json").read_text()).get("diverged_systems") == diverged
        err = capsys.readouterr().err
        assert ("look diverged" in err and "lower --timestep" in err) == bool(diverged)


def test_md_refuses_options_its_ensemble_does_not_use(tmp_path, capsys):
    model = equiforce.save_model(make_model("L1-corr3"), tmp_path / "m.eqf")
    write(tmp_path / "in.extxyz", [molecule("H2O")])
    for options, message in ((["--pressure", "1000"], "--ensemble nvt does not use --pressure (for npt)"),
                             (["--ensemble", "nve", "--friction", "0.1"], "does not use --friction (for nvt"),
                             (["--ensemble", "nvt", "--tau", "50"], "does not use --tau (for nvt-csvr, npt)")):
        assert _main(["md", str(model), str(tmp_path / "in.extxyz"), "--steps", "1", "--device", "cpu",
                      "--out", str(tmp_path / "md"), "--no-progress", *options]) == 2
        assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "md").exists()
    from equiforce.errors import ConfigError
    from equiforce.sim.md import run_md

    for settings, message in ((dict(temperature_K=-300.0), "temperatures must be finite and ≥ 0 K"),
                              (dict(friction_per_fs=-0.05), "friction_per_fs must be ≥ 0")):
        with pytest.raises(ConfigError, match=message):
            run_md(equiforce.load_model(model), molecule("H2O"), steps=1, **settings)
