"""The training configuration: one pydantic tree read from YAML, where a mistyped key is an error.

Silently ignoring ``lerning_rate`` would train with the default and waste a GPU-day, so every section
forbids unknown keys and :func:`load_config` names the file and the dotted path of each bad key.
Relative paths are taken relative to the working directory, as on the command line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo

from equiforce.errors import ConfigError
from equiforce.models.spec import WIDE_BOND_SWITCH, ModelSpec
from equiforce.utils.yaml_io import read_yaml_file

COMPUTED_SPEC_FIELDS = ("elements", "e0s", "avg_num_neighbors", "energy_scale", "energy_shift")
"""ModelSpec fields that training computes from the data rather than reads from the config."""


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a string with a unit: ``"45"``, ``"90s"``, ``"10m"``, ``"1.5h"``."""
    if value is None or isinstance(value, int | float):
        return value
    text = str(value).strip().lower()
    units = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: -len(suffix)].strip()
            try:
                return float(number) * units[suffix]
            except ValueError:
                break
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a duration: {value!r} (use seconds or e.g. '90s', '10m', '1.5h')") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _element_number(key: Any) -> int:
    """Accept ``29``, ``"29"`` or ``"Cu"`` as an element key."""
    from ase.data import atomic_numbers

    if isinstance(key, int):
        return key
    text = str(key).strip()
    if text.isdigit():
        return int(text)
    if text in atomic_numbers:
        return atomic_numbers[text]
    raise ValueError(f"unknown element {key!r} (use an atomic number or a symbol such as 'Cu')")


class DataConfig(_Section):
    """Where the structures are and which fields of the files hold the labels."""

    train: Path = Field(description="training structures (extxyz or anything ase.io reads), or a packed dataset "
                                    "(a directory written by `equiforce pack`), which is read from disk batch by batch")
    valid: Path | None = Field(None, description="validation structures; default: a split of `train`")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of `train` held out when no `valid`")
    split_seed: int = Field(0, description="seed of that split, fixed apart from training.seed")
    test: Path | None = Field(None, description="evaluated with the best model after training")
    format: str | None = Field(None, description="file format for ase.io (e.g. extxyz) where the file name does not "
                                                 "say it; npz and db are read by their own readers")
    energy_key: str = "energy"
    forces_key: str = "forces"
    stress_key: str = "stress"
    virial_key: str = "virial"
    config_type_key: str = "config_type"
    weight_key: str = "config_weight"
    hessian_key: str = Field("hessian", description="per-atom array [N, 9N] or info entry [3N, 3N] holding a "
                                                    "Hessian label (eV/Å²), where the data have one")
    workers: int = Field(0, ge=0, description="processes reading a packed training set ahead of the training step "
                                              "(0: the training process reads each batch itself)")
    e0s: Literal["fit", "isolated"] | dict[int, float] = Field(
        "fit", description="'fit' (least squares), 'isolated' (single-atom frames) or {element: eV}; when "
                           "fine-tuning, only for the elements new to the model (it keeps its own E0s)")

    @field_validator("e0s", mode="before")
    @classmethod
    def _e0s(cls, value: Any) -> Any:
        """One clear message instead of pydantic's per-union-member errors."""
        if isinstance(value, str):
            if value not in ("fit", "isolated"):
                raise ValueError(f"must be 'fit', 'isolated' or a mapping {{element: energy}}, got {value!r}")
            return value
        if isinstance(value, dict):
            out = {}
            for key, energy in value.items():
                try:
                    out[_element_number(key)] = float(energy)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"bad entry {key!r}: {energy!r} ({err})") from None
                if not math.isfinite(out[_element_number(key)]):
                    raise ValueError(f"bad entry {key!r}: {energy!r} (an E0 must be a finite energy in eV)")
            return out
        raise ValueError(f"must be 'fit', 'isolated' or a mapping {{element: energy}}, got {value!r}")


