"""Kill -9 at random points of a learning run, resume each time: no label lost, no finished call repeated.

Each session runs in a forked child.  Most are killed from the inside by the loop's fault hook
(``EQUIFORCE_LEARN_FAULT=POINT:N`` sends SIGKILL to the process — no cleanup runs, exactly as ``kill -9``)
at randomly drawn points: after the N-th oracle result, during the N-th training epoch, after training,
after exploring, after a selection was journaled.  One session is killed from the outside after a
random delay.  The oracle is EMT that durably logs every finished call with the structure's id.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from equiforce.active.config import parse_learn_config
from equiforce.active.journal import read_journal
from equiforce.active.loop import FAULT_ENV, learn
from equiforce.models.file import load_model
from tests.active_helpers import tiny_config


def _session(config: dict, resume: str | None, fault: str | None, env: dict[str, str] | None = None) -> None:
    torch.set_num_threads(1)
    os.environ.update(env or {})  # inherited by the oracle's spawned workers
    if fault:
        os.environ[FAULT_ENV] = fault
    else:
        os.environ.pop(FAULT_ENV, None)
    try:
        if resume:
            learn(resume=resume, progress=False)
        else:
            learn(parse_learn_config(config), progress=False)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def run_session(config: dict, resume: str | None, fault: str | None = None, kill_after: float | None = None,
                env: dict[str, str] | None = None) -> int:
    process = multiprocessing.get_context("fork").Process(target=_session, args=(config, resume, fault, env))
    process.start()
    process.join(timeout=kill_after)
    if kill_after is not None and process.is_alive():
        os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=300)
    assert process.exitcode is not None, "a session hung"
    return process.exitcode


def complete_bytes(path: Path) -> bytes:
    data = path.read_bytes() if path.exists() else b""
    return data[: data.rfind(b"\n") + 1]


def logged_calls(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("seed", [0])
def test_kill_at_random_points_loses_and_repeats_no_oracle_call(tmp_path, seed):
    rng = random.Random(seed)
    run, log = tmp_path / "run", tmp_path / "calls.jsonl"
    oracle = {"name": "custom", "calculator": "tests.active_helpers:CountingEMT", "kwargs": {"log": str(log)}}
    config = tiny_config(run, oracle=oracle, stop={"max_rounds": 4, "max_oracle_calls": 100},
                         training={"epochs": 4})
    faults = [f"label:{rng.randint(2, 6)}", f"train:{rng.randint(1, 4)}", "explore:1", f"label:{rng.randint(1, 3)}",
              "trained:1", "selected:1", f"train:{rng.randint(1, 4)}"]
    rng.shuffle(faults)
    kills = []  # (journal bytes at the kill, labelled ids at the kill, length of the call log at the kill)
    for k, fault in enumerate([*faults, None]):
        external = rng.uniform(0.5, 3.0) if fault is None else None
        code = run_session(config, str(run) if k else None, fault, kill_after=external)
        assert code in (0, -signal.SIGKILL), f"session {k} ({fault}) failed with exit code {code}"
        if code == -signal.SIGKILL:
            journal = complete_bytes(run / "journal.jsonl")
            labelled = {r["id"] for r in read_journal(run / "journal.jsonl") if r["type"] in ("label", "failure")}
            kills.append((journal, labelled, len(logged_calls(log))))
    assert run_session(config, str(run)) == 0  # and finish
    assert len(kills) >= 4, f"only {len(kills)} sessions were killed; the run is too short for this test"

    final = complete_bytes(run / "journal.jsonl")
    calls = logged_calls(log)
    for journal, labelled, n_calls in kills:
        assert final.startswith(journal), "the journal lost or rewrote records"
        repeated = labelled & set(calls[n_calls:])
        assert not repeated, f"finished oracle calls repeated after a resume: {sorted(repeated)}"

    records = read_journal(run / "journal.jsonl")
    outcomes = [r["id"] for r in records if r["type"] in ("label", "failure")]
    selected = [i["id"] for r in records if r["type"] == "selected" for i in r["items"]]
    assert len(outcomes) == len(set(outcomes)), "an oracle result was journaled twice"
    assert sorted(outcomes) == sorted(set(selected)), "a selected structure was left unlabelled"
    # calls beyond the journaled ones were in flight at a kill (at most one per kill: serial executor)
    assert len(calls) - len(outcomes) <= len(kills)
    assert set(outcomes) <= set(calls)
    assert any(r["type"] == "stopped" for r in records)
    assert [r["round"] for r in records if r["type"] == "trained"] == [1, 2, 3, 4]
    assert load_model(run / "model.eqf").elements == [29]


def _alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to see which workers still run")
def test_kill_9_with_the_process_pool_leaves_no_worker_and_repeats_no_call(tmp_path):
    """The default executor: ``kill -9`` while two workers label takes the workers down with the loop — the
    call r000-0002 hangs for a minute in its worker when the loop dies after the third result, and that worker
    must be gone within seconds — and the resumed run repeats no call whose result reached the journal."""
    import time

    run, log = tmp_path / "run", tmp_path / "calls.jsonl"
    oracle = {"name": "custom", "calculator": "tests.active_helpers:CountingEMT",
              "kwargs": {"log": str(log), "sleep": 0.3, "started_log": str(tmp_path / "started.jsonl")}}
    config = tiny_config(run, oracle=oracle, executor={"kind": "process", "workers": 2},
                         stop={"max_rounds": 1, "max_oracle_calls": 100})
    assert run_session(config, None, fault="label:3", env={"COUNTING_EMT_HANG_ID": "r000-0002"}) == -signal.SIGKILL
    workers = {c["pid"] for c in map(json.loads, (tmp_path / "started.jsonl").read_text().splitlines())}
    assert workers and os.getpid() not in workers
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived the killed loop"
    labelled = {r["id"] for r in read_journal(run / "journal.jsonl") if r["type"] in ("label", "failure")}
    n_calls = len(logged_calls(log))
    assert len(labelled) == 3 and "r000-0002" not in labelled
    assert run_session(config, str(run)) == 0
    assert not labelled & set(logged_calls(log)[n_calls:]), "a journaled call was repeated"
    outcomes = [r["id"] for r in read_journal(run / "journal.jsonl") if r["type"] in ("label", "failure")]
    assert len(outcomes) == len(set(outcomes)) and labelled <= set(outcomes)


def test_a_run_killed_after_its_budget_was_spent_resumes_to_the_same_end(tmp_path):
    """Killed in the last round's training, after the oracle budget was spent: the resumed run must replay the
    earlier rounds as they ran (they did not stop then), train the last one and stop there, as in one piece."""
    run = tmp_path / "run"
    config = tiny_config(run, stop={"max_rounds": 5, "max_oracle_calls": 16})
    assert run_session(config, None, fault="trained:3") == -signal.SIGKILL
    assert run_session(config, str(run)) == 0
    records = read_journal(run / "journal.jsonl")
    stopped = [r for r in records if r["type"] == "stopped"]
    assert [(r["round"], r["reason"]) for r in stopped] == [(3, "oracle budget spent (16 of 16 calls)")]
    assert [r["round"] for r in records if r["type"] == "trained"] == [1, 2, 3]
