"""``equiforce train-uq``: train an ensemble (or a model plus heads), calibrate it, write one model file.

Members are trained by the ordinary trainer (:func:`equiforce.train.trainer.train_configs`), each in its
own directory, so every member resumes from its checkpoint like any training run and a finished member
is not retrained.  All members see the same train/validation split; they differ by seed
(``training.seed + m``) and, with ``uq.bootstrap``, by a bootstrap resample of the training set given as
integer loss weights (multinomial counts) — the structures themselves, hence the normalisation
statistics and the model spec, stay the same for every member, which is what lets them be stacked.
``training.max_time`` is a budget *per member*.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equiforce.data.graph import Graph, config_to_graph
from equiforce.data.packed import GraphStore
from equiforce.data.structure import Configuration
from equiforce.errors import DataError, UnknownElementError
from equiforce.models.file import load_model
from equiforce.models.potential import Potential
from equiforce.train import distributed
from equiforce.train.config import TrainingConfig
from equiforce.uq.base import UQModel
from equiforce.uq.calibration import MIN_STRUCTURES, CalibrationError
from equiforce.uq.config import UQConfig, UQTrainConfig
from equiforce.uq.ensemble import EnsemblePotential
from equiforce.uq.file import save_uq_model
from equiforce.uq.fit import build_uq_potential, calibrate
from equiforce.utils.atomic_io import atomic_write_json

UQ_MODEL = "uq.eqf"
METRICS = "metrics.json"  # the calibration and the validation (and test) σ metrics of UQ_MODEL


@dataclasses.dataclass
class Split:
    """The structures every member trains and validates on (isolated atoms kept for the E0s); a packed training
    set stays a pack (stores over its structures), read batch by batch."""

    train: list[Configuration] | GraphStore
    valid: list[Configuration] | GraphStore
    isolated: list[Configuration] | GraphStore


def split_data(train: Sequence[Configuration] | GraphStore, valid: Sequence[Configuration] | GraphStore | None,
               valid_fraction: float, split_seed: int) -> Split:
    """The trainer's split (same function, same seed), done once so members can be resampled after it."""
    from equiforce.data.stats import is_isolated_atom, split_indices
    from equiforce.train.packed_training import without_isolated

    if isinstance(train, GraphStore):
        isolated, rest = train.subset(np.flatnonzero(train.column("isolated") != 0)), without_isolated(train)
    else:
        isolated = [c for c in train if is_isolated_atom(c)]
        rest = [c for c in train if not is_isolated_atom(c)]
    if valid is None:
        if not (valid_fraction > 0 and len(rest) > 1):
            raise DataError("uncertainty needs held-out structures to calibrate on: set data.valid or "
                            "data.valid_fraction > 0")
        train_idx, valid_idx = split_indices(len(rest), valid_fraction, split_seed)
        if isinstance(rest, GraphStore):
            split = Split(rest.subset(train_idx), rest.subset(valid_idx), isolated)
        else:
            split = Split([rest[i] for i in train_idx], [rest[i] for i in valid_idx], isolated)
        where = f"data.valid_fraction {valid_fraction:g} of {len(rest)} structures"
    elif isinstance(valid, GraphStore):
        split = Split(rest, without_isolated(valid), isolated)
        where = f"data.valid ({valid.root})"
    else:
        split = Split(rest, [c for c in valid if not is_isolated_atom(c)], isolated)
        where = f"data.valid ({valid[0].source})" if valid else "data.valid (empty)"
    # checked before any training: calibration would refuse it only after every member had trained
    if len(split.valid) < MIN_STRUCTURES:
        advice = "raise data.valid_fraction or give data.valid" if valid is None else "give a larger data.valid"
        raise CalibrationError(f"calibration needs at least {MIN_STRUCTURES} held-out structures; {where} gives "
                               f"{len(split.valid)}: {advice}")
    return split


def bootstrap_weights(configs: Sequence[Configuration] | GraphStore, seed: int
                      ) -> list[Configuration] | GraphStore:
    """A bootstrap resample as loss weights: each structure's weight times its multinomial count."""
    counts = np.random.default_rng(seed).multinomial(len(configs), np.full(len(configs), 1.0 / len(configs)))
    if isinstance(configs, GraphStore):
        return configs.with_weight_factors(counts)
    return [dataclasses.replace(c, weight=c.weight * int(n)) for c, n in zip(configs, counts)]


