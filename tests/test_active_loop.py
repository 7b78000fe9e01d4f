"""`equiforce learn` end to end on EMT: rounds, report, a model with σ, failures skipped, resume is free."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import yaml

from equiforce.active.config import parse_learn_config
from equiforce.active.journal import read_journal
from equiforce.active.loop import RunState, learn, wall_time_reason
from equiforce.cli import main
from equiforce.data.graph import config_to_graph
from equiforce.data.stats import closest_pairs
from equiforce.models.file import load_model, read_header
from equiforce.models.spec import fade_from_closest
from equiforce.uq.base import UQModel
from tests.active_helpers import tiny_config
from tests.uq_helpers import single_thread  # noqa: F401 - one thread for tiny models


def calls_in(log) -> list[str]:
    return [json.loads(line)["id"] for line in log.read_text().splitlines()] if log.exists() else []


def test_learn_end_to_end_on_emt(tmp_path, capsys):
    log = tmp_path / "calls.jsonl"
    oracle = {"name": "custom", "calculator": "tests.active_helpers:CountingEMT", "kwargs": {"log": str(log)}}
    config = tiny_config(tmp_path / "run", oracle=oracle, executor={"kind": "process", "workers": 2},
                         model={"zbl": True})  # with the ZBL prior, short_range_fade: auto is on
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["learn", str(path), "--no-progress"]) == 0
    run = tmp_path / "run"
    for name in ("journal.jsonl", "config.yaml", "report.md", "summary.json", "model.eqf", "learning_curve.png",
                 "sigma_vs_error.png", "md_stability.png", "rounds/r001/model.eqf", "rounds/r002/train/best.eqf"):
        assert (run / name).is_file(), name
    records = read_journal(run / "journal.jsonl")
    labels = [r["id"] for r in records if r["type"] == "label"]
    selected = [i["id"] for r in records if r["type"] == "selected" for i in r["items"]]
    assert sorted(labels) == sorted(selected) == sorted(calls_in(log))  # each selected structure labelled once
    assert [r["round"] for r in records if r["type"] == "trained"] == [1, 2, 3]
    assert next(r for r in records if r["type"] == "stopped")["reason"].startswith("max_rounds")
    explored = [r for r in records if r["type"] == "explored"]
    assert explored and all(r["candidates"] > 0 for r in explored)
    model = load_model(run / "model.eqf")
    assert isinstance(model, UQModel) and model.elements == [29]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["oracle_calls"] == len(labels) and len(summary["rounds"]) == 3
    assert summary["rounds"][-1]["valid_f_mae"] > 0
    assert "| 3 |" in (run / "report.md").read_text()
    assert "oracle calls" in capsys.readouterr().out
    for r in (1, 2, 3):  # the early rounds calibrate on the few validation labels they have, and say so
        info = read_header(run / "rounds" / f"r{r:03d}" / "model.eqf")["extra"]["active_learning"]
        expected = info["n_valid"] if info["n_valid"] >= 3 else info["n_train"]
        assert info["calibrated_on"] == ("valid" if info["n_valid"] >= 3 else "train")
        assert info["calibration_structures"] == expected
    # short_range_fade follows the labels: each round fades Cu-Cu below the closest pair of the labels it saw
    state = RunState.replay(records)
    for r in (1, 2, 3):
        seen = state.labelled(r, "train") + state.labelled(r, "valid")
        closest = closest_pairs([config_to_graph(c, 3.0, torch.float64) for c in seen])
        fade = load_model(run / "rounds" / f"r{r:03d}" / "train" / "best.eqf").spec.short_range_fade
        assert fade["Cu-Cu"] == pytest.approx(fade_from_closest(closest)["Cu-Cu"])
    final = next(r for r in records if r["type"] == "final")  # too few validation structures: the last round
    assert final["round"] == 3 and "note" in final and summary["final_round"] == 3

    # a finished run resumed (or rerun with the same config) makes no oracle call and trains nothing
    n_calls = len(calls_in(log))
    assert main(["learn", "--resume", str(run), "--no-progress"]) == 0
    assert main(["learn", str(path), "--no-progress"]) == 0
    assert len(calls_in(log)) == n_calls
    assert len(read_journal(run / "journal.jsonl")) == len(records)
    # the report alone is rebuilt from the journal and the config the run kept
    (run / "report.md").unlink()
    assert main(["learn", "--report", str(run)]) == 0
    assert "oracle: custom" in (run / "report.md").read_text()
    assert main(["learn", str(path), "--report", str(run)]) == 2
    assert "takes no CONFIG" in capsys.readouterr().err
    # the same directory with another config is refused
    config["select"]["per_round"] = 5
    path.write_text(yaml.safe_dump(config))
    assert main(["learn", str(path), "--no-progress"]) == 2
    assert "select.per_round changed" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["select"]["per_round"] != 5  # a refused edit not kept
    # the kept config edited where the results depend on it: the resume is refused (the journal keeps the start's)
    kept_path = run / "config.yaml"
    original = kept_path.read_text()
    kept = yaml.safe_load(original)
    kept["select"]["per_round"], kept["training"]["lr"] = 5, 0.5
    kept_path.write_text(yaml.safe_dump(kept))
    assert main(["learn", "--resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "started with a different config" in err and "select.per_round" in err and "training.lr" in err
    # how it reports, stops and runs may change: a new executor alone leaves a stopped run stopped ...
    kept = yaml.safe_load(original)
    kept["executor"] = {"kind": "thread", "workers": 1}
    kept_path.write_text(yaml.safe_dump(kept))
    assert main(["learn", "--resume", str(run), "--no-progress"]) == 0
    assert len(calls_in(log)) == n_calls
    # ... one more round allowed continues it from round 3 (explore, label, train round 4), then it stops again
    kept["stop"]["max_rounds"] = 4
    kept_path.write_text(yaml.safe_dump(kept))
    assert main(["learn", "--resume", str(run), "--no-progress"]) == 0
    records = read_journal(run / "journal.jsonl")
    assert [r["round"] for r in records if r["type"] == "continued"] == [3]
    assert [r["round"] for r in records if r["type"] == "trained"] == [1, 2, 3, 4]
    assert [r["reason"][:10] for r in records if r["type"] == "stopped"] == ["max_rounds"] * 2
    assert len(calls_in(log)) > n_calls and len(set(calls_in(log))) == len(calls_in(log))  # no call repeated
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and len(summary["rounds"]) == 4 and summary["final_round"] is not None
    assert [r["round"] for r in records if r["type"] == "final"][-1] == summary["final_round"]


def test_oracle_failures_are_recorded_and_skipped(tmp_path):
    oracle = {"name": "custom", "calculator": "tests.active_helpers:FlakyEMT",
              "kwargs": {"fail_suffix": "3", "scf_suffix": "5"}}
    cfg = parse_learn_config(tiny_config(tmp_path / "run", oracle=oracle, stop={"max_rounds": 2}))
    summary = learn(cfg, progress=False)
    records = read_journal(tmp_path / "run" / "journal.jsonl")
    failures = {r["id"]: r["kind"] for r in records if r["type"] == "failure"}
    assert failures and all(i.endswith(("3", "5")) for i in failures)
    assert Counter(failures.values()).keys() <= {"exception", "scf"}
    assert summary["failures"] == dict(Counter(failures.values()))
    trained = [r for r in records if r["type"] == "trained"]
    labels = sum(r["type"] == "label" for r in records)
    assert len(trained) == 2 and trained[-1]["n_train"] + trained[-1]["n_valid"] == labels  # failures skipped
    assert summary["finished"]


def emt_copper_file(path, seed: int = 100) -> None:
    """Ten rattled Cu cells labelled by EMT: existing training data (``start.data``), no oracle call."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from equiforce.data.io import write_extxyz
    from equiforce.data.structure import Configuration

    configs = []
    for k in range(10):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.08, seed=seed + k)
        atoms.calc = EMT()
        configs.append(Configuration.from_atoms(atoms.copy(), energy=atoms.get_potential_energy(),
                                                forces=atoms.get_forces()))
    write_extxyz(configs, path)


