"""Fine-tuning a trained model on new data, with replay of its old data so that it does not forget.

The model file gives architecture, weights and reference energies; training continues from them on the new
structures (the usual loop, schedule and checkpoints: ``fit``).  Forgetting is the known failure of plain
fine-tuning — the model drifts away from what it was trained on.  A few hundred structures of the original
data mixed into every epoch at a reduced weight (``replay``) hold it in place, and a held-out part of them
measures it: the result's ``forgetting`` rates the model on those structures before and after.

Elements the model never saw are added (:func:`equiforce.models.extend.with_elements`): the old elements
keep their weights and E0s exactly, the new ones get fresh weights and E0s from the new data (least squares
with the old E0s held fixed, isolated-atom frames, or given values), and training teaches them.

A model with uncertainty (ensemble or heads) is fine-tuned through :mod:`equiforce.uq.finetune`: its
members or backbone are tuned as above, its σ rebuilt and recalibrated on the validation structures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equiforce.data.packed import GraphStore
from equiforce.data.stats import is_isolated_atom
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError
from equiforce.evaluate import evaluate, resolve_device
from equiforce.models.extend import with_elements
from equiforce.models.file import load_model
from equiforce.models.potential import Potential
from equiforce.train import distributed
from equiforce.train.config import TrainingConfig
from equiforce.uq.base import UQModel
from equiforce.utils.atomic_io import atomic_write_json

FINETUNE_REPORT = "finetune.json"  # forgetting (replay errors before/after), validation and test errors


def fine_tune(start: str | os.PathLike, train: Sequence[Configuration], valid: Sequence[Configuration] | None,
              training_cfg: TrainingConfig | dict[str, Any], output_dir: str | os.PathLike, *,
              replay: Sequence[Configuration] | GraphStore | None = None, replay_frames: int = 200,
              replay_weight: float = 0.5, replay_holdout: float = 0.2, valid_fraction: float = 0.1, split_seed: int = 0,
              test: Sequence[Configuration] | GraphStore | None = None, resume: bool = True,
              checkpoint_every: int = 1,
              progress: bool | None = None, extra: dict[str, Any] | None = None, epoch_callback=None,
              e0s: str | dict[int, float] = "fit") -> dict[str, Any]:
    """Continue training the model in ``start`` on ``train``; the trainer's result plus ``forgetting``
    (``before``/``after`` metrics on the held-out replay structures, when ``replay`` is given).

    ``e0s`` sets the reference energies of elements new to the model only (as ``data.e0s`` of a new
    model: ``"fit"``, ``"isolated"`` or values); the model's own elements keep theirs.
    """
    from equiforce.train.trainer import (
        DTYPES,
        _validated,
        check_before_training,
        fit,
        labelled_graphs,
        split_train_valid,
    )

    training = _validated(TrainingConfig, training_cfg, "training")
    dtype = DTYPES[training.dtype]
    model = load_model(start, dtype=dtype)
    isolated = [c for c in train if is_isolated_atom(c)]
    train, valid = split_train_valid(train, valid, valid_fraction, split_seed)
    replay_train, replay_test = _replay_sets(replay, replay_frames, replay_holdout, split_seed)
    added = _new_elements(start, model, train, valid, replay_train)
    new_e0s = _new_element_e0s(e0s, [*train, *isolated], model, added) if added else {}
    check_before_training(training, [*train, *valid, *replay_train], test, [*model.spec.elements, *added],
                          model.cutoff, dtype)
    weights = training.config_type_weights
    train_graphs = labelled_graphs(train, model.cutoff, dtype, weights)
    train_graphs += labelled_graphs(replay_train, model.cutoff, dtype, weights, weight=replay_weight)
    valid_graphs = labelled_graphs(valid, model.cutoff, dtype, weights)
    device = resolve_device(training.device)
    _warn_of_another_reference(model, train, added)
    before = evaluate(load_model(start, device=device, dtype=dtype), replay_test, training.valid_batch_size,
                      device) if replay_test else None
    extra = {"finetune": {"start": str(start), "replay_train": len(replay_train), "replay_test": len(replay_test),
                          "replay_weight": replay_weight, "added_elements": added},
             "n_train": len(train), "n_valid": len(valid), **(extra or {})}

    def tune_one(potential: Potential, seed: int, directory: os.PathLike) -> dict[str, Any]:
        return fit(with_elements(potential, added, new_e0s, seed=seed), train_graphs, valid_graphs,
                   training.model_copy(update={"seed": seed}), directory, resume=resume,
                   checkpoint_every=checkpoint_every, progress=progress, extra=extra, epoch_callback=epoch_callback)

    if isinstance(model, UQModel):  # the potential(s) inside are tuned, the σ rebuilt and recalibrated
        from equiforce.uq.finetune import fine_tune_uq

        result = fine_tune_uq(model, tune_one, train_graphs, valid_graphs, output_dir, seed=training.seed,
                              device=device, extra=extra)
    else:
        result = tune_one(model, training.seed, output_dir)
    result.update(n_train=len(train), n_valid=len(valid), n_replay=len(replay_train), added_elements=added)
    best = load_model(result["best_model"], device=device)
    if isinstance(model, UQModel):  # the trainer's validation metrics are per member: rate the model itself
        result["valid"] = evaluate(best, valid, training.valid_batch_size, device)
    if before is not None:
        result["forgetting"] = {"before": before, "after": evaluate(best, replay_test, training.valid_batch_size,
                                                                    device)}
    if test:
        result["test"] = evaluate(best, test, training.valid_batch_size, device)
    # forgetting and the errors, kept beside the model (the log has epochs only)
    report = {key: result[key] for key in ("forgetting", "valid", "test", "added_elements", "n_train", "n_valid",
                                           "n_replay", "best_model") if key in result}
    distributed.write_on_main(lambda: atomic_write_json(Path(output_dir) / FINETUNE_REPORT, report))
    return result


REFERENCE_GAP = 1.0  # eV/atom: energies this far from the start model's are another reference, not a new domain


def _warn_of_another_reference(model, train: Sequence[Configuration], added: list[int]) -> None:
    """Warn when the new energies sit far from the start model's (another code, functional or pseudopotentials
    gives another zero of energy): the model's E0s stay its own, so its shift and weights must absorb the offset
    and the first epochs' energy errors are huge.  Rated on up to 32 structures without new elements."""
    import warnings

    sample = [c for c in train if c.energy is not None and not set(int(z) for z in c.numbers) & set(added)][:32]
    if not sample:
        return
    metrics = evaluate(model, sample, batch_size=8, device="cpu", hessians=False)
    gap = metrics.get("energy_per_atom_mae", 0.0) / 1000.0
    if gap > REFERENCE_GAP:
        warnings.warn(f"the new training energies differ from the start model's by {gap:.3g} eV/atom on average "
                      f"({len(sample)} structures): another level of theory or reference energy? Fine-tuning keeps the "
                      "model's E0s, so it will spend its first epochs on that offset; for another reference, train "
                      "a new model (or subtract the offset from the labels)", stacklevel=3)