def train_one(train: Sequence[Configuration] | GraphStore, split: Split, config: UQTrainConfig,
              training: TrainingConfig, out: Path, progress: bool | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The ordinary trainer on ``train`` plus the split's isolated atoms, validated on the split's validation set:
    from memory, or from the pack (:func:`~equiforce.train.packed_training.train_store`)."""
    from equiforce.train.trainer import train_configs

    common = dict(e0s=config.data.e0s, resume=config.output.resume, checkpoint_every=config.output.checkpoint_every,
                  progress=progress, extra=extra)
    if isinstance(train, GraphStore):
        from equiforce.train.packed_training import train_store

        return train_store(train.extended(split.isolated), split.valid, config.model, training, out,
                           workers=config.data.workers, **common)
    return train_configs([*train, *split.isolated], split.valid, config.model, training, out, **common)


def train_members(split: Split, config: UQTrainConfig, out: Path, progress: bool | None = None,
                  extra: dict[str, Any] | None = None, equal_epochs: bool = False) -> list[Path]:
    """Train (or resume) each member; return the paths of their best models.

    ``equal_epochs``: members after the first train for as many epochs as the first reached within
    ``training.max_time`` (still capped at twice that time), so that a busy machine does not leave some
    members with a fraction of the others' training (used by ``benchmarks/uq.py``).
    """
    uq, paths = config.uq, []
    first_epochs = None
    for m in range(uq.members):
        seed = config.training.seed + m
        train = bootstrap_weights(split.train, seed) if uq.bootstrap else list(split.train)
        update: dict[str, Any] = {"seed": seed}
        if equal_epochs and first_epochs is not None:
            update["epochs"] = first_epochs
            if config.training.max_time is not None:
                update["max_time"] = 2.0 * config.training.max_time
        training = config.training.model_copy(update=update)
        result = train_one(train, split, config, training, out / "members" / f"m{m}", progress,
                           {**(extra or {}), "ensemble_member": m, "bootstrap": uq.bootstrap})
        paths.append(Path(result["best_model"]))
        first_epochs = first_epochs or max(1, int(result["epochs"]))
    return paths


def build_ensemble(paths: Sequence[Path], valid_graphs: Sequence[Graph], uq: UQConfig, seen_elements: Sequence[int],
                   seeds: Sequence[int], device: torch.device) -> EnsemblePotential:
    members = [load_model(p, device=device) for p in paths]
    info = [{"seed": int(s), "bootstrap": uq.bootstrap, "source": str(p)} for s, p in zip(seeds, paths)]
    ensemble = EnsemblePotential.from_members(members, seen_elements=seen_elements, members_info=info)
    calibrate(ensemble.to(device), valid_graphs, method=uq.calibration, device=device)
    return ensemble


def train_uq(config: UQTrainConfig, *, progress: bool | None = None) -> dict[str, Any]:
    """Run ``equiforce train-uq``; returns paths and validation/test metrics of the calibrated model.

    A pack as ``data.train`` is read batch by batch, as by ``equiforce train`` (members, backbone, calibration,
    the heads' fit on at most ``uq.heads.max_structures`` of its structures, validation and test metrics)."""
    from equiforce.data.io import read_configurations
    from equiforce.data.packed import data_sha256, is_pack
    from equiforce.evaluate import resolve_device
    from equiforce.train.data_files import read_labelled, reader_options
    from equiforce.train.trainer import DTYPES, _test_set, model_option, open_packed_data
    from equiforce.uq.fit import elements_of
    from equiforce.uq.metrics import uq_report
    from equiforce.uq.predict import predict
    from equiforce.utils.paths import check_output_directory

    data, uq = config.data, config.uq
    keys = reader_options(data)
    check_output_directory(config.output.directory, "output.directory")
    if uq.backbone is not None:
        model_option(uq.backbone, "uq.backbone")
    if is_pack(data.train):
        packed = open_packed_data(data)
        split = split_data(packed.train, packed.valid, data.valid_fraction, data.split_seed)
        test = packed.test
    else:
        split = split_data(read_labelled(data.train, data, config.training),
                           read_configurations(data.valid, **keys) if data.valid is not None else None,
                           data.valid_fraction, data.split_seed)
        test = _test_set(data.test, keys)
    out = Path(config.output.directory)
    device, dtype = resolve_device(config.training.device), DTYPES[config.training.dtype]
    extra = {"data": {"train": str(data.train), "train_sha256": data_sha256(data.train)},
             "config": config.model_dump(mode="json")}
    seen = sorted(_elements(split.train) | _elements(split.valid))

    def graphs(structures: Sequence[Configuration] | GraphStore, cutoff: float) -> Sequence[Graph]:
        if isinstance(structures, GraphStore):
            return structures.within(cutoff)
        return [config_to_graph(c, cutoff, dtype) for c in structures]

    if test is not None:  # checked now, not after every member has trained
        for z in sorted(_elements(test) - set(seen)):
            first = _first_holding(test, z)
            raise DataError(f"element(s) [{z}] never appear in the training or validation data {seen}: no σ for "
                            "them", source=first.source, frame=first.frame, field="numbers")
        test_graphs = graphs(test, config.model.cutoff)  # geometry problems (a pack's cutoff) named now too
        if isinstance(test, GraphStore):
            test.check_readable()  # a damaged shard named now, not after every member has trained

    if uq.method == "ensemble":
        paths = train_members(split, config, out, progress, extra)
        cutoff = config.model.cutoff
        seeds = [config.training.seed + m for m in range(uq.members)]
        model: UQModel = build_ensemble(paths, graphs(split.valid, cutoff), uq, seen, seeds, device)
    else:
        from equiforce.uq.heads import check_backbone, check_heads_architecture

        if uq.backbone is not None:
            backbone: Potential = load_model(uq.backbone, device=device)
            if not isinstance(backbone, Potential):
                raise DataError(f"uq.backbone {uq.backbone} already carries uncertainty; give a plain model")
            check_backbone(backbone)
            for part in (split.train, split.valid):  # heads are fitted on the backbone's features of every element
                _check_known(backbone, part, f" (uq.backbone {uq.backbone})")
        else:
            check_heads_architecture(config.model.num_layers, config.model.max_l)  # before the backbone's budget
            result = train_one(split.train, split, config, config.training, out / "backbone", progress, extra)
            backbone = load_model(result["best_model"], device=device)
        cutoff = backbone.cutoff
        model = build_uq_potential(backbone, graphs(split.train, cutoff), graphs(split.valid, cutoff),
                                   method=uq.calibration, device=device, seed=config.training.seed,
                                   **uq.heads.model_dump())
    path = out / UQ_MODEL  # under torchrun every rank trained its share; rank 0 alone writes the file
    distributed.write_on_main(lambda: save_uq_model(model, path, extra={**extra, "uq_method": uq.method}))
    result: dict[str, Any] = {"model": str(path), "method": uq.method,
                              "calibration": model.calibration.to_json(),
                              "valid": uq_report(predict(model, graphs(split.valid, model.cutoff), device=device))}
    if test is not None:
        model.check_elements(elements_of(test_graphs) if isinstance(test_graphs, GraphStore) else
                             {int(z) for c in test for z in c.numbers})
        if model.cutoff != config.model.cutoff:  # a given backbone brings its own cutoff
            test_graphs = graphs(test, model.cutoff)
        result["test"] = uq_report(predict(model, test_graphs, device=device))
    distributed.write_on_main(lambda: atomic_write_json(out / METRICS, result))  # what the command prints
    return result


def _elements(structures: Sequence[Configuration] | GraphStore) -> set[int]:
    if isinstance(structures, GraphStore):  # from the summary
        return set(structures.elements_present())
    return {int(z) for c in structures for z in c.numbers}


def _first_holding(structures: Sequence[Configuration] | GraphStore, z: int) -> Configuration:
    """The first structure holding element ``z`` (to name it in an error)."""
    if isinstance(structures, GraphStore):
        return structures.configuration(int(structures.holding(z)[0]))
    return next(c for c in structures if z in {int(n) for n in c.numbers})


def _check_known(model: Potential, structures: Sequence[Configuration] | GraphStore, note: str) -> None:
    """Every element of ``structures`` known to ``model``, else a :class:`DataError` naming a structure with one."""
    from equiforce.evaluate import check_known_elements

    for z in sorted(_elements(structures)):
        try:
            model.check_elements([z])
        except UnknownElementError:
            first = _first_holding(structures, z)
            check_known_elements(model, first.numbers, first.source, first.frame, note)