def test_an_oracle_that_always_fails_ends_with_a_clear_error(tmp_path, capsys):
    oracle = {"name": "custom", "calculator": "tests.active_helpers:FlakyEMT", "kwargs": {"fail_all": True}}
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run", oracle=oracle)))
    assert main(["learn", str(path), "--no-progress"]) == 2
    assert "the oracle failed on all 8 structures it was given" in capsys.readouterr().err
    assert len(read_journal(tmp_path / "run" / "journal.jsonl")) == 1 + 1 + 8  # the config, the selection, 8 failures
    # the oracle fixed in the run's config (allowed before the first label): the failed calls are made again
    kept_path = tmp_path / "run" / "config.yaml"
    kept = yaml.safe_load(kept_path.read_text())
    kept["oracle"] = {"name": "emt", "timeout": 30}
    kept["stop"]["max_rounds"] = 1
    kept_path.write_text(yaml.safe_dump(kept))
    assert main(["learn", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    records = read_journal(tmp_path / "run" / "journal.jsonl")
    failed = {r["id"] for r in records if r["type"] == "failure"}
    assert len(failed) == 8 and failed <= {r["id"] for r in records if r["type"] == "label"}
    assert [r["retry_failures"] for r in records if r["type"] == "config"] == [False, True]
    # once labels exist the oracle stays (the labels of two oracles would mix)
    kept["oracle"] = {"name": "custom", "calculator": "tests.active_helpers:FlakyEMT", "kwargs": {"fail_all": True}}
    kept_path.write_text(yaml.safe_dump(kept))
    assert main(["learn", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "oracle.calculator" in capsys.readouterr().err


def test_a_missing_input_file_is_a_data_error_and_leaves_no_lock(tmp_path):
    from equiforce.errors import DataError

    config = parse_learn_config(tiny_config(tmp_path / "run", start={"data": [str(tmp_path / "none.xyz")]}))
    for _ in range(2):  # the second attempt is not refused as "in use": the first let go of the journal's lock
        with pytest.raises(DataError, match="none.xyz"):
            learn(config, progress=False)


def test_broken_starting_structures_are_named_before_any_oracle_call(tmp_path):
    from ase.build import bulk
    from ase.io import write

    from equiforce.errors import DataError

    broken = bulk("Cu", cubic=True)
    broken.positions[2] = float("nan")
    write(tmp_path / "start.extxyz", [bulk("Cu", cubic=True), broken])
    (tmp_path / "empty.extxyz").write_text("")
    for name, match in (("start.extxyz", "frame 1, field 'positions'"), ("empty.extxyz", "empty.extxyz")):
        config = tiny_config(tmp_path / f"run_{name}", start={"structures": [str(tmp_path / name)]})
        with pytest.raises(DataError, match=match):
            learn(parse_learn_config(config), progress=False)
        assert not any(r["type"] == "label" for r in read_journal(tmp_path / f"run_{name}" / "journal.jsonl"))


def test_an_input_file_changed_between_sessions_is_refused(tmp_path, capsys):
    emt_copper_file(tmp_path / "old.xyz")
    config = tiny_config(tmp_path / "run", start={"data": [str(tmp_path / "old.xyz")]}, stop={"max_rounds": 1})
    summary = learn(parse_learn_config(config), progress=False)
    assert summary["finished"]
    emt_copper_file(tmp_path / "old.xyz", seed=5)  # other frames under the same name
    assert main(["learn", "--resume", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "old.xyz is not the one the run started with" in capsys.readouterr().err


def test_an_oracle_that_fails_after_the_start_is_not_paid_to_fail_until_the_budget_ends(tmp_path, capsys):
    """With training data of its own the loop could go on without one label: every call of a batch failing is
    a broken oracle, said at once, not a run that spends its budget on failures and reports success."""
    emt_copper_file(tmp_path / "old.xyz")
    oracle = {"name": "custom", "calculator": "tests.active_helpers:FlakyEMT", "kwargs": {"fail_all": True}}
    path = tmp_path / "learn.yaml"
    config = tiny_config(tmp_path / "run", oracle=oracle, start={"data": [str(tmp_path / "old.xyz")]},
                         stop={"max_rounds": 4})
    path.write_text(yaml.safe_dump(config))
    assert main(["learn", str(path), "--no-progress"]) == 2
    assert "the oracle failed on all" in capsys.readouterr().err
    records = read_journal(tmp_path / "run" / "journal.jsonl")
    assert not any(r["type"] == "trained" for r in records)  # stopped at the first batch, before any training


def test_existing_data_joins_the_training_set_without_oracle_calls(tmp_path):
    emt_copper_file(tmp_path / "old.xyz")
    cfg = parse_learn_config(tiny_config(tmp_path / "run", start={"data": [str(tmp_path / "old.xyz")]},
                                         stop={"max_rounds": 1}))
    summary = learn(cfg, progress=False)
    trained = next(r for r in read_journal(tmp_path / "run" / "journal.jsonl") if r["type"] == "trained")
    assert summary["oracle_calls"] == 8 and trained["n_train"] + trained["n_valid"] == 18


@pytest.mark.parametrize(("stop", "explore", "reason"), [
    ({"stable_md_ps": 0.004, "stable_md_temperature": 300}, {"sigma_stop": 1e6}, "MD stable for 0.004 ps"),
    ({"target_sigma": 1e6}, {}, "explored σ"),
    ({"target_forces_mae": 1e6}, {}, "validation force MAE")])
def test_stop_criteria(tmp_path, stop, explore, reason):
    cfg = parse_learn_config(tiny_config(tmp_path / "run", stop=stop, explore=explore))
    summary = learn(cfg, progress=False)
    assert summary["stopped"].startswith(reason) and len(summary["rounds"]) == 1
    if "stable_md_ps" in stop:
        assert summary["stability"][0]["all_stable"] and summary["stability"][0]["steps"] == 8


def test_budget_of_oracle_calls_is_never_exceeded(tmp_path):
    cfg = parse_learn_config(tiny_config(tmp_path / "run", stop={"max_oracle_calls": 11, "max_rounds": 10}))
    summary = learn(cfg, progress=False)
    assert summary["oracle_calls"] == 11
    assert "oracle budget" in summary["stopped"]


@pytest.mark.parametrize("method", ["ensemble"])
def test_ensemble_rounds_warm_start_each_member(tmp_path, method):
    cfg = parse_learn_config(tiny_config(tmp_path / "run", uq={"method": method, "members": 2},
                                         stop={"max_rounds": 2}))
    learn(cfg, progress=False)
    model = load_model(tmp_path / "run" / "model.eqf")
    assert type(model).__name__ == "EnsemblePotential" and model.n_members == 2
    assert (tmp_path / "run" / "rounds" / "r002" / "m1" / "best.eqf").is_file()


@pytest.mark.parametrize("choice", ["best_valid", "last"])
def test_final_model_is_the_round_with_the_lowest_error_on_the_final_validation_set(tmp_path, choice):
    run = tmp_path / "run"
    cfg = parse_learn_config(tiny_config(run, select={"per_round": 4, "valid_fraction": 0.5}, final_model=choice))
    summary = learn(cfg, progress=False)
    final = next(r for r in read_journal(run / "journal.jsonl") if r["type"] == "final")
    assert final["n_valid"] >= 5 and summary["final_round"] == final["round"]
    if choice == "last":
        assert final["round"] == 3 and "valid_scores" not in final
    else:
        scores = {int(k): v for k, v in final["valid_scores"].items()}
        assert sorted(scores) == [1, 2, 3]
        assert final["round"] == max(r for r, v in scores.items() if v == min(scores.values()))
        assert f"Final model (round {final['round']}" in (run / "report.md").read_text()
    assert (run / "model.eqf").read_bytes() == (run / f"rounds/r{final['round']:03d}/model.eqf").read_bytes()
    # the choice is journaled once: resuming the finished run keeps it and adds nothing
    n_records = len(read_journal(run / "journal.jsonl"))
    learn(None, resume=run, progress=False)
    assert len(read_journal(run / "journal.jsonl")) == n_records


def test_wall_time_stops_before_a_round_that_would_run_past_it():
    assert wall_time_reason(100.0, None, 90.0).startswith("wall time 90 s spent")
    assert wall_time_reason(60.0, None, 90.0) is None  # the first round: no estimate of the next
    assert wall_time_reason(60.0, 40.0, 90.0) is None  # 60 + 20 ≤ 90
    assert "another round (~20 s)" in wall_time_reason(75.0, 55.0, 90.0)


def test_wall_time_ends_the_loop_within_its_budget(tmp_path):
    budget = 6.0
    cfg = parse_learn_config(tiny_config(tmp_path / "run", stop={"wall_time": budget, "max_rounds": 50}))
    summary = learn(cfg, progress=False)
    assert summary["stopped"].startswith("wall time")
    ends = [r["elapsed"] for r in read_journal(tmp_path / "run" / "journal.jsonl") if r["type"] == "evaluated"]
    for k in range(1, len(ends) - 1):  # every round that went on expected the next one to fit
        assert ends[k] + (ends[k] - ends[k - 1]) <= budget
    if len(ends) > 1:  # the last one did not (or the budget was spent)
        assert ends[-1] + (ends[-1] - ends[-2]) > budget
