"""Fine-tuning a trained model on new data, with replay of its old data so that it does not forget.

The model file gives architecture, weights and reference energies; training continues from them on the new
structures (the usual loop, schedule and checkpoints: ``fit``).  Forgetting is the known failure of plain
fine-tuning — the model drifts away from what it was trained on.  A few hundred structures of the original
data mixed into every epoch at a reduced weight (``replay``) hold it in place, and a held-out part of them
measures it: the result's ``forgetting`` rates the model on those structures before and after.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from equiforce.data.stats import is_isolated_atom
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError
from equiforce.evaluate import evaluate, resolve_device
from equiforce.models.file import load_model
from equiforce.train.config import TrainingConfig


def fine_tune(start: str | os.PathLike, train: Sequence[Configuration], valid: Sequence[Configuration] | None,
              training_cfg: TrainingConfig | dict[str, Any], output_dir: str | os.PathLike, *,
              replay: Sequence[Configuration] | None = None, replay_frames: int = 200, replay_weight: float = 0.5,
              replay_holdout: float = 0.2, valid_fraction: float = 0.1, split_seed: int = 0,
              test: Sequence[Configuration] | None = None, resume: bool = True, checkpoint_every: int = 1,
              progress: bool | None = None, extra: dict[str, Any] | None = None, epoch_callback=None
              ) -> dict[str, Any]:
    """Continue training the model in ``start`` on ``train``; the trainer's result plus ``forgetting``
    (``before``/``after`` metrics on the held-out replay structures, when ``replay`` is given)."""
    from equiforce.train.trainer import DTYPES, _validated, fit, labelled_graphs, split_train_valid

    training = _validated(TrainingConfig, training_cfg, "training")
    dtype = DTYPES[training.dtype]
    model = load_model(start, dtype=dtype)
    train, valid = split_train_valid(train, valid, valid_fraction, split_seed)  # E0s come with the model
    replay_train, replay_test = _replay_sets(replay, replay_frames, replay_holdout, split_seed)
    known = set(model.spec.elements)
    for name, configs in (("training data", train), ("validation data", valid), ("replay data", replay_train)):
        unknown = sorted({int(z) for c in configs for z in c.numbers} - known)
        if unknown:
            raise ConfigError(f"{start}: the model knows elements {sorted(known)}, but the {name} hold {unknown}; "
                              "fine-tuning cannot add elements (train a new model with them)")
    weights = training.config_type_weights
    train_graphs = labelled_graphs(train, model.cutoff, dtype, weights)
    train_graphs += labelled_graphs(replay_train, model.cutoff, dtype, weights, weight=replay_weight)
    valid_graphs = labelled_graphs(valid, model.cutoff, dtype, weights)
    device = resolve_device(training.device)
    before = evaluate(load_model(start, device=device, dtype=dtype), replay_test, training.valid_batch_size,
                      device) if replay_test else None
    extra = {"finetune": {"start": str(start), "replay_train": len(replay_train), "replay_test": len(replay_test),
                          "replay_weight": replay_weight}, "n_train": len(train), "n_valid": len(valid),
             **(extra or {})}
    result = fit(model, train_graphs, valid_graphs, training, output_dir, resume=resume,
                 checkpoint_every=checkpoint_every, progress=progress, extra=extra, epoch_callback=epoch_callback)
    result.update(n_train=len(train), n_valid=len(valid), n_replay=len(replay_train))
    best = load_model(result["best_model"], device=device)
    if before is not None:
        result["forgetting"] = {"before": before, "after": evaluate(best, replay_test, training.valid_batch_size,
                                                                    device)}
    if test:
        result["test"] = evaluate(best, test, training.valid_batch_size, device)
    return result


def _replay_sets(replay: Sequence[Configuration] | None, frames: int, holdout: float, seed: int
                 ) -> tuple[list[Configuration], list[Configuration]]:
    """A fixed random choice of ``frames`` replay structures, split into a training part and a held-out part."""
    if not replay or frames == 0:
        return [], []
    pool = [c for c in replay if not is_isolated_atom(c)]
    chosen = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:frames]]
    n_test = int(round(holdout * len(chosen)))
    return chosen[n_test:], chosen[:n_test]
