"""The oracle: any ASE calculator, called through any ``concurrent.futures``-style executor.

Why this shape: users already have ASE calculators for their reference method and, on clusters, an
executor (Dask, dask-jobqueue on SLURM, ``mpi4py.futures``, loky).  So an oracle is an import path plus
keyword arguments, and labelling is ``executor.submit(compute, spec, item)`` — no scheduler of our own.

:func:`compute` runs in the worker and never raises: an exception, an SCF that did not converge, a
non-finite result or a timeout comes back as a failure record, so the loop journals it, skips the
structure and goes on.  Everything crossing the process boundary is plain data (dicts, lists, floats).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from equiforce.active.config import ExecutorConfig, OracleConfig
from equiforce.active.journal import atoms_from_json
from equiforce.errors import ConfigError

MAX_ATTEMPTS = 2  # a call taken down by a dying worker is tried once more in a fresh pool
TIMEOUT_GRACE = 30.0  # s the loop waits past an oracle's own timeout before giving up on a call
# one calculator per oracle spec, reused — per worker thread: an ASE calculator holds the atoms and results of
# its current call, so threads of a `kind: thread` pool sharing one would mix their structures' labels
_LOCAL = threading.local()


def _calculators() -> dict[str, Any]:
    if not hasattr(_LOCAL, "calculators"):
        _LOCAL.calculators = {}
    return _LOCAL.calculators


class OracleFailure(RuntimeError):
    """Raised by an oracle (e.g. :class:`~equiforce.active.pyscf_calc.PySCFCalculator`) that did not converge."""

    kind = "scf"


class OracleResultError(OracleFailure):
    """The oracle answered, but not with one energy and per-atom forces (a broken calculator or wrapper)."""

    kind = "result"


class OracleNonFinite(OracleFailure):
    """The oracle answered with NaN or infinity (a diverged SCF it did not report, a broken geometry)."""

    kind = "nonfinite"


class OracleTimeout(Exception):
    kind = "timeout"


def import_object(path: str) -> Any:
    """``'package.module:Name'`` or ``'package.module.Name'`` → the object."""
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    if not module_name or not name:
        raise ConfigError(f"{path!r} is not an import path ('package.module:Name')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        hint = ""
        if module_name.startswith("tblite"):
            hint = " (GFN2-xTB needs tblite: pip install tblite)"
        elif module_name.startswith("pyscf") or "pyscf_calc" in module_name:
            hint = " (the PySCF oracle needs pyscf: pip install 'equiforce[pyscf]')"
        raise ConfigError(f"cannot import {module_name!r} for {path!r}: {err}{hint}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no {name!r} (from {path!r})") from None


def oracle_spec(config: OracleConfig) -> dict[str, Any]:
    """What a worker needs to build the calculator: plain data."""
    path, kwargs = config.resolved()
    return {"calculator": path, "kwargs": kwargs, "timeout": config.timeout, "stress": config.stress}


def check_oracle(config: OracleConfig) -> None:
    """Fail before the run starts when the calculator cannot be imported (not after an hour of MD)."""
    try:
        import_object(config.resolved()[0])
    except ConfigError as err:
        raise ConfigError(f"oracle.calculator: {err}") from None


def _calculator(spec: dict[str, Any]) -> Any:
    key = json.dumps({"c": spec["calculator"], "k": spec["kwargs"]}, sort_keys=True, default=str)
    calculators = _calculators()
    if key not in calculators:
        calculators[key] = import_object(spec["calculator"])(**spec["kwargs"])
    return calculators[key], key


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raise :class:`OracleTimeout` after ``seconds`` (main thread of a process only; elsewhere the loop's
    own deadline applies)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: Any) -> None:
        raise OracleTimeout(f"oracle call exceeded its timeout of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _classify(err: BaseException) -> str:
    kind = getattr(err, "kind", None)
    if isinstance(kind, str):
        return kind
    # a calculator's own error: "scf" only where it says it did not converge (not whenever "SCF" appears)
    text = str(err).lower()
    if "not converge" in text or "no convergence" in text or "failed to converge" in text:
        return "scf"
    return "exception"


def compute(spec: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """Label one structure (runs in the worker).  Returns a ``label`` or a ``failure`` record; never raises."""
    start = time.perf_counter()
    key = None
    try:
        with _alarm(spec.get("timeout")):
            calc, key = _calculator(spec)
            atoms = atoms_from_json(item["atoms"])
            atoms.info["equiforce_id"] = item["id"]
            atoms.calc = calc
            energy_value = np.asarray(atoms.get_potential_energy(), dtype=np.float64)
            forces = np.asarray(atoms.get_forces(), dtype=np.float64)
            stress = None
            if spec.get("stress", True) and atoms.pbc.all() and "stress" in getattr(calc, "implemented_properties",
                                                                                   ()):
                stress = np.asarray(atoms.get_stress(voigt=False), dtype=np.float64)
        # a result of the wrong shape, once journaled, would break every training after it (and every resume)
        if energy_value.size != 1:
            raise OracleResultError(f"the oracle returned an energy of shape {energy_value.shape}, not one number")
        if forces.shape != (len(atoms), 3):
            raise OracleResultError(f"the oracle returned forces of shape {forces.shape} for {len(atoms)} atoms")
        if stress is not None and stress.shape != (3, 3):
            raise OracleResultError(f"the oracle returned a stress of shape {stress.shape}, not 3 × 3")
        energy = float(energy_value.reshape(-1)[0])
        if not (np.isfinite(energy) and np.isfinite(forces).all() and (stress is None or np.isfinite(stress).all())):
            raise OracleNonFinite("the oracle returned a non-finite energy, force or stress")
        record: dict[str, Any] = {"type": "label", "id": item["id"], "energy": energy, "forces": forces.tolist(),
                                  "seconds": time.perf_counter() - start}
        if stress is not None:
            record["stress"] = stress.tolist()
        return record
    except BaseException as err:  # noqa: BLE001 - every failure of the oracle is data for the journal
        if isinstance(err, KeyboardInterrupt | SystemExit):
            raise
        if key is not None:  # a calculator that failed may hold a broken state: build a fresh one next time
            _calculators().pop(key, None)
        kind = "timeout" if isinstance(err, OracleTimeout) else _classify(err)
        return {"type": "failure", "id": item["id"], "kind": kind,
                "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}",
                "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ executors
class SerialExecutor(cf.Executor):
    """Runs each call at submission, in this process (debugging, tests, oracles that are threads already)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - delivered through the future, as any executor does
            future.set_exception(err)
        return future