class _ModelConfigBase(_Section):
    elements: list[int] | None = Field(None, description="override the elements found in the data")

    @model_validator(mode="before")
    @classmethod
    def _no_computed(cls, value: Any) -> Any:
        """Say why a ModelSpec field is refused here, rather than just 'extra input'."""
        if isinstance(value, dict):
            computed = sorted(set(value) & set(COMPUTED_SPEC_FIELDS[1:]))
            if computed:
                hint = " (set data.e0s instead)" if "e0s" in computed else ""
                verb = "is" if len(computed) == 1 else "are"
                raise ValueError(f"{', '.join(computed)} {verb} computed from the training data, "
                                 f"not set here{hint}")
        return value

    @field_validator("elements", mode="before")
    @classmethod
    def _elements(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of atomic numbers or symbols")
        return [_element_number(z) for z in value]

    def spec_kwargs(self) -> dict[str, Any]:
        """The architecture fields, ready to be completed with the data-derived ones into a ModelSpec."""
        return self.model_dump(exclude={"elements"})


NEW_MODEL_DEFAULTS: dict[str, Any] = {"basis_bound": 4.0, "short_range_fade": "auto", "shift_gate": "bonds",
                                      "bond_switch": WIDE_BOND_SWITCH, "zbl_range": "fade"}
"""Defaults for models trained from now on that differ from ModelSpec's, whose defaults must stay what
older model files were written with (a file without the key loads as it was built).  ``basis_bound``: 4
bounds the atomic basis well above its in-distribution norms (≤ 3.5 for ethanol) and removes the
10⁵-eV explosions at short range (docs/benchmarks.md); ``null`` switches it off.  ``short_range_fade``:
``auto`` fades each element pair out of the network below the shortest distance the training data have
(:data:`~equiforce.models.spec.AUTO_FADE_FRACTIONS` of it), so only the ZBL prior acts where the data end —
in models with that prior (``zbl: true``; without it ``auto`` is off: there would be nothing left to repel
two atoms); the network itself trains as without it (every training pair lies beyond its fade), ``null``
switches it off.  ``shift_gate: bonds`` with the wide ``bond_switch`` (1.0, 2.3): the per-atom shift leaves an
atom as its last bond breaks instead of over the whole cutoff — in distribution the same model (rMD17 aspirin
and ethanol level), out of distribution H removal 8x and the dimer curves 1.3-4.5x closer to DFT, and far fewer
spurious minima deeper than kT (docs/benchmarks.md); ``coordination`` is the older gate.  ``zbl_range: fade`` (with
``zbl: true``): the ZBL prior acts only where ``short_range_fade`` hands a pair to it, not up to the covalent
radii inside the data's bond lengths, where the network had to learn to cancel it — ethanol at 30 CPU minutes
tests 14 % lower in force with the dimer curves of the covalent prior (the H-removal curve somewhat further from
DFT; docs/benchmarks.md); ``covalent`` is the older range."""

CONFIG_ONLY_VALUES: dict[str, Any] = {"short_range_fade": Literal["auto"]}
"""Values a ModelSpec field takes in the config besides its own (resolved from the data by the trainer)."""


def _model_config_class() -> type[_ModelConfigBase]:
    """Mirror ModelSpec's architecture fields so a new ModelSpec field is configurable without edits here."""
    fields = {}
    for name, info in ModelSpec.model_fields.items():
        if name in COMPUTED_SPEC_FIELDS:
            continue
        annotation = info.annotation
        if name in CONFIG_ONLY_VALUES:
            annotation = CONFIG_ONLY_VALUES[name] | annotation
            info = FieldInfo.merge_field_infos(info, annotation=annotation)
        if name in NEW_MODEL_DEFAULTS:
            info = FieldInfo.merge_field_infos(info, default=NEW_MODEL_DEFAULTS[name])
        fields[name] = (annotation, info)
    return create_model("ModelConfig", __base__=_ModelConfigBase, __doc__="Architecture of the potential.",
                        **fields)


ModelConfig = _model_config_class()


class StageTwoConfig(_Section):
    """A late phase with other loss weights and learning rate (MACE's "stage two"/SWA stage).

    Late in training the forces are nearly converged and the energy error dominates what users see;
    raising the energy weight then (at a lower learning rate) buys energy accuracy at little force cost.
    """

    start: float = Field(0.75, gt=0, lt=1, description="fraction of training progress (epochs or max_time) "
                                                       "at which the stage begins")
    lr: float | None = Field(None, gt=0, description="learning rate of the stage (default: a tenth of lr)")
    energy_weight: float = Field(1000.0, ge=0)
    forces_weight: float | None = Field(None, ge=0, description="default: unchanged")
    stress_weight: float | None = Field(None, ge=0, description="default: unchanged")


SELECT_BY = ("loss", "energy_per_atom_mae", "energy_mae", "forces_mae", "forces_rmse", "stress_mae")


class TrainingConfig(_Section):
    """Optimisation: epochs, batches, optimiser, schedule, EMA and loss weights."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1, description="structures per batch (batch_by: structures)")
    batch_by: Literal["structures", "atoms", "edges"] = Field(
        "structures", description="form batches by structure count, or pack to an atom or edge budget")
    max_batch_atoms: int | None = Field(None, ge=1, description="atom budget per batch (batch_by: atoms)")
    max_batch_edges: int | None = Field(None, ge=1, description="edge budget per batch (batch_by: edges)")
    valid_batch_size: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0)
    warmup_steps: int = Field(0, ge=0, description="optimiser steps of linear learning-rate warm-up")
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (adam) or decoupled decay (adamw)")
    weight_decay_on: Literal["all", "interactions"] = Field(
        "all", description="interactions: decay only the interaction blocks' weights (MACE's choice), "
                           "not the element embedding, readouts or priors")
    amsgrad: bool = True
    scheduler: Literal["plateau", "exponential", "cosine", "none"] = "plateau"
    plateau_factor: float = Field(0.8, gt=0, lt=1, description="plateau: lr multiplier on a plateau")
    plateau_patience: int = Field(50, ge=0, description="plateau: epochs without improvement before cutting lr")
    exponential_gamma: float = Field(0.9993, gt=0, le=1, description="exponential: lr multiplier per epoch")
    min_lr: float = Field(0.0, ge=0, description="plateau/cosine: the lr never goes below this")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of the weights; 0 disables")
    energy_weight: float = Field(1.0, ge=0)
    forces_weight: float = Field(100.0, ge=0)
    stress_weight: float = Field(1.0, ge=0)
    hessian_weight: float = Field(1.0, ge=0, description="weight of the Hessian term (products H·v with random "
                                                         "vectors v, eV/Å²), used when the data carry Hessians")
    hessian_vectors: int = Field(1, ge=1, description="random vectors per step for the Hessian term (each costs "
                                                      "about one more force evaluation)")
    loss: Literal["mse", "huber"] = Field("mse", description="squared error, or Huber (robust to outliers)")
    huber_delta: float = Field(0.01, gt=0, description="Huber: where the loss turns linear, in eV/atom, eV/Å "
                                                       "and eV/Å³")
    config_type_weights: dict[str, float] = Field(
        default_factory=dict, description="loss weight per config_type (others 1.0), times each frame's weight")
    stage_two: StageTwoConfig | None = Field(None, description="late phase with a higher energy weight")
    select_by: Literal[SELECT_BY] = Field(  # type: ignore[valid-type]
        "loss", description="validation quantity that picks best.eqf ('loss' restarts at stage two)")
    refit_shift: bool = Field(True, description="refit the per-element energy shifts by least squares on the "
                                                "(EMA) model's energy residuals after every epoch")
    refit_structures: int = Field(256, ge=1, description="training structures used for that refit")
    clip_grad: float | None = Field(10.0, gt=0, description="max gradient norm; null disables")
    seed: int = 0
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float64", "float32", "tf32"] = Field(
        "float64", description="tf32: float32 weights with TensorFloat-32 matmuls on recent NVIDIA GPUs")
    compile: bool = Field(False, description="trace energy → forces (→ stress) once and compile it with "
                                             "torch.compile (see equiforce.models.compiled): faster steps after a "
                                             "one-off compilation of about a minute; worth it for runs of more "
                                             "than a few minutes")
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="torch.compile backend; aot_eager checks the trace without generating code")
    max_epochs_without_improvement: int | None = Field(None, ge=1, description="early stopping patience")
    max_time: float | None = Field(None, gt=0, description="wall-clock budget in seconds (or '90s', '10m', '1.5h'); "
                                   "training stops mid-epoch when it is spent, then validates and saves")

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator("config_type_weights")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v >= 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        return value

    @model_validator(mode="after")
    def _batch_budget(self) -> TrainingConfig:
        if self.batch_by == "atoms" and self.max_batch_atoms is None:
            raise ValueError("batch_by: atoms needs max_batch_atoms")
        if self.batch_by == "edges" and self.max_batch_edges is None:
            raise ValueError("batch_by: edges needs max_batch_edges")
        return self


class OutputConfig(_Section):
    """Where models, checkpoints and logs go."""

    directory: Path = Path("runs/train")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last epoch always)")
    resume: bool = Field(True, description="continue from OUTPUT/checkpoint.safetensors when it exists")


class FineTuneConfig(_Section):
    """Start from a trained model (its architecture, weights, E0s) instead of a new one; optionally replay
    some of its training data so that what it knew is not forgotten."""

    start: Path = Field(description="the model file to fine-tune (the `model` section is then ignored)")
    replay: Path | None = Field(None, description="structures of the original training data to mix in")
    replay_frames: int = Field(200, ge=0, description="how many of them (a fixed random choice; 0: none)")
    replay_weight: float = Field(0.5, ge=0, description="loss weight of a replayed structure")
    replay_holdout: float = Field(0.2, ge=0, lt=1, description="share of the chosen replay structures kept out "
                                                                "of training to measure forgetting")


class TrainConfig(_Section):
    """Everything ``equiforce train`` needs."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[valid-type]
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    finetune: FineTuneConfig | None = Field(None, description="fine-tune a trained model instead of a new one")


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each ``source: dotted.key: message``, joined by ``; ``."""
    problems = []
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{loc}: {message}")
    return f"{source}: " + "; ".join(problems)


def parse_config(data: Any, source: str = "<config>") -> TrainConfig:
    """Validate an already-parsed mapping; errors become :class:`ConfigError` naming ``source``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, training, output), "
                          f"got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read and validate a YAML training configuration."""
    return parse_config(read_yaml_file(path), str(path))
