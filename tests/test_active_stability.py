"""The stability check (Fu et al.'s bond criterion on batched Langevin MD), compiled and not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from equiforce.active.stability import stability_test
from equiforce.sim.io import read_system_frames
from equiforce.uq.fit import build_uq_potential
from tests.conftest import make_model
from tests.uq_helpers import graphs, labelled, single_thread  # noqa: F401 - one thread for tiny models


@pytest.mark.slow  # ~40 s of tracing; the demo's plumbing test runs this path (compiled, heads model) too
def test_compiled_check_runs_the_backbone_of_a_model_with_heads_on_the_same_trajectory(tmp_path):
    """σ is not needed to judge stability, so a heads model compiles as its backbone: same forces, same MD."""
    torch.manual_seed(0)
    backbone = make_model("L1-corr3", seed=0)
    train, valid = graphs(labelled(24, seed=1, periodic=True)), graphs(labelled(12, seed=2, periodic=True))
    uq = build_uq_potential(backbone, train, valid, steps=40, n_heads=4, hidden=8)
    start = molecule("CH3CH2OH")
    runs = {mode: stability_test(uq, [start], 500.0, 0.01, replicas=2, seed=3, compile=mode,
                                 trajectory=tmp_path / f"{mode or 'eager'}.xyz") for mode in (False, "aot_eager")}
    eager, compiled = runs[False], runs["aot_eager"]
    assert compiled["compiled"] and compiled["compile_s"] > 0 and not eager["compiled"] and eager["compile_s"] == 0
    assert compiled["steps"] == eager["steps"] == 20 and compiled["criterion"].startswith("bond length")
    assert compiled["time_to_failure_ps"] == eager["time_to_failure_ps"]
    for system in (0, 1):
        ours, theirs = (read_system_frames(tmp_path / f"{name}.xyz", system) for name in ("aot_eager", "eager"))
        assert len(ours) == len(theirs) > 1
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)