def _new_elements(start: str | os.PathLike, model, train: Sequence[Configuration], valid: Sequence[Configuration],
                  replay: Sequence[Configuration]) -> list[int]:
    """Elements of the data the model does not know; each must occur in the training structures (its E0 and
    weights are learned from them)."""
    known = set(model.spec.elements)
    in_train = {int(z) for c in train for z in c.numbers}
    added = sorted(in_train - known)
    for name, configs in (("validation data", valid), ("replay data", replay)):
        unknown = sorted({int(z) for c in configs for z in c.numbers} - known - in_train)
        if unknown:
            raise ConfigError(f"{start}: the {name} hold elements {unknown} that neither the model (it knows "
                              f"{sorted(known)}) nor the training data have")
    return added


def _new_element_e0s(e0s: str | dict[int, float], configs: Sequence[Configuration], model, added: list[int]
                     ) -> dict[int, float]:
    """E0s of the ``added`` elements: ``"fit"``: least squares on the training energies with the model's E0s held
    fixed (isolated-atom frames pin theirs); ``"isolated"`` or values: as for a new model."""
    from equiforce.data.stats import fit_e0s
    from equiforce.train.trainer import resolve_e0s

    if e0s == "fit":
        elements = sorted(set(model.spec.elements) | set(added))
        fitted = fit_e0s(configs, elements, fixed={z: model.spec.e0s.get(z, 0.0) for z in model.spec.elements})
        return {z: fitted[z] for z in added}
    return resolve_e0s(e0s, configs, added)


def _replay_sets(replay: Sequence[Configuration] | GraphStore | None, frames: int, holdout: float, seed: int
                 ) -> tuple[list[Configuration], list[Configuration]]:
    """A fixed random choice of ``frames`` replay structures, split into a training part and a held-out part.
    From a pack (a pretraining set of any size) only the chosen structures are read; the choice is the one the
    same structures in a file give."""
    if not replay or frames == 0:
        return [], []
    if isinstance(replay, GraphStore):
        pool = np.flatnonzero(replay.column("isolated") == 0)
        chosen = [replay.configuration(int(pool[i]))
                  for i in np.random.default_rng(seed).permutation(len(pool))[:frames]]
    else:
        pool = [c for c in replay if not is_isolated_atom(c)]
        chosen = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:frames]]
    n_test = int(round(holdout * len(chosen)))
    return chosen[n_test:], chosen[:n_test]
