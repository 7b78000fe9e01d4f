"""The ``equiforce train-uq`` configuration: a training config plus a ``uq:`` section.

Everything of ``equiforce train`` (data, model, training, output) keeps its meaning; ``uq`` says which
estimator to build.  Unknown keys are errors, as everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from equiforce.errors import ConfigError
from equiforce.train.config import TrainConfig, format_validation_error
from equiforce.utils.yaml_io import read_yaml_file


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadsConfig(_Section):
    """The single-model estimator's heads (see :mod:`equiforce.uq.heads`)."""

    n_heads: int = Field(8, ge=2, description="error samples per atom (shallow-ensemble size)")
    hidden: int = Field(32, ge=1, description="width of the heads' shared MLP")
    steps: int = Field(1000, ge=1, description="optimiser steps of the NLL fit on the frozen backbone")
    lr: float = Field(3e-3, gt=0)
    batch_structures: int = Field(256, ge=1)
    max_time: float | None = Field(None, gt=0, description="seconds for the whole heads fit (ends it early)")
    max_structures: int | None = Field(50_000, ge=1, description="training structures the heads are fitted on, at "
                                       "most (a fixed random choice: their features are held in memory)")


class UQConfig(_Section):
    """Which uncertainty estimator to train, and how to calibrate it."""

    method: Literal["ensemble", "heads"] = Field("ensemble", description="ensemble of members, or heads on one model")
    members: int = Field(4, ge=2, description="ensemble: number of members (seeds training.seed + m)")
    bootstrap: bool = Field(False, description="ensemble: each member trains on a bootstrap resample of `train`")
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    backbone: Path | None = Field(None, description="heads: an already trained model file instead of training one")
    calibration: Literal["scale", "isotonic"] = Field("scale", description="fitted on the validation set")

    @model_validator(mode="after")
    def _settings_of_the_method(self) -> UQConfig:
        """A setting of the other method would be ignored without a word (a mistyped method, or a leftover).  Only
        values other than the defaults are refused, so a config written out in full reads back."""
        others = {"ensemble": ("heads", "backbone"), "heads": ("members", "bootstrap")}[self.method]
        given = [name for name in others
                 if getattr(self, name) != type(self).model_fields[name].get_default(call_default_factory=True)]
        if given:
            raise ValueError(f"{', '.join(f'uq.{name}' for name in given)} belong(s) to method "
                             f"{'heads' if self.method == 'ensemble' else 'ensemble'}, not {self.method!r}: remove "
                             "them or change uq.method")
        return self


class UQTrainConfig(TrainConfig):
    """Everything ``equiforce train-uq`` needs: ``equiforce train``'s sections plus ``uq``."""

    uq: UQConfig = Field(default_factory=UQConfig)


def parse_uq_config(data: Any, source: str = "<config>") -> UQTrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, training, output, uq)")
    try:
        return UQTrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_uq_config(path: str | os.PathLike) -> UQTrainConfig:
    """Read and validate a ``train-uq`` YAML file."""
    return parse_uq_config(read_yaml_file(path), str(path))
