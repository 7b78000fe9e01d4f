"""equiforce.active.reference: oracle-MD test sets, cached by their parameters."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

from equiforce.active.reference import cached_md_set

EMT = ("ase.calculators.emt:EMT", {})


def test_cached_set_is_read_back_and_generate_false_never_calls_the_oracle(tmp_path):
    start = bulk("Cu", "fcc", a=3.6, cubic=True)
    options = {"temperatures": [300.0], "frames_per_temperature": 2, "interval": 2, "equilibration": 2, "seed": 5}
    with pytest.raises(FileNotFoundError, match=r"oracle_md_\w+\.xyz: no cached oracle MD set"):
        cached_md_set(tmp_path, start, EMT, generate=False, **options)
    assert not list(tmp_path.iterdir())  # nothing made
    made, path = cached_md_set(tmp_path, start, EMT, **options)
    again, path_again = cached_md_set(tmp_path, start, EMT, generate=False, **options)
    assert path_again == path and len(again) == len(made) == 2
    np.testing.assert_allclose(again[1].forces, made[1].forces)
    assert again[0].config_type == "md300K"
    with pytest.raises(FileNotFoundError):  # another seed is another set
        cached_md_set(tmp_path, start, EMT, generate=False, **{**options, "seed": 6})
