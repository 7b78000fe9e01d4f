"""``evaluate(..., by_config_type=True)``: the per-type errors come from the same pass as the overall ones."""

from __future__ import annotations

import numpy as np
import pytest

from equiforce.data.structure import Configuration
from equiforce.evaluate import evaluate
from tests.conftest import make_model


def _labelled(n: int, config_type: str, seed: int) -> list[Configuration]:
    rng = np.random.default_rng(seed)
    configs = []
    for k in range(n):
        numbers = [8, 1, 1, 6, 1][: 3 + k % 3]  # sizes differ, so per-atom and per-structure pooling differ
        positions = rng.uniform(0.0, 2.5, size=(len(numbers), 3))
        configs.append(Configuration(numbers=numbers, positions=positions, energy=float(rng.normal()),
                                     forces=rng.normal(size=(len(numbers), 3)), config_type=config_type, frame=k))
    return configs


def test_errors_by_config_type_match_separate_evaluations_and_the_overall_pass():
    model = make_model("small")
    warm, hot = _labelled(4, "md300K", 1), _labelled(3, "md800K", 2)
    mixed = [hot[0], warm[0], warm[1], hot[1], warm[2], hot[2], warm[3]]  # interleaved, as files often are
    plain = evaluate(model, mixed, batch_size=2)
    grouped = evaluate(model, mixed, batch_size=2, by_config_type=True)
    groups = grouped.pop("by_config_type")
    assert sorted(groups) == ["md300K", "md800K"]
    assert grouped.keys() == plain.keys()
    for key, value in plain.items():
        assert grouped[key] == pytest.approx(value, rel=1e-10)
    for name, members in (("md300K", warm), ("md800K", hot)):
        alone = evaluate(model, members, batch_size=2)
        assert groups[name].keys() == alone.keys()
        for key, value in alone.items():
            assert groups[name][key] == pytest.approx(value, rel=1e-10)
    assert groups["md300K"]["forces_mae"] != pytest.approx(groups["md800K"]["forces_mae"])


def test_one_config_type_gives_no_breakdown():
    assert "by_config_type" not in evaluate(make_model("small"), _labelled(3, "md300K", 3), by_config_type=True)


def test_rigid_body_modes_count_a_linear_molecule_right():
    """Frequencies are compared above the rigid-body modes: a linear molecule has one rotation fewer (a real
    bending mode would otherwise be dropped)."""
    from ase import Atoms
    from ase.build import bulk, molecule

    from equiforce.evaluate import rigid_body_modes

    assert [rigid_body_modes(molecule(name)) for name in ("CO2", "C2H2", "H2O", "CH3CH2OH")] == [5, 5, 6, 6]
    assert rigid_body_modes(bulk("Cu")) == 3 and rigid_body_modes(Atoms("Ar")) == 3


def test_kept_parity_values_are_an_even_sample_of_at_most_keep_max_rows():
    """Past keep_max rows only every 2nd, 4th, ... row is kept: the multiples of the stride, in order."""
    from equiforce.train.metrics import ErrorMetrics

    metrics = ErrorMetrics(keep=True, keep_max=10)
    values = np.arange(57.0)
    for start in range(0, 57, 7):  # batches of 7 rows
        metrics._keep_rows("forces", values[start:start + 7], values[start:start + 7])
    every = metrics.kept_every()["forces"]
    kept = metrics.values()["forces"][0]
    assert every == 8 and kept.tolist() == list(range(0, 57, 8)) and 5 <= len(kept) <= 10
    with pytest.raises(ValueError, match="keep_max must be at least 1"):
        ErrorMetrics(keep=True, keep_max=0)
