"""Oracles and configs for the active-learning tests: EMT that counts its calls, EMT that fails on purpose."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT


def _append(path: str, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class CountingEMT(EMT):
    """EMT that appends ``{"id", "pid"}`` to ``log`` after every finished calculation (durably)."""

    def __init__(self, log: str, sleep: float = 0.0, started_log: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log, self.sleep, self.started_log = log, sleep, started_log

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if self.started_log:  # which processes began a call (finished or not)
            _append(self.started_log, {"id": atoms.info.get("equiforce_id"), "pid": os.getpid()})
        super().calculate(atoms, properties, system_changes)
        time.sleep(self.sleep)  # a slow oracle: calls are still in flight when the loop is killed
        if atoms.info.get("equiforce_id") == os.environ.get("COUNTING_EMT_HANG_ID"):
            time.sleep(60)  # one call that would outlive a killed loop by far if its worker were orphaned
        _append(self.log, {"id": atoms.info.get("equiforce_id"), "pid": os.getpid()})


class FlakyEMT(EMT):
    """EMT that raises on ids ending in ``fail_suffix``, reports an unconverged SCF on ``scf_suffix`` and
    sleeps ``sleep`` s on ``slow_suffix``."""

    def __init__(self, fail_suffix: str = "1", scf_suffix: str = "2", slow_suffix: str = "", sleep: float = 0.0,
                 fail_all: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_all = fail_all
        self.fail_suffix, self.scf_suffix, self.slow_suffix, self.sleep = fail_suffix, scf_suffix, slow_suffix, sleep

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        ident = str(atoms.info.get("equiforce_id", ""))
        if self.fail_all or (self.fail_suffix and ident.endswith(self.fail_suffix)):
            raise RuntimeError(f"deliberate failure on {ident}")
        if self.scf_suffix and ident.endswith(self.scf_suffix):
            raise RuntimeError("SCF did not converge in 250 iterations")
        if self.slow_suffix and ident.endswith(self.slow_suffix):
            time.sleep(self.sleep)
        super().calculate(atoms, properties, system_changes)


class NaNEMT(EMT):
    """An oracle that answers NaN forces without saying why; its other failure only mentions an SCF."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        if str(atoms.info.get("equiforce_id", "")).endswith("1"):
            raise RuntimeError("bad SCF guess file")
        super().calculate(atoms, properties, system_changes)
        self.results["forces"] = self.results["forces"] * float("nan")


class ShortForcesEMT(EMT):
    """A broken wrapper: EMT whose forces lose their last row."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["forces"] = self.results["forces"][:-1]


def tiny_config(directory: Path, oracle: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A learning run on a 4-atom Cu cell that finishes in seconds."""
    config: dict[str, Any] = {
        "start": {"structures": ["bulk:Cu"], "rattle": 7, "rattle_amplitude": 0.05},
        "oracle": oracle or {"name": "emt", "timeout": 30},
        "executor": {"kind": "serial"},
        "model": {"channels": 4, "max_l": 1, "sh_lmax": 1, "correlation": 1, "num_layers": 2, "cutoff": 3.0,
                  "radial_mlp": [8], "num_radial": 4},
        "training": {"epochs": 3, "max_time": 5, "batch_size": 4, "device": "cpu", "lr": 0.01},
        "uq": {"heads_steps": 5},
        "explore": {"temperatures": [600], "replicas": 2, "steps": 8, "sample_every": 4, "rattle": 2},
        "select": {"per_round": 4},
        "stop": {"max_rounds": 3, "max_oracle_calls": 100},
        "report": {"progress": False},
        "directory": str(directory),
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


class CrashingEMT(EMT):
    """EMT whose worker process dies (``os._exit``, as a segfault or the OOM killer would) on ids ending in
    ``crash_suffix``; with ``once_marker`` only the first time (the marker file records that it happened)."""

    def __init__(self, crash_suffix: str = "5", once_marker: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crash_suffix, self.once_marker = crash_suffix, once_marker

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        ident = str(atoms.info.get("equiforce_id", ""))
        if ident.endswith(self.crash_suffix):
            if not self.once_marker or not os.path.exists(self.once_marker):
                if self.once_marker:
                    _append(self.once_marker, {"crashed": ident})
                os._exit(1)
        super().calculate(atoms, properties, system_changes)


EXECUTOR_EVENTS: list[str] = []


@contextlib.contextmanager
def managed_threads(workers: int = 2):
    """An executor factory in the context-manager form (as the documented SLURM recipe): records its exit."""
    EXECUTOR_EVENTS.append("enter")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        yield pool
    EXECUTOR_EVENTS.append("exit")


def not_an_executor():
    return object()
