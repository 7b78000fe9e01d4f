"""Oracle calls: labels come back as data; exceptions, unconverged SCF and timeouts are failures, not crashes."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT

from equiforce.active.journal import atoms_to_json
from equiforce.active.oracle import SerialExecutor, compute, import_object, label

EMT_SPEC = {"calculator": "ase.calculators.emt:EMT", "kwargs": {}, "timeout": 30, "stress": True}


def flaky(**kwargs):
    return {"calculator": "tests.active_helpers:FlakyEMT", "kwargs": kwargs, "timeout": 30, "stress": True}


def item(ident: str, atoms=None) -> dict:
    """A distinct structure per id (a calculator would return cached results for an identical one)."""
    if atoms is None:
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=sum(map(ord, ident)))
    return {"id": ident, "atoms": atoms_to_json(atoms)}


def test_label_matches_the_calculator_with_stress_for_periodic_cells():
    atoms = bulk("Cu", cubic=True)
    atoms.rattle(0.05, seed=1)
    record = compute(EMT_SPEC, item("a", atoms))
    assert record["type"] == "label" and record["id"] == "a"
    atoms.calc = EMT()
    assert record["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(record["forces"], atoms.get_forces(), atol=1e-12)
    np.testing.assert_allclose(record["stress"], atoms.get_stress(voigt=False), atol=1e-12)


def test_failures_are_classified_and_returned():
    failed = compute(flaky(), item("r001-0001"))
    assert failed["type"] == "failure" and failed["kind"] == "exception" and "deliberate" in failed["error"]
    scf = compute(flaky(), item("r001-0002"))
    assert scf["kind"] == "scf"
    assert compute(flaky(), item("r001-0003"))["type"] == "label"


def test_nan_answers_and_other_errors_are_not_called_scf():
    """Only an oracle that says it did not converge is 'scf'; NaN in an answer is 'nonfinite'."""
    spec = {"calculator": "tests.active_helpers:NaNEMT", "kwargs": {}, "timeout": 30, "stress": False}
    assert compute(spec, item("r001-0000"))["kind"] == "nonfinite"
    assert compute(spec, item("r001-0001"))["kind"] == "exception"


def test_timeout_in_the_worker_is_a_failure():
    record = compute({**flaky(slow_suffix="9", sleep=5.0), "timeout": 0.3}, item("r001-0009"))
    assert record["type"] == "failure" and record["kind"] == "timeout"
    assert record["seconds"] < 3.0


def test_label_hands_over_every_result_once_and_goes_on_after_failures():
    results = []
    items = [item(f"r001-000{k}") for k in range(6)]
    label(items, flaky(), SerialExecutor(), results.append)
    assert sorted(r["id"] for r in results) == [i["id"] for i in items]
    kinds = {r["id"]: r.get("kind", "ok") for r in results}
    assert kinds["r001-0001"] == "exception" and kinds["r001-0002"] == "scf" and kinds["r001-0000"] == "ok"


def test_a_call_that_never_returns_is_given_up_on():
    """Threads cannot take SIGALRM: the loop's own deadline records the timeout and moves on."""
    results = []
    spec = {**flaky(slow_suffix="7", sleep=1.5), "timeout": 0.1}
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        label([item("r001-0007"), item("r001-0000")], spec, pool, results.append, poll=0.05, grace=0.2)
    by_id = {r["id"]: r for r in results}
    assert by_id["r001-0007"]["kind"] == "timeout" and by_id["r001-0000"]["type"] == "label"


def test_import_paths():
    assert import_object("ase.calculators.emt:EMT") is EMT
    assert import_object("ase.calculators.emt.EMT") is EMT


def test_xtb_oracle_on_a_molecule():
    pytest.importorskip("tblite")
    record = compute({"calculator": "tblite.ase:TBLite", "kwargs": {"method": "GFN2-xTB", "verbosity": 0},
                      "timeout": 60, "stress": True}, item("x", molecule("H2O")))
    assert record["type"] == "label" and "stress" not in record
    assert record["energy"] < -100 and np.asarray(record["forces"]).shape == (3, 3)


