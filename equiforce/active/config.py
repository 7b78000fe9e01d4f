"""The ``equiforce learn`` configuration: one pydantic tree, where a mistyped key is an error naming it.

An active-learning run spends real money (oracle calls, cluster hours), so a silently ignored
``max_oracle_cals`` would be expensive: every section forbids unknown keys, as ``equiforce train`` does.
The model and training sections are exactly those of ``equiforce train`` (``training.max_time`` is the
budget of *each round*).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from equiforce.errors import ConfigError
from equiforce.train.config import ModelConfig, TrainingConfig, format_validation_error, parse_duration
from equiforce.utils.yaml_io import read_yaml_file as read_yaml

DEFAULT_ROUND_TIME = 120.0  # s of training per round when training.max_time is not given


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


BUILTIN_ORACLES = {
    "xtb": ("tblite.ase:TBLite", {"method": "GFN2-xTB", "verbosity": 0}),
    "emt": ("ase.calculators.emt:EMT", {}),
    "pyscf": ("equiforce.active.pyscf_calc:PySCFCalculator", {"xc": "PBE", "basis": "def2-SVP"}),
}
"""Oracles by short name: (import path of an ASE calculator class, default keyword arguments)."""


class OracleConfig(_Section):
    """The reference method: any ASE calculator, by short name or import path, with keyword arguments."""

    name: Literal["xtb", "emt", "pyscf", "custom"] = Field(
        "xtb", description="xtb (GFN2-xTB via tblite), emt (ASE), pyscf (DFT, optional extra), custom")
    calculator: str | None = Field(None, description="custom: 'package.module:Class' (or dotted) of an ASE calculator")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the calculator "
                                                                    "(merged over the built-in defaults)")
    timeout: float | None = Field(600.0, gt=0, description="seconds (or '10m') per call; longer calls are "
                                                           "recorded as failures and skipped")
    stress: bool = Field(True, description="ask for stress on periodic structures")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @model_validator(mode="after")
    def _custom_needs_path(self) -> OracleConfig:
        if self.name == "custom" and not self.calculator:
            raise ValueError("oracle.name: custom needs oracle.calculator ('package.module:Class')")
        if self.name != "custom" and self.calculator:
            raise ValueError(f"oracle.calculator is only read with name: custom (name is {self.name!r})")
        return self

    def resolved(self) -> tuple[str, dict[str, Any]]:
        """(import path, keyword arguments) of the calculator to build."""
        if self.name == "custom":
            return str(self.calculator), dict(self.kwargs)
        path, defaults = BUILTIN_ORACLES[self.name]
        return path, {**defaults, **self.kwargs}


class ExecutorConfig(_Section):
    """Where oracle calls run: any ``concurrent.futures``-style executor."""

    kind: Literal["process", "thread", "serial", "dask", "custom"] = Field(
        "process", description="process: local process pool; dask: a distributed.Client's executor; custom: a "
                               "factory returning an Executor")
    workers: int = Field(2, ge=1, description="process/thread: number of parallel oracle calls")
    threads_per_worker: int = Field(1, ge=1, description="process: OMP/MKL threads in each worker")
    address: str | None = Field(None, description="dask: scheduler address (default: a local cluster)")
    factory: str | None = Field(None, description="custom: 'package.module:function' returning an Executor, or a "
                                                  "context manager yielding one (closed when the loop ends)")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _factory(self) -> ExecutorConfig:
        if self.kind == "custom" and not self.factory:
            raise ValueError("executor.kind: custom needs executor.factory ('package.module:function')")
        return self


class StartConfig(_Section):
    """Where the loop starts: one or a few structures, and optionally labelled data you already have."""

    structures: list[str] = Field(description="files (any ase.io format) or 'molecule:NAME' / 'bulk:SYMBOL' "
                                              "(ase.build); every frame is a starting point")
    data: list[Path] = Field(default_factory=list, description="already labelled structures (extxyz, ...)")
    rattle: int = Field(16, ge=0, description="bootstrap: randomly displaced copies labelled before the first model")
    rattle_amplitude: float = Field(0.05, gt=0, description="Å, Gaussian σ of the bootstrap displacements")
    strain: float = Field(0.02, ge=0, description="periodic cells: max random strain of the bootstrap copies")
    # > 0 by default since 2026-12-07: measured on ethanol (three seeds) and butane, the loop's error was lower at
    # every round with the moves (docs/benchmarks.md, active-learning section); nothing is added for periodic
    # structures or molecules without a rotatable bond
    torsions: int = Field(8, ge=0, description="bootstrap: also copies of the starting structures with every "
                                               "rotatable bond turned to a random angle (molecules; displaced as "
                                               "the rattled copies), so the first model sees other conformers")

    @field_validator("structures")
    @classmethod
    def _not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one starting structure")
        return value


class UQSection(_Section):
    """The uncertainty-aware model trained each round (see docs/uncertainty.md)."""

    method: Literal["heads", "ensemble"] = Field("heads", description="heads: one model + NLL heads (cheap); "
                                                                      "ensemble: members warm-started each round")
    members: int = Field(3, ge=2, description="ensemble: number of members")
    heads_steps: int = Field(500, ge=1, description="heads: optimiser steps of the NLL fit")
    n_heads: int = Field(8, ge=2)
    calibration: Literal["scale", "isotonic"] = "scale"


class ExploreConfig(_Section):
    """Exploration: batched MD replicas at a temperature ladder, plus random displacements and strains."""

    temperatures: list[float] = Field(default_factory=lambda: [300.0, 500.0, 800.0], description="K")
    replicas: int = Field(4, ge=1, description="MD replicas per temperature, all in one batch")
    steps: int = Field(1000, ge=1, description="MD steps per replica per round")
    timestep_fs: float = Field(0.5, gt=0)
    friction_per_fs: float = Field(0.01, gt=0)
    sample_every: int = Field(20, ge=1, description="steps between candidate snapshots")
    sigma_stop: float | None = Field(None, gt=0, description="eV/Å: freeze a replica when its max force σ "
                                                             "exceeds this (default: sigma_stop_factor × the "
                                                             "validation median of the max force σ)")
    sigma_stop_factor: float = Field(4.0, gt=1)
    restart_from: Literal["start", "labelled", "labelled_md", "labelled_md_snapshots"] = Field(
        "labelled_md_snapshots", description="replicas (and random distortions and turns) start from the starting "
                                             "structures plus: labelled_md_snapshots, labelled MD snapshots (turned "
                                             "conformers stay candidates but never start MD: seeded by them, "
                                             "every later round re-sampled the basins they reached); labelled_md, "
                                             "MD snapshots and turned conformers (not distorted copies, whose "
                                             "strain hot MD would only add to); labelled, any labelled one; start, "
                                             "nothing else")
    rattle: int = Field(8, ge=0, description="randomly displaced candidates per round")
    rattle_amplitude: list[float] = Field(default_factory=lambda: [0.03, 0.15], description="Å, range of σ")
    strain: float = Field(0.03, ge=0, description="periodic cells: max random strain of those candidates")
    torsions: int = Field(4, ge=0, description="candidates per round: a seed with one rotatable bond turned to a "
                                               "random angle (molecules), displaced by the smallest rattle amplitude")
    dtype: Literal["float32", "float64"] = Field("float64", description="precision of the exploration MD")

    @field_validator("temperatures", "rattle_amplitude")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("must be a non-empty list of positive numbers")
        return value


class SelectConfig(_Section):
    """Which candidates go to the oracle: uncertain ones, spread out in descriptor space."""

    per_round: int = Field(20, ge=1, description="oracle budget of one round (structures sent to the oracle)")
    strategy: Literal["uncertainty_fps", "uncertainty", "fps", "random"] = Field(
        "uncertainty_fps", description="uncertainty_fps: the pool_factor × per_round most uncertain, then "
                                       "farthest-point sampling in descriptor space")
    pool_factor: float = Field(3.0, ge=1)
    sigma_min_factor: float = Field(1.0, ge=0, description="skip candidates with max force σ below this × the "
                                                           "validation median max force σ (known)")
    sigma_max_factor: float = Field(25.0, gt=0, description="skip candidates above this × the validation median "
                                                            "(broken geometries)")
    min_distance: float = Field(0.5, gt=0, description="Å: candidates with a closer pair of atoms are skipped")
    max_bond_deviation: float | None = Field(0.5, gt=0, description="Å, molecules: candidates with a bond this much "
                                                                    "longer or shorter than at the start are skipped "
                                                                    "(and MD replicas frozen); null: no check")
    random_fraction: float = Field(0.0, ge=0, lt=1, description="share of each round's picks drawn at random from "
                                                                "the plain MD snapshots (a hedge: uncertainty alone "
                                                                "spends the budget on the tails of the distribution)")
    valid_fraction: float = Field(0.15, ge=0, lt=1, description="share of each round's labels kept for "
                                                                "validation and calibration")


class StopConfig(_Section):
    """When the loop ends (whichever comes first)."""

    max_oracle_calls: int = Field(500, ge=1, description="total oracle calls, failures and validation included")
    max_rounds: int = Field(30, ge=1)
    target_sigma: float | None = Field(None, gt=0, description="eV/Å: stop when the 95th percentile of the "
                                                              "explored candidates' max force σ is below this")
    target_forces_mae: float | None = Field(None, gt=0, description="meV/Å on the oracle-labelled validation set")
    stable_md_ps: float | None = Field(None, gt=0, description="stop when replicas run this long without a σ "
                                                              "stop or (molecules) a broken bond")
    stable_md_temperature: float = Field(500.0, gt=0)
    stable_md_replicas: int = Field(2, ge=1)
    wall_time: float | None = Field(None, gt=0, description="seconds (or '10m') of active time the loop ends within: "
                                                          "no new round starts that would, taking as long as the "
                                                          "last one, run past it")

    @field_validator("wall_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)


class ReportConfig(_Section):
    test: Path | None = Field(None, description="oracle-labelled test structures, evaluated every round")
    progress: bool | None = Field(None, description="rich progress display (default: when on a terminal)")


class LearnConfig(_Section):
    """Everything ``equiforce learn`` needs."""

    start: StartConfig
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[valid-type]
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="each round's training; "
                                                                              "max_time is per round (default 120 s)")
    first_round_max_time: float | None = Field(None, gt=0, description="training budget of the first round "
                                                                      "(from scratch); default training.max_time")
    uq: UQSection = Field(default_factory=UQSection)
    explore: ExploreConfig = Field(default_factory=ExploreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    e0s: Literal["fit"] | dict[int, float] = Field("fit", description="per-element reference energies")
    final_model: Literal["best_valid", "last"] = Field(
        "best_valid", description="model.eqf at the end: the round whose model has the lowest force MAE on the "
                                  "final (largest) oracle-labelled validation set, or simply the last round's")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads of the loop process (training, MD); small "
                                                        "molecules on a few shared cores run fastest with 1")
    directory: Path = Field(Path("runs/learn"), description="the run directory (journal, rounds, report)")

    @field_validator("first_round_max_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("e0s", mode="before")
    @classmethod
    def _e0s(cls, value: Any) -> Any:
        from equiforce.train.config import DataConfig

        if isinstance(value, dict):
            return DataConfig._e0s(value)
        return value

    @model_validator(mode="after")
    def _budget(self) -> LearnConfig:
        if self.training.max_time is None:  # an open-ended round would never explore
            self.training.max_time = DEFAULT_ROUND_TIME
        if self.uq.method == "heads" and (self.model.num_layers < 2 or self.model.max_l < 1):
            raise ValueError("uq.method: heads needs model.num_layers >= 2 and model.max_l >= 1 "
                             "(or use uq.method: ensemble)")
        return self


def parse_learn_config(data: Any, source: str = "<config>") -> LearnConfig:
    """Validate a parsed mapping; problems become one :class:`ConfigError` naming ``source`` and each key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (start, oracle, model, training, ...), "
                          f"got {type(data).__name__}")
    try:
        return LearnConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_learn_config(path: str | os.PathLike) -> LearnConfig:
    """Read and validate an ``equiforce learn`` YAML file."""
    return parse_learn_config(read_yaml(path), str(path))