class RestartablePool(cf.Executor):
    """A local process pool that can be replaced by a fresh one after a worker died.

    A worker killed mid-call (segfault, the kernel's out-of-memory killer) breaks a
    :class:`~concurrent.futures.ProcessPoolExecutor` for good: every call in it fails with
    ``BrokenProcessPool``, the innocent ones too.  :func:`label` calls :meth:`restart` and resubmits them.
    """

    def __init__(self, workers: int, threads_per_worker: int) -> None:
        self._args = (workers, threads_per_worker)
        # one call per worker: a ProcessPoolExecutor marks a call "running" as soon as it enters its call queue
        # (workers + 1 places), so a call queued behind busy workers had its timeout clock run while it waited
        self.in_flight_limit = workers
        self._pool = self._new()

    def _new(self) -> cf.ProcessPoolExecutor:
        workers, threads = self._args
        # spawn: a fresh interpreter per worker, never a fork of a process holding torch's thread pools
        return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(threads, os.getpid()))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        return self._pool.submit(fn, *args, **kwargs)

    def restart(self) -> None:
        self._end(self._pool)
        self._pool = self._new()

    @staticmethod
    def _end(pool: cf.ProcessPoolExecutor) -> None:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            if process.is_alive():  # a call that outlived its timeout: end our own worker
                process.terminate()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._end(self._pool)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel end this worker when the loop dies (``kill -9`` included), so no orphaned
    worker keeps computing — or holding cores — after its run is gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):  # not Linux: orphans end at their next read from the closed queue
        pass


