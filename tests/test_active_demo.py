"""The ethanol demo (active learning with GFN2-xTB): plumbing on a tiny budget here, the real job as slow."""

from __future__ import annotations

import json

import pytest

from equiforce.active.journal import read_journal
from equiforce.demo.main import DEFAULT_DEMO, run_demo
from equiforce.models.file import load_model
from tests.uq_helpers import single_thread  # noqa: F401 - one thread for tiny models

pytest.importorskip("tblite")

FILES = ("model.eqf", "summary.md", "summary.json", "report.md", "learning_curve.png", "sigma_vs_error.png",
         "md_stability.png", "parity.png", "md/trajectory.xyz", "learn/journal.jsonl", "learn/config.yaml")


def test_ethanol_demo_plumbing(tmp_path, capsys):
    assert DEFAULT_DEMO == "ethanol"
    out = tmp_path / "demo"
    summary = run_demo(out, minutes=0.01, md_ps=0.02, md_replicas=2, test_frames=2, progress=False,
                       round_seconds=1.0, first_round_seconds=2.0, executor={"kind": "serial"},
                       md_compile="aot_eager")  # the compiled MD path, without Inductor's minute of compilation
    for name in FILES:
        assert (out / name).is_file(), name
    assert summary["rounds"] == 1 and summary["oracle_calls"] == 24 and summary["n_test"] == 6
    boot = next(r for r in read_journal(out / "learn" / "journal.jsonl") if r["type"] == "selected")["items"]
    assert [i["source"] for i in boot] == ["start"] + ["rattle"] * 11 + ["torsion"] * 12  # other conformers too
    assert "wall time" in summary["stopped"]
    assert summary["md"]["steps"] == 40 and summary["md"]["criterion"].startswith("bond length")
    assert summary["md"]["compiled"] and "compiled (compilation" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["system"] == "ethanol"
    assert sorted(load_model(out / "model.eqf").elements) == [1, 6, 8]
    assert "active learning of ethanol" in capsys.readouterr().out


@pytest.mark.slow
def test_ethanol_demo_full_job(tmp_path):
    """`make demo`: ~15 min on 2 cores; the final model survives 10 ps at 500 K."""
    summary = run_demo(tmp_path / "demo")
    assert summary["md"]["all_stable"], summary["md"]
    assert summary["test"]["forces_mae"] < 150.0
    assert summary["oracle_calls"] <= 500