def test_pyscf_oracle_labels_a_molecule_and_reports_an_unconverged_scf():
    pytest.importorskip("pyscf")
    from ase.units import Bohr, Hartree

    spec = {"calculator": "equiforce.active.pyscf_calc:PySCFCalculator",
            "kwargs": {"xc": "PBE", "basis": "sto-3g", "density_fit": False, "grids_level": 1}, "timeout": 120,
            "stress": True}
    water = molecule("H2O")
    record = compute(spec, item("w", water))
    assert record["type"] == "label"
    assert -76.0 * Hartree < record["energy"] < -74.0 * Hartree
    forces = np.asarray(record["forces"])
    assert forces.shape == (3, 3) and np.abs(forces.sum(0)).max() < 1e-3 * Hartree / Bohr  # no net force
    failed = compute({**spec, "kwargs": {**spec["kwargs"], "max_cycle": 1}}, item("w2", water))
    assert failed["type"] == "failure" and failed["kind"] == "scf"


def crashing(**kwargs):
    return {"calculator": "tests.active_helpers:CrashingEMT", "kwargs": kwargs, "timeout": 30, "stress": True}


@pytest.mark.parametrize("once", [False, True])
def test_a_dying_worker_costs_only_its_own_call(tmp_path, once):
    """A worker killed mid-call breaks the whole process pool: the other calls go to a fresh pool; the call
    that kills its worker each time is the only failure (and succeeds when it crashed just once)."""
    from equiforce.active.oracle import RestartablePool

    items = [item(f"r001-000{k}") for k in range(7)]
    spec = crashing(once_marker=str(tmp_path / "crashed") if once else "")
    results = []
    pool = RestartablePool(2, 1)
    try:
        label(items, spec, pool, results.append, poll=0.05)
    finally:
        pool.shutdown()
    by_id = {r["id"]: r for r in results}
    assert sorted(by_id) == [i["id"] for i in items] and len(results) == len(items)
    others = [r for i, r in by_id.items() if not i.endswith("5")]
    assert all(r["type"] == "label" for r in others)
    if once:
        assert by_id["r001-0005"]["type"] == "label"
    else:
        assert by_id["r001-0005"]["type"] == "failure" and by_id["r001-0005"]["kind"] == "worker"


@pytest.mark.parametrize("kind, extra", [("thread", {"workers": 2}),
                                         ("custom", {"factory": "concurrent.futures:ThreadPoolExecutor",
                                                     "factory_kwargs": {"max_workers": 2}}),
                                         ("custom", {"factory": "tests.active_helpers:managed_threads"})])
def test_thread_and_custom_executors_label_everything(kind, extra):
    from equiforce.active.config import ExecutorConfig
    from equiforce.active.oracle import open_executor
    from tests.active_helpers import EXECUTOR_EVENTS

    EXECUTOR_EVENTS.clear()
    results = []
    items = [item(f"r001-000{k}") for k in (0, 3, 4, 5)]
    with open_executor(ExecutorConfig(kind=kind, **extra)) as executor:
        assert hasattr(executor, "submit")
        label(items, flaky(), executor, results.append, poll=0.05)
    assert sorted(r["id"] for r in results) == [i["id"] for i in items]
    assert all(r["type"] == "label" for r in results)
    if extra.get("factory", "").endswith("managed_threads"):
        assert EXECUTOR_EVENTS == ["enter", "exit"]  # the factory's context closed what it started


def test_a_factory_returning_no_executor_is_refused_by_name():
    from equiforce.active.config import ExecutorConfig
    from equiforce.active.oracle import open_executor
    from equiforce.errors import ConfigError

    with pytest.raises(ConfigError, match="not_an_executor.*neither an Executor nor a context manager"):
        with open_executor(ExecutorConfig(kind="custom", factory="tests.active_helpers:not_an_executor")):
            pass


def test_a_result_of_the_wrong_shape_is_a_failure_not_a_label():
    """Journaled as a label, forces for 3 of 4 atoms would break every training after it, and every resume."""
    spec = {"calculator": "tests.active_helpers:ShortForcesEMT", "kwargs": {}, "timeout": 30, "stress": False}
    record = compute(spec, item("r001-0004"))
    assert record["type"] == "failure" and record["kind"] == "result"
    assert "forces of shape (3, 3) for 4 atoms" in record["error"]


def test_a_process_pool_runs_every_call_it_holds_so_no_timeout_clock_runs_in_a_queue():
    from equiforce.active.oracle import RestartablePool

    pool = RestartablePool(workers=2, threads_per_worker=1)
    try:
        assert pool.in_flight_limit == 2
    finally:
        pool.shutdown()