def _init_worker(threads: int, parent: int) -> None:
    """Worker start-up: thread counts before any numerical library is imported; Ctrl-C is the parent's."""
    _die_with_parent(parent)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def open_executor(config: ExecutorConfig) -> Iterator[cf.Executor]:
    """The configured executor, shut down on exit (a distributed client is closed too)."""
    if config.kind == "serial":
        yield SerialExecutor()
        return
    if config.kind == "thread":
        with cf.ThreadPoolExecutor(max_workers=config.workers) as pool:
            yield pool
        return
    if config.kind == "process":
        pool = RestartablePool(config.workers, config.threads_per_worker)
        try:
            yield pool
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return
    if config.kind == "dask":
        try:
            from distributed import Client
        except ImportError:
            raise ConfigError("executor.kind: dask needs dask.distributed: pip install 'dask[distributed]'") from None
        client = Client(config.address) if config.address else Client(n_workers=config.workers,
                                                                       threads_per_worker=1, processes=True)
        try:
            yield client.get_executor()
        finally:
            client.close()
        return
    factory = import_object(str(config.factory))
    made = factory(**config.factory_kwargs)
    if hasattr(made, "submit"):  # an Executor: shut down on exit
        try:
            yield made
        finally:
            made.shutdown(wait=False)
        return
    if not (hasattr(made, "__enter__") and hasattr(made, "__exit__")):
        raise ConfigError(f"executor.factory {config.factory!r} returned {type(made).__name__}, neither an Executor "
                          "nor a context manager yielding one")
    # a context manager (e.g. a @contextlib.contextmanager generator): it owns what it started — a cluster, a
    # client — and closes it on exit, however the loop ends
    with made as executor:
        if not hasattr(executor, "submit"):
            raise ConfigError(f"executor.factory {config.factory!r} yielded {type(executor).__name__}, not an "
                              "Executor")
        yield executor


def label(items: Iterable[dict[str, Any]], spec: dict[str, Any], executor: cf.Executor,
          on_result: Callable[[dict[str, Any]], None], poll: float = 0.5, grace: float = TIMEOUT_GRACE) -> None:
    """Submit every item; hand each result to ``on_result`` the moment it arrives (in the caller's thread).

    A call still running ``grace`` s past the oracle's timeout is reported as a ``timeout``
    failure and no longer waited for.  A worker that died (segfault, out of memory) breaks a process pool
    and every call in it.  With an executor that can ``restart()`` (the local pool) the calls it took down
    go to a fresh pool, each at most ``MAX_ATTEMPTS`` times in all, and only a call that kills its worker
    every time is recorded as a ``worker`` failure.  Such an executor gets at most ``in_flight_limit`` calls
    at a time (what its workers hold anyway), so a crash takes down no more than those, and each call taken
    down runs alone on its retry, so a second crash names the culprit and harms no one else.  With an
    executor that cannot restart, every call in the broken pool is a ``worker`` failure.
    """
    waiting = list(items)[::-1]  # a stack: pop() submits in the given order
    attempts = {item["id"]: 0 for item in waiting}
    in_flight_limit = getattr(executor, "in_flight_limit", None)
    restartable = hasattr(executor, "restart")
    futures: dict[cf.Future, dict[str, Any]] = {}
    pending: set[cf.Future] = set()
    running_since: dict[cf.Future, float] = {}
    limit = spec.get("timeout")
    suspects: set[str] = set()  # calls a dying worker took down: each runs alone, so a repeat names the culprit

    def top_up() -> None:
        while waiting and (in_flight_limit is None or len(pending) < in_flight_limit):
            if any(futures[f]["id"] in suspects for f in pending) or (waiting[-1]["id"] in suspects and pending):
                return
            item = waiting.pop()
            attempts[item["id"]] += 1
            future = executor.submit(compute, spec, item)
            futures[future] = item
            pending.add(future)

    top_up()
    while pending:
        done, still = cf.wait(pending, timeout=poll, return_when=cf.FIRST_COMPLETED)
        pending.intersection_update(still)
        broken = False
        for future in done:
            item = futures[future]
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - the worker itself failed, not the oracle
                if isinstance(err, cf.BrokenExecutor) and restartable and attempts[item["id"]] < MAX_ATTEMPTS:
                    waiting.append(item)  # first in line for the fresh pool
                    suspects.add(item["id"])
                    broken = True
                    continue
                broken |= isinstance(err, cf.BrokenExecutor)
                result = {"type": "failure", "id": item["id"], "kind": "worker",
                          "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}", "seconds": None}
            on_result(result)
        if broken and restartable:
            executor.restart()
            for future in pending:  # what the broken pool still held is lost with it
                waiting.append(futures[future])
                suspects.add(futures[future]["id"])
            pending.clear()
        top_up()
        if limit:
            now = time.monotonic()
            for future in list(pending):
                if future.running():
                    started = running_since.setdefault(future, now)
                    if now - started > limit + grace:
                        future.cancel()
                        pending.discard(future)
                        on_result({"type": "failure", "id": futures[future]["id"], "kind": "timeout",
                                   "error": f"no result {limit + grace:g} s after the call started",
                                   "seconds": now - started})
            top_up()
