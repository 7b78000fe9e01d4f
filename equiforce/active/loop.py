"""The active-learning loop: label → train → rate → explore → select → label …, resumable from its journal.

Every decision that costs an oracle call is journaled *before* the call (the ``selected`` record with the
structures themselves) and every result the moment it arrives (``label`` / ``failure``), so the state of
a run is a pure function of its journal plus the training checkpoints on disk.  Resuming replays the
journal: finished calls are never repeated, a selection whose labelling was interrupted is labelled
(only its missing structures), a round killed mid-training continues from the trainer's checkpoint, and
a round killed while exploring explores again (nothing from it was labelled yet).

Round ``r`` (from 1) trains on every label of rounds ``< r``; round 0 is the bootstrap (the starting
structures and randomly displaced copies, labelled before any model exists).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from equiforce.active.config import LearnConfig, parse_learn_config, read_yaml
from equiforce.active.display import Display
from equiforce.active.explore import TORSION_SOURCE, distort, exploration_seeds, explore, from_md
from equiforce.active.journal import JOURNAL, Journal, atoms_from_json, atoms_to_json, read_journal
from equiforce.active.oracle import check_oracle, label, open_executor, oracle_spec
from equiforce.active.select import select
from equiforce.active.torsions import random_conformer, rotatable_bonds
from equiforce.data.packed import data_sha256, is_pack
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError, DataError, EquiforceError
from equiforce.utils.atomic_io import atomic_write, atomic_write_text
from equiforce.utils.jsonable import strict_json

CONFIG = "config.yaml"
FINAL_MODEL = "model.eqf"
MIN_FINAL_VALID = 5  # fewer validation structures than this: keep the last round's model
FAULT_ENV = "EQUIFORCE_LEARN_FAULT"
"""Fault injection for the kill/resume tests: ``POINT:N`` sends SIGKILL to this process the N-th time the
loop passes POINT (label, train, trained, explore, selected)."""
# a batch this large failing in every call is a broken oracle (settings, a licence, a dead cluster), not bad
# structures: stop and say so instead of spending the whole budget on failures
MIN_CALLS_FOR_BROKEN_ORACLE = 3


# ------------------------------------------------------------------------------------------------ fault hook
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ state
@dataclass
class RunState:
    """What the journal says happened (replayed on every start)."""

    selected: dict[str, dict[str, Any]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)  # id → label or failure record
    by_type: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # type → round → record
    stopped: dict[str, Any] | None = None
    elapsed: float = 0.0
    retried: int = 0  # failed calls made again after an oracle change (each still counts as a call)

    @classmethod
    def replay(cls, records: Sequence[dict[str, Any]]) -> RunState:
        state = cls()
        for record in records:
            state.apply(record)
        return state

    def apply(self, record: dict[str, Any]) -> None:
        kind = record["type"]
        if kind == "selected":
            for item in record["items"]:
                if item["id"] not in self.selected:
                    self.order.append(item["id"])
                self.selected[item["id"]] = {**item, "round": record["round"]}
        elif kind in ("label", "failure"):
            self.outcomes.setdefault(record["id"], record)  # the first result counts (never two)
        elif kind == "stopped":
            self.stopped = record
        elif kind == "config" and record.get("retry_failures"):  # a fixed oracle: failed calls are made again
            self.retried += sum(1 for v in self.outcomes.values() if v["type"] == "failure")  # (and were paid)
            self.outcomes = {k: v for k, v in self.outcomes.items() if v["type"] != "failure"}
        elif kind == "continued":  # new stop settings lifted the stop: the loop goes on from that round
            self.stopped = None
            self.by_type.pop("final", None)
            self.by_type.get("stopped", {}).pop(int(record["round"]), None)
        if "round" in record:
            self.by_type.setdefault(kind, {})[int(record["round"])] = record
        if "elapsed" in record:
            self.elapsed = max(self.elapsed, float(record["elapsed"]))

    def has(self, kind: str, round_: int) -> bool:
        return round_ in self.by_type.get(kind, {})

    def get(self, kind: str, round_: int) -> dict[str, Any]:
        return self.by_type[kind][round_]

    @property
    def calls(self) -> int:
        """Oracle calls made (labels and failures, validation included, retried failures too)."""
        return len(self.outcomes) + self.retried

    def pending(self) -> list[dict[str, Any]]:
        return [self.selected[i] for i in self.order if i not in self.outcomes]

    def labelled(self, before_round: int, split: str) -> list[Configuration]:
        out = []
        for i in self.order:
            item, result = self.selected[i], self.outcomes.get(i)
            if item["round"] < before_round and item["split"] == split and result and result["type"] == "label":
                out.append(to_configuration(item, result))
        return out


def wall_time_reason(now: float, previous: float | None, budget: float) -> str | None:
    """Why the loop stops for time at a round's end (``now`` s of active time; ``previous``: the round before
    ended then), or None: when the budget is spent, or when another round, taking as long as the last one, would
    run past it — so the loop ends within its budget instead of a round after it."""
    if now >= budget:
        return f"wall time {budget:.0f} s spent"
    if previous is not None and now + (now - previous) > budget:
        return f"wall time: another round (~{now - previous:.0f} s) would pass the {budget:.0f} s budget"
    return None


def to_configuration(item: dict[str, Any], result: dict[str, Any]) -> Configuration:
    atoms = atoms_from_json(item["atoms"])
    return Configuration.from_atoms(atoms, energy=result["energy"], forces=np.asarray(result["forces"]),
                                    stress=np.asarray(result["stress"]) if "stress" in result else None,
                                    source=f"oracle:{item['id']}", config_type=item.get("source", "Default"))


# ------------------------------------------------------------------------------------------------ inputs
STRUCTURE_CHECK_CUTOFF = 3.0  # Å: enough to find two atoms at the same place (the model's cutoff is not known yet)


def load_structures(specs: Sequence[str], base: Path | None = None) -> list[Atoms]:
    """Starting structures from files (every frame) or ``molecule:NAME`` / ``bulk:SYMBOL`` (ase.build)."""
    from equiforce.data.io import check_structures, read_atoms

    out: list[Atoms] = []
    for spec in specs:
        kind, _, name = spec.partition(":")
        if kind == "molecule" and name:
            from ase.build import molecule

            try:
                out.append(molecule(name))
            except KeyError:
                raise ConfigError(f"start.structures: ase.build.molecule knows no {name!r}") from None
        elif kind == "bulk" and name:
            from ase.build import bulk

            try:
                out.append(bulk(name, cubic=True))
            except (KeyError, ValueError, RuntimeError) as err:
                raise ConfigError(f"start.structures: ase.build.bulk({name!r}): {err}") from None
        else:
            path = Path(spec)
            if not path.is_absolute() and base is not None and not path.exists():
                path = base / path
            if not (path.is_file() or is_pack(path)):
                raise ConfigError(f"start.structures: {spec} is not a file or a pack (nor molecule:NAME / "
                                  "bulk:SYMBOL)")
            frames = read_atoms(path)  # unreadable files, and broken frames, named with file and frame
            check_structures(frames, path, cutoff=STRUCTURE_CHECK_CUTOFF)
            out.extend(frames)
    for atoms in out:
        atoms.calc = None
    return [Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc) for a in out]


def validation_split(n: int, fraction: float, seed: int, round_: int) -> list[str]:
    """Which of a round's ``n`` picks go to validation ("valid") or training ("train"): a fixed share (at least
    one of three or more), at positions drawn from the run's seed and the round."""
    n_valid = int(round(fraction * n)) if n >= 3 else 0
    if fraction > 0 and n >= 3:
        n_valid = max(n_valid, 1)
    chosen = set(np.random.default_rng([seed, round_, 17]).permutation(n)[:n_valid].tolist())
    return ["valid" if k in chosen else "train" for k in range(n)]


