"""Training on a packed dataset (``equiforce pack``): the same run as on files, with the data left on disk.

What :func:`~equiforce.train.trainer.train_configs` learns by reading every structure — the elements, the E0s, the
normalisation statistics, where the data end at short range — comes here from the pack's per-structure summary, so
a run over millions of structures starts without a pass over them, and the epochs read only the batches they step
on (:class:`~equiforce.data.packed.GraphStore`).  Splits, E0 rules and checks are the ones of in-memory training,
and on the same structures both give the same model (tests/test_packed.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from equiforce.data import keys as K
from equiforce.data.packed import GraphStore
from equiforce.data.structure import Configuration
from equiforce.errors import ConfigError, DataError
from equiforce.train.config import ModelConfig, TrainingConfig
from equiforce.train.trainer import (
    DTYPES,
    EpochCallback,
    _validated,
    check_test_set,
    check_type_weights,
    check_validation_elements,
    chosen_e0s,
    fit_and_test,
    labelled_graphs,
    model_for_data,
)


def without_isolated(store: GraphStore) -> GraphStore:
    return store.subset(np.flatnonzero(store.column("isolated") == 0))


def isolated_energies(store: GraphStore) -> dict[int, list[float]]:
    """Energies of the store's isolated-atom entries (a few per element: read whole), per element."""
    isolated = store.subset(np.flatnonzero(store.column("isolated") != 0))
    found: dict[int, list[float]] = {}
    for rows, energies, labelled in zip(isolated.chunks("composition"), isolated.chunks(K.ENERGY),
                                        isolated.chunks(K.HAS_ENERGY)):
        for row, energy in zip(rows[labelled > 0], energies[labelled > 0]):
            found.setdefault(store.elements[int(np.argmax(row))], []).append(float(energy))
    return found


def columns_for(store: GraphStore, elements: Sequence[int]) -> np.ndarray:
    """Where each of ``elements`` is in the pack's composition columns (-1: not in the pack)."""
    column = {z: k for k, z in enumerate(store.elements)}
    return np.array([column.get(int(z), -1) for z in elements])


