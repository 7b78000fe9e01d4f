"""Config files are read strictly: what YAML would silently drop or misread is an error naming the file."""

from __future__ import annotations

import pytest

from equiforce.active.config import load_learn_config
from equiforce.errors import ConfigError
from equiforce.train.config import load_config
from equiforce.uq.config import load_uq_config
from equiforce.utils.yaml_io import read_yaml_file

LOADERS = [load_config, load_uq_config, load_learn_config]


@pytest.mark.parametrize("load", LOADERS)
def test_a_section_written_twice_is_an_error_naming_it_and_both_lines(tmp_path, load):
    path = tmp_path / "twice.yaml"
    path.write_text("training:\n  epochs: 500\n  lr: 0.002\ndata:\n  train: x.xyz\ntraining:\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML \(line 6, column 1\): key 'training' "
                                          r"appears twice in one mapping \(first on line 1\)"):
        load(path)


@pytest.mark.parametrize("load", LOADERS)
def test_a_file_that_is_not_utf8_is_an_error_naming_the_line(tmp_path, load):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("training:\n  epochs: 5  # eV/Å\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte \d+, line 2\)"):
        load(path)


def test_merge_keys_may_override_what_they_merge_in(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b\n  lr: 0.01\n  epochs: 3\nrun:\n  <<: *b\n  lr: 0.002\n")
    assert read_yaml_file(path)["run"] == {"lr": 0.002, "epochs": 3}
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml_file(tmp_path / "missing.yaml")