def absolute_paths(cfg: LearnConfig) -> LearnConfig:
    """File names made absolute, so a run resumes from any working directory."""
    start = cfg.start.model_copy(update={
        "structures": [str(Path(s).resolve()) if Path(s).is_file() else s for s in cfg.start.structures],
        "data": [p.resolve() for p in cfg.start.data]})
    report = cfg.report.model_copy(update={"test": cfg.report.test.resolve() if cfg.report.test else None})
    return cfg.model_copy(update={"start": start, "report": report})


CHANGEABLE_ON_RESUME = frozenset({"directory", "report", "threads", "executor", "stop"})
"""Config sections a run may change between sessions: where it lives, how it reports, how many processes it
uses and when it stops.  Everything else decides which structures are labelled and how models are trained, and a
change mid-run would mix two experiments in one journal."""


def fixed_config(cfg: LearnConfig) -> dict[str, Any]:
    """The part of ``cfg`` a resumed run must keep (JSON form)."""
    return cfg.model_dump(mode="json", exclude=set(CHANGEABLE_ON_RESUME))


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two JSON trees."""
    if isinstance(before, dict) and isinstance(after, dict):
        return [name for key in sorted(set(before) | set(after), key=str)
                for name in changed_keys(before.get(key), after.get(key), f"{prefix}{key}.")]
    return [] if before == after else [prefix.rstrip(".") or "(config)"]


def only_oracle(changed: Sequence[str]) -> bool:
    """Whether every changed key lies in the ``oracle`` section (which may change until the first label)."""
    return bool(changed) and all(key == "oracle" or key.startswith("oracle.") for key in changed)


def input_digests(cfg: LearnConfig) -> dict[str, str]:
    """SHA-256 of the input files a run reads again in every session (existing data, starting structures)."""
    paths = [Path(p) for p in cfg.start.data] + [Path(s) for s in cfg.start.structures
                                                 if Path(s).is_file() or is_pack(s)]
    missing = [p for p in paths if not (p.is_file() or is_pack(p))]
    if missing:
        raise DataError("file not found", source=str(missing[0]), field="start.data")
    return {str(p): data_sha256(p) for p in paths}


def check_kept_config(records: Sequence[dict[str, Any]], cfg: LearnConfig, where: Path) -> bool:
    """Refuse a resume whose config was edited where the run's results depend on it, or whose input files changed
    (the journal keeps the config the run started with and its files' digests).  The ``oracle`` section alone may
    change until the first label arrives (a run whose oracle failed on every call is fixed that way); returns
    whether it did, so the failed calls are made again."""
    started = next((r for r in reversed(records) if r["type"] == "config"), None)
    if started is None:  # a journal from before configs were journaled: the kept file is all there is (prepare
        return False     # compared a new CONFIG with it, the oracle included)
    for path, digest in started.get("files", {}).items():
        if not (Path(path).is_file() or is_pack(path)) or data_sha256(path) != digest:
            raise ConfigError(f"{where}: the input file {path} is not the one the run started with (missing or "
                              "changed); restore it, or start a new run in another directory")
    changed = changed_keys(started["config"], fixed_config(cfg))
    if only_oracle(changed) and not any(r["type"] == "label" for r in records):
        return True
    if changed:
        raise ConfigError(f"{where}: the run started with a different config ({', '.join(changed[:8])} changed); "
                          f"a resumed run may change only {', '.join(sorted(CHANGEABLE_ON_RESUME - {'directory'}))} "
                          "(and the oracle until its first label). Undo the edit, or start a new run in another "
                          "directory")
    return False


# ------------------------------------------------------------------------------------------------ the loop
class Learner:
    """One run: its directory, journal, replayed state and the oracle's executor."""

    def __init__(self, cfg: LearnConfig, directory: Path, progress: bool | None = None) -> None:
        self.cfg, self.dir = cfg, directory
        self.journal = Journal(directory / JOURNAL)  # the lock: one process per run from here on
        try:
            self._open(cfg, directory, progress)
        except BaseException:
            self.journal.close()  # and its lock, whatever went wrong
            raise

    def _open(self, cfg: LearnConfig, directory: Path, progress: bool | None) -> None:
        records = self.journal.records()
        oracle_changed = check_kept_config(records, cfg, directory / CONFIG)
        import yaml

        # kept (again) once the checks passed, so a later `--resume` uses this session's report/stop/executor
        atomic_write_text(directory / CONFIG, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.state = RunState.replay(records)
        self.display = Display(progress if progress is not None else cfg.report.progress, cfg.stop.max_oracle_calls)
        self.starts = load_structures(cfg.start.structures)
        self.t0, self.before = time.perf_counter(), self.state.elapsed  # active seconds of earlier sessions
        self.test_set = None
        self._existing: tuple[list[Configuration], list[Configuration]] | None = None
        if cfg.report.test is not None:
            from equiforce.data.io import read_configurations

            self.test_set = read_configurations(cfg.report.test)
        if oracle_changed or not any(r["type"] == "config" for r in records):
            # the first session's config and input files; after an oracle change the calls that failed are retried
            self.record({"type": "config", "config": fixed_config(cfg),
                         "files": input_digests(cfg), "retry_failures": oracle_changed})
            if oracle_changed:
                self.display.info("the oracle changed before any label: the failed calls are made again")

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def record(self, record: dict[str, Any]) -> None:
        record.setdefault("elapsed", self.elapsed())
        record.update(strict_json(record))  # NaN → None here too, so this run decides on what a resume reads
        self.journal.append(record)
        self.state.apply(record)

    # -------------------------------------------------------------------------------------------- steps
    def _split(self, n: int, round_: int) -> list[str]:
        return validation_split(n, self.cfg.select.valid_fraction, self.cfg.seed, round_)

    def bootstrap(self) -> None:
        """Round 0: the starting structures and randomly displaced copies of them."""
        start = self.cfg.start
        rng = np.random.default_rng([self.cfg.seed, 0])
        structures = list(self.starts)
        sources = ["start"] * len(structures)
        for k in range(start.rattle):
            structures.append(distort(self.starts[k % len(self.starts)], start.rattle_amplitude, start.strain, rng))
            sources.append("rattle")
        rotors = [rotatable_bonds(a) for a in self.starts] if start.torsions else []  # once per start
        for k, bonds in enumerate(rotors):
            if not bonds and "torsions" in start.model_fields_set:  # asked for, not the default
                self.display.info(f"start.torsions: starting structure {k} ({self.starts[k].get_chemical_formula()}) "
                                  "has no rotatable bond (single, in no ring, not periodic); no turned copies of it")
        for k in range(start.torsions):
            turned = random_conformer(self.starts[k % len(self.starts)], rng, rotors[k % len(self.starts)])
            if turned is not None:
                structures.append(distort(turned[0], start.rattle_amplitude, start.strain, rng))
                sources.append(TORSION_SOURCE)
        budget = min(len(structures), self.cfg.stop.max_oracle_calls)
        structures = structures[:budget]
        splits = self._split(len(structures), 0)
        items = [{"id": f"r000-{k:04d}", "atoms": atoms_to_json(a), "split": splits[k], "source": sources[k]}
                 for k, a in enumerate(structures)]
        self.record({"type": "selected", "round": 0, "items": items})
        fault_point("selected")

    def label_pending(self, executor: Any) -> None:
        pending = self.state.pending()
        if not pending:
            return
        self.display.phase(f"labelling {len(pending)} structures")
        spec = oracle_spec(self.cfg.oracle)
        requests = [{"id": item["id"], "atoms": item["atoms"]} for item in pending]

        failures: list[dict[str, Any]] = []

        def arrived(result: dict[str, Any]) -> None:
            if result["id"] in self.state.outcomes:  # a late duplicate (after a timeout): keep the first
                return
            self.record(result)
            self.display.calls(self.state.calls)
            if result["type"] == "failure":
                failures.append(result)
                self.display.info(f"oracle failure on {result['id']} ({result['kind']}): {result['error']}")
            fault_point("label")

        label(requests, spec, executor, arrived)
        if len(requests) >= MIN_CALLS_FOR_BROKEN_ORACLE and len(failures) == len(requests):
            first = failures[0]
            raise EquiforceError(f"the oracle failed on all {len(requests)} structures it was given (first, "
                                 f"{first['id']}: {first['kind']}: {first['error']}); the failures are journaled. "
                                 "Fix the oracle — its environment, or, before the run's first label, the `oracle` "
                                 f"section of {self.dir / CONFIG} (then the failed calls are made again) — and "
                                 f"continue with `equiforce learn --resume {self.dir}`")

    def existing_data(self) -> tuple[list[Configuration], list[Configuration]]:
        """``start.data`` split into train/validation (read once; not oracle calls)."""
        if self._existing is None:
            self._existing = self._read_existing()
        return self._existing

    def _read_existing(self) -> tuple[list[Configuration], list[Configuration]]:
        if not self.cfg.start.data:
            return [], []
        from equiforce.data.io import read_configurations
        from equiforce.data.stats import split_indices

        configs = [c for path in self.cfg.start.data for c in read_configurations(path)]
        if len(configs) < 2 or self.cfg.select.valid_fraction == 0:
            return configs, []
        train_idx, valid_idx = split_indices(len(configs), self.cfg.select.valid_fraction, self.cfg.seed)
        return [configs[i] for i in train_idx], [configs[i] for i in valid_idx]

    def train(self, round_: int) -> Path:
        from equiforce.active.rounds import train_round

        data_train, data_valid = self.existing_data()
        train = data_train + self.state.labelled(round_, "train")
        valid = data_valid + self.state.labelled(round_, "valid")
        previous = self.model_path(round_ - 1) if round_ > 1 else None
        if not train:
            raise EquiforceError(f"no labelled structure to train round {round_} on: {self.state.calls} oracle calls, "
                                 f"all failed (see the failure records in {self.journal.path})")
        self.display.phase(f"round {round_}: training on {len(train)} structures ({len(valid)} validation)")

        def epoch(record: dict[str, Any]) -> None:
            mae = record.get("valid_forces_mae")
            self.display.phase(f"round {round_}: training, epoch {record['epoch']}"
                               + (f", valid F MAE {mae:.1f} meV/Å" if mae is not None else ""))
            fault_point("train")

        path = train_round(self.round_dir(round_), train, valid, self.cfg, previous, self.cfg.seed + round_,
                           progress=False, callback=epoch)  # epochs are reported through the display
        fault_point("trained")
        self.record({"type": "trained", "round": round_, "model": str(path.relative_to(self.dir)),
                     "n_train": len(train), "n_valid": len(valid), "calls": self.state.calls})
        return path

    def round_dir(self, round_: int) -> Path:
        return self.dir / "rounds" / f"r{round_:03d}"

    def model_path(self, round_: int) -> Path:
        return self.round_dir(round_) / "model.eqf"

    def rate(self, round_: int) -> dict[str, Any]:
        from equiforce.active.rounds import rate
        from equiforce.models.file import load_model

        model = load_model(self.model_path(round_))
        data_train, data_valid = self.existing_data()
        valid = data_valid + self.state.labelled(round_, "valid")
        record: dict[str, Any] = {"type": "evaluated", "round": round_, "calls": self.state.calls,
                                  "n_train": len(data_train) + len(self.state.labelled(round_, "train")),
                                  "valid": rate(model, valid)}
        if self.test_set:
            record["test"] = rate(model, self.test_set)
        # σ vs actual error of the structures this round's model selected before (labelled since)
        previous = [i for i in self.state.order if self.state.selected[i]["round"] == round_ - 1]
        pairs = [(self.state.selected[i], self.state.outcomes.get(i)) for i in previous]
        record["selected_sigma_vs_error"] = [  # max atomic σ vs max atomic |ΔF| (eV/Å)
            [item["sigma"], float(np.linalg.norm(np.asarray(item["predicted_forces"]) - np.asarray(out["forces"]),
                                                 axis=-1).max())]
            for item, out in pairs if out and out["type"] == "label" and "predicted_forces" in item]
        self.record(record)
        return record

    def stop_reason(self, round_: int, evaluated: dict[str, Any]) -> str | None:
        stop = self.cfg.stop
        mae = (evaluated.get("valid") or {}).get("forces_mae")
        if stop.target_forces_mae is not None and mae is not None and mae <= stop.target_forces_mae:
            return f"validation force MAE {mae:.1f} meV/Å ≤ target {stop.target_forces_mae:g}"
        if self.state.calls >= stop.max_oracle_calls:
            return f"oracle budget spent ({self.state.calls} of {stop.max_oracle_calls} calls)"
        if round_ >= stop.max_rounds:
            return f"max_rounds ({stop.max_rounds}) reached"
        if stop.wall_time is not None:
            previous = self.state.by_type.get("evaluated", {}).get(round_ - 1)
            return wall_time_reason(float(evaluated.get("elapsed", self.elapsed())),
                                    float(previous["elapsed"]) if previous else None, stop.wall_time)
        return None

    def explore_and_select(self, round_: int, evaluated: dict[str, Any]) -> str | None:
        """Explore with this round's model; journal the picks (or return why the loop is done)."""
        from equiforce.active.stability import same_molecule, stability_test
        from equiforce.models.file import load_model
        from equiforce.sim.analysis.structure import BondCriterion

        cfg = self.cfg
        import torch

        dtype = torch.float32 if cfg.explore.dtype == "float32" else torch.float64
        from equiforce.evaluate import resolve_device

        model = load_model(self.model_path(round_), device=resolve_device(cfg.training.device), dtype=dtype)
        valid = evaluated.get("valid") or {}
        # the median: one broken structure in the validation set must not move every threshold
        reference = valid.get("median_max_force_sigma", valid.get("mean_max_force_sigma")) or 0.0
        threshold = cfg.explore.sigma_stop or (cfg.explore.sigma_stop_factor * reference if reference > 0 else 1.0)
        labelled = self.state.labelled(round_ + 1, "train")
        seeds = exploration_seeds(self.starts, labelled, cfg.explore.restart_from)
        rng = np.random.default_rng([cfg.seed, round_, 1])
        self.display.phase(f"round {round_}: exploring ({len(cfg.explore.temperatures) * cfg.explore.replicas} "
                           f"replicas × {cfg.explore.steps} steps, σ stop {threshold:.3g} eV/Å)")
        bonds = None
        if cfg.select.max_bond_deviation is not None and same_molecule(self.starts):
            bonds = BondCriterion(self.starts[0].numbers, np.stack([a.positions for a in self.starts]),
                                  threshold=cfg.select.max_bond_deviation)
        found = explore(model, seeds, cfg.explore, threshold, rng, rattle_seeds=seeds, bonds=bonds)
        fault_point("explore")
        explored = {"type": "explored", "round": round_, **found.md}
        self.record(explored)
        if cfg.stop.target_sigma is not None and found.md["sigma_p95_ev_a"] <= cfg.stop.target_sigma:
            p95 = found.md["sigma_p95_ev_a"]
            return f"explored σ (95th percentile {p95:.3g} eV/Å) ≤ target {cfg.stop.target_sigma:g}"
        if cfg.stop.stable_md_ps is not None and found.md["sigma_stopped"] == 0:
            self.display.phase(f"round {round_}: no replica crossed σ; checking {cfg.stop.stable_md_ps:g} ps at "
                               f"{cfg.stop.stable_md_temperature:g} K")
            result = stability_test(model, self.starts, cfg.stop.stable_md_temperature, cfg.stop.stable_md_ps,
                                    cfg.stop.stable_md_replicas, timestep_fs=cfg.explore.timestep_fs,
                                    seed=cfg.seed + round_)
            self.record({"type": "stability", "round": round_, **result})
            if result["all_stable"]:
                return f"MD stable for {cfg.stop.stable_md_ps:g} ps at {cfg.stop.stable_md_temperature:g} K"
        budget = min(cfg.select.per_round, cfg.stop.max_oracle_calls - self.state.calls)
        train_desc = None
        if cfg.select.strategy in ("uncertainty_fps", "fps") and labelled:
            from equiforce.active.explore import evaluate_candidates

            train_desc = evaluate_candidates(model, [c.to_atoms() for c in labelled])[0].descriptors
        picks = select(found.candidates, budget, cfg.select.strategy, training=train_desc,
                       sigma_min=cfg.select.sigma_min_factor * reference, sigma_max=cfg.select.sigma_max_factor
                       * reference if reference > 0 else np.inf, min_distance=cfg.select.min_distance,
                       pool_factor=cfg.select.pool_factor, max_bond_deviation=cfg.select.max_bond_deviation or np.inf,
                       rng=rng, random_fraction=cfg.select.random_fraction,
                       random_pool=np.array([from_md(s) for s in found.sources], dtype=bool))
        if not picks:
            return "no candidate left to label (every explored structure is outside the σ window)"
        splits = self._split(len(picks), round_)
        items = [{"id": f"r{round_:03d}-{k:04d}", "atoms": atoms_to_json(found.structures[i]), "split": splits[k],
                  "source": found.sources[i], "sigma": float(found.candidates.sigma[i]),
                  "predicted_forces": np.round(found.predicted_forces[i], 6).tolist()}
                 for k, i in enumerate(picks)]
        window = [cfg.select.sigma_min_factor * reference, cfg.select.sigma_max_factor * reference]
        self.record({"type": "selected", "round": round_, "items": items, "sigma_window": window})
        fault_point("selected")
        return None

    def choose_final(self) -> int:
        """The round whose model becomes ``model.eqf`` (journaled once, so a resumed run keeps the choice).

        ``best_valid``: every round's model is rated on the final validation set — the largest, and held out
        from every round's training — and the lowest force MAE (energy MAE without force labels) wins, ties
        to the later round.  A later round is not always better: a round that learns a new region can lose
        accuracy elsewhere, and a short per-round budget may not recover it before the loop stops.
        """
        if "final" in self.state.by_type:
            return next(iter(self.state.by_type["final"]))
        last = int(self.state.stopped["round"])
        valid = self.existing_data()[1] + self.state.labelled(last + 1, "valid")
        record: dict[str, Any] = {"type": "final", "round": last, "by": self.cfg.final_model, "n_valid": len(valid)}
        if self.cfg.final_model == "best_valid" and len(valid) >= MIN_FINAL_VALID and last > 1:
            from equiforce.active.rounds import rate
            from equiforce.models.file import load_model

            scores: dict[int, float] = {}
            for round_ in range(1, last + 1):
                rated = rate(load_model(self.model_path(round_)), valid)
                score = rated["forces_mae"] if rated["forces_mae"] is not None else rated["energy_per_atom_mae"]
                if score is not None and np.isfinite(score):
                    scores[round_] = float(score)
            if scores:
                best = min(scores.values())
                record["round"] = max(r for r, v in scores.items() if v == best)
                record["valid_scores"] = {str(r): v for r, v in scores.items()}
        elif self.cfg.final_model == "best_valid":
            record["note"] = f"kept the last round: {len(valid)} validation structures (< {MIN_FINAL_VALID})" \
                if last > 1 else "only one round"
        self.record(record)
        if record["round"] != last:
            self.display.info(f"final model: round {record['round']} (validation force MAE "
                               f"{record['valid_scores'][str(record['round'])]:.1f} meV/Å; last round "
                               f"{record['valid_scores'].get(str(last), float('nan')):.1f})")
        return int(record["round"])

    def continue_if_stop_lifted(self) -> None:
        """A stopped run resumed with other stop settings (a larger budget, more rounds, a tighter target) goes
        on from the round it stopped at, if the new settings no longer stop it there."""
        stopped = self.state.stopped
        assert stopped is not None
        then, now = stopped.get("stop"), self.cfg.stop.model_dump(mode="json")
        if then is None or then == now:  # unchanged (or a stop journaled before the settings were kept with it)
            return
        round_ = int(stopped["round"])
        if not self.state.has("evaluated", round_):
            return
        reason = self.stop_reason(round_, self.state.get("evaluated", round_))
        if reason is not None:
            self.display.info(f"the run stopped at round {round_} ({stopped['reason']}); the new stop settings stop "
                              f"it there too ({reason})")
            return
        self.display.info(f"continuing after round {round_}: the new stop settings lift '{stopped['reason']}'")
        self.record({"type": "continued", "round": round_, "after": stopped["reason"], "stop": now})

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.journal.close()  # and its lock, also when the run fails

    def _run(self) -> dict[str, Any]:
        from equiforce.active.report import write_report

        cfg = self.cfg
        if self.state.stopped is not None:
            self.continue_if_stop_lifted()
        if self.state.stopped is None:
            check_oracle(cfg.oracle)
            with self.display, open_executor(cfg.executor) as executor:
                if not self.state.has("selected", 0):
                    self.bootstrap()
                self.label_pending(executor)
                round_ = 1
                while True:
                    if not self.state.has("trained", round_):
                        self.train(round_)
                    evaluated = self.state.get("evaluated", round_) if self.state.has("evaluated", round_) \
                        else self.rate(round_)
                    # the calls made by then (a resumed run replays its rounds after later calls were made)
                    self.display.round_done(round_, evaluated, int(evaluated.get("calls", self.state.calls)))
                    write_report(self.dir, self.journal.records(), cfg, plots=False)
                    # a round that selected picks did not stop when it ran: a resumed run replays it without
                    # asking again (the budget, say, counts every call since and would stop it too early)
                    selected = self.state.has("selected", round_)
                    reason = None if selected else self.stop_reason(round_, evaluated)
                    if reason is None and not selected:
                        reason = self.explore_and_select(round_, evaluated)
                    if reason is not None:
                        self.record({"type": "stopped", "round": round_, "reason": reason, "calls": self.state.calls,
                                     "stop": cfg.stop.model_dump(mode="json")})
                        break
                    self.label_pending(executor)
                    round_ += 1
        chosen = self.choose_final()
        atomic_write(self.dir / FINAL_MODEL, lambda tmp: shutil.copyfile(self.model_path(chosen), tmp))
        return write_report(self.dir, self.journal.records(), cfg)


def prepare(config: LearnConfig | None, config_path: Path | None, resume: Path | None) -> tuple[LearnConfig, Path]:
    """The config and run directory of a new or resumed run (the config is kept in the run directory)."""
    if resume is not None:
        path = resume / CONFIG
        if not (resume / JOURNAL).exists() or not path.exists():
            raise ConfigError(f"{resume} is not an equiforce learn run directory (no {JOURNAL} / {CONFIG})")
        cfg = parse_learn_config(read_yaml(path), str(path))
        return cfg.model_copy(update={"directory": resume}), resume
    assert config is not None
    config = absolute_paths(config)
    directory = Path(config.directory)
    records = read_journal(directory / JOURNAL)  # none: no run yet (or one that failed before its first record)
    if records and (directory / CONFIG).exists():
        kept = parse_learn_config(read_yaml(directory / CONFIG), str(directory / CONFIG))
        changed = changed_keys(fixed_config(kept), fixed_config(config))
        # the oracle alone may change until the first label; the journal's config record decides (Learner), and a
        # journal from before those records has none to decide with
        journaled = any(r["type"] == "config" for r in records)
        if changed and not (journaled and only_oracle(changed)):
            raise ConfigError(f"{directory} holds a run with a different config ({config_path}: "
                              f"{', '.join(changed[:8])} changed); resume it with "
                              f"`equiforce learn --resume {directory}` or choose another `directory`")
    return config, directory


def learn(config: LearnConfig | None = None, *, config_path: str | os.PathLike | None = None,
          resume: str | os.PathLike | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) an active-learning loop; returns the report's summary."""
    cfg, directory = prepare(config, Path(config_path) if config_path else None, Path(resume) if resume else None)
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    return Learner(cfg, directory, progress).run()