def grouped_compositions(store: GraphStore, elements: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct compositions (over ``elements``) of the energy-labelled structures, the mean energy and the
    number of structures of each: the E0 fit's rows, gathered chunk by chunk so memory stays bounded."""
    where = columns_for(store, elements)
    sums: dict[bytes, list[Any]] = {}
    for rows, energies, labelled in zip(store.chunks("composition"), store.chunks(K.ENERGY),
                                        store.chunks(K.HAS_ENERGY)):
        rows, energies = rows[labelled > 0], energies[labelled > 0]
        counts = np.where(where >= 0, rows[:, np.maximum(where, 0)], 0).astype(np.int64)
        unique, inverse = np.unique(counts, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        totals = np.bincount(inverse, weights=energies, minlength=len(unique))
        numbers = np.bincount(inverse, minlength=len(unique))
        for row, total, number in zip(unique, totals, numbers):
            entry = sums.setdefault(row.tobytes(), [row, 0.0, 0])
            entry[1] += float(total)
            entry[2] += int(number)
    if not sums:
        return np.zeros((0, len(elements))), np.zeros(0), np.zeros(0)
    rows = np.stack([entry[0] for entry in sums.values()]).astype(np.float64)
    numbers = np.array([entry[2] for entry in sums.values()], dtype=np.float64)
    means = np.array([entry[1] for entry in sums.values()]) / numbers
    return rows, means, numbers


def pack_e0s(e0s: str | dict[int, float], train: GraphStore, isolated: GraphStore, elements: Sequence[int]
             ) -> dict[int, float]:
    """The E0s of :func:`~equiforce.train.trainer.resolve_e0s`, from the summary columns."""
    from equiforce.data.stats import fit_e0s_from_counts

    found = {z: v for z, v in isolated_energies(isolated).items() if z in elements}
    if e0s == "fit":
        rows, means, numbers = grouped_compositions(train, elements)
        return fit_e0s_from_counts(rows, means, found, elements, weights=numbers)
    return chosen_e0s(e0s, {z: float(np.mean(v)) for z, v in found.items()}, elements)


def pack_statistics(train: GraphStore, e0_values: dict[int, float]) -> dict[str, Any]:
    """:func:`~equiforce.data.stats.dataset_statistics` of the training structures, from the summary."""
    from equiforce.data.stats import statistics_from_columns

    e0 = np.array([e0_values.get(z, 0.0) for z in train.elements], dtype=np.float64)
    e0_sum = np.concatenate([chunk @ e0 for chunk in train.chunks("composition")] or [np.zeros(0)])
    return statistics_from_columns(
        n_atoms=train.column("n_atoms"), n_edges=int(train.column("n_edges").sum()), energy=train.column(K.ENERGY),
        has_energy=train.column(K.HAS_ENERGY) > 0, e0_sum=e0_sum,
        force_sq=float(train.column("force_sq").sum()), force_count=int(train.column("force_count").sum()))


def at_cutoff(store: GraphStore, cutoff: float, what: str) -> GraphStore:
    """``store`` with its graphs' edges within the model's ``cutoff``: a pack made at a larger cutoff serves (its
    longer edges are dropped as structures are read), a smaller one cannot."""
    if cutoff > store.cutoff + 1e-9:
        raise ConfigError(f"{store.root} ({what}) was packed with neighbours within {store.cutoff:g} Å and "
                          f"model.cutoff is {cutoff:g} Å; pack again with --cutoff {cutoff:g} (or more), or lower the "
                          "model's cutoff")
    return store.within(cutoff)


def train_store(store: GraphStore, valid: GraphStore | Sequence[Configuration] | None,
                model_cfg: ModelConfig | dict[str, Any], training_cfg: TrainingConfig | dict[str, Any],
                output_dir: str | os.PathLike, *, e0s: str | dict[int, float] = "fit", valid_fraction: float = 0.1,
                split_seed: int = 0, test: Sequence[Configuration] | GraphStore | None = None, resume: bool = True,
                checkpoint_every: int = 1, progress: bool | None = None, extra: dict[str, Any] | None = None,
                epoch_callback: EpochCallback | None = None, workers: int = 0) -> dict[str, Any]:
    """Train on a pack (see module): ``valid`` is another pack, structures in memory, or ``None`` for a fixed
    ``valid_fraction`` of the pack (``split_seed``, the split in-memory training makes)."""
    from equiforce.data.stats import closest_pairs, split_indices

    model_cfg = _validated(ModelConfig, model_cfg, "model")
    training_cfg = _validated(TrainingConfig, training_cfg, "training")
    where = str(store.root)
    store = at_cutoff(store, model_cfg.cutoff, "the training set")
    store.check_readable()  # a damaged shard named before training, not in the middle of an epoch
    if isinstance(valid, GraphStore):
        valid = at_cutoff(valid, model_cfg.cutoff, "the validation set")
        valid.check_readable()
    isolated = store.subset(np.flatnonzero(store.column("isolated") != 0))
    structures = without_isolated(store)
    if valid is None:
        if valid_fraction > 0 and len(structures) > 1:
            train_idx, valid_idx = split_indices(len(structures), valid_fraction, split_seed)
            train, valid = structures.subset(train_idx), structures.subset(valid_idx)
        else:
            train, valid = structures, []
    else:
        from equiforce.data.stats import is_isolated_atom

        train = structures
        valid = (without_isolated(valid) if isinstance(valid, GraphStore)
                 else [c for c in valid if not is_isolated_atom(c)])
    if not len(train):
        raise DataError("no training structures left (after removing isolated atoms / the validation split)",
                        source=where)
    if training_cfg.forces_weight > 0 and not train.labelled(K.HAS_FORCES):
        key = store.index["reader"].get("forces_key", "forces")
        raise DataError(f"no structure has forces (packed with forces_key {key!r}); pack again with the key the files "
                        "use, or set training.forces_weight: 0", source=where, field="forces")
    valid_is_store = isinstance(valid, GraphStore)
    check_validation_elements(set(train.elements_present()), valid)
    found = set(train.elements_present()) | set(isolated.elements_present())
    found |= set(valid.elements_present()) if valid_is_store else {int(z) for c in valid for z in c.numbers}
    elements = sorted(model_cfg.elements) if model_cfg.elements else sorted(found)
    unknown = sorted(found - set(elements))
    if unknown:
        raise ConfigError(f"model.elements {elements} lacks elements present in the data: {unknown}")
    e0_values = pack_e0s(e0s, train, isolated, elements)

    dtype = DTYPES[training_cfg.dtype]
    weights = training_cfg.config_type_weights
    present = train.config_types_present() | (valid.config_types_present() if valid_is_store
                                              else {c.config_type for c in valid})
    check_type_weights(training_cfg, present)
    check_test_set(test, elements, model_cfg.cutoff, dtype)
    train_graphs = train.with_type_weights(weights)
    valid_graphs = (valid.with_type_weights(weights) if valid_is_store
                    else labelled_graphs(valid, model_cfg.cutoff, dtype, weights))
    stats = pack_statistics(train, e0_values)

    def closest() -> dict[tuple[int, int], float]:
        pairs = dict(store.closest_pairs())
        more = valid.closest_pairs() if valid_is_store else closest_pairs(valid_graphs)
        for pair, distance in more.items():
            pairs[pair] = min(pairs.get(pair, distance), distance)
        return pairs

    model = model_for_data(model_cfg, training_cfg, elements, e0_values, stats, closest)
    return fit_and_test(model, train_graphs, valid_graphs, training_cfg, output_dir, stats=stats, test=test,
                        resume=resume, checkpoint_every=checkpoint_every, progress=progress, extra=extra,
                        epoch_callback=epoch_callback, workers=workers)
