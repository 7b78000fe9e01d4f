"""`equiforce learn` configs: a mistyped key is an error naming it; inconsistent choices are refused."""

from __future__ import annotations

import pytest
import yaml

from equiforce.active.config import load_learn_config, parse_learn_config
from equiforce.cli import main
from equiforce.errors import ConfigError
from tests.active_helpers import tiny_config


def test_tiny_config_is_valid_and_defaults_fill_in(tmp_path):
    cfg = parse_learn_config(tiny_config(tmp_path))
    assert cfg.oracle.resolved() == ("ase.calculators.emt:EMT", {})
    assert cfg.select.strategy == "uncertainty_fps" and cfg.uq.method == "heads"
    default = parse_learn_config({"start": {"structures": ["molecule:H2O"]}})
    assert default.oracle.resolved()[0] == "tblite.ase:TBLite"  # xTB is the default oracle
    assert default.training.max_time == 120.0  # a round always has a budget
    assert (default.start.torsions, default.explore.torsions) == (8, 4)  # torsional moves on by default
    assert default.explore.restart_from == "labelled_md_snapshots"  # turned conformers do not seed MD


@pytest.mark.parametrize(("section", "key"), [("stop", "max_oracle_cals"), ("explore", "temperature"),
                                              ("training", "lerning_rate"), ("oracle", "kwarg")])
def test_unknown_key_is_an_error_naming_it(tmp_path, section, key):
    config = tiny_config(tmp_path)
    config[section][key] = 1
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        parse_learn_config(config, "cfg.yaml")


def test_unknown_top_level_section(tmp_path):
    config = {**tiny_config(tmp_path), "exploration": {}}
    with pytest.raises(ConfigError, match="exploration"):
        parse_learn_config(config)


def test_inconsistent_choices(tmp_path):
    with pytest.raises(ConfigError, match="oracle.calculator"):
        parse_learn_config(tiny_config(tmp_path, oracle={"name": "custom"}))
    with pytest.raises(ConfigError, match="num_layers"):
        parse_learn_config(tiny_config(tmp_path, model={"num_layers": 1}))
    with pytest.raises(ConfigError, match="start.structures"):
        parse_learn_config(tiny_config(tmp_path, start={"structures": []}))
    with pytest.raises(ConfigError, match="temperatures"):
        parse_learn_config(tiny_config(tmp_path, explore={"temperatures": [-5]}))


def test_cli_reports_the_key_and_file(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    config["select"]["per_rnd"] = 3
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["learn", str(path)]) == 2
    err = capsys.readouterr().err
    assert "select.per_rnd" in err and "learn.yaml" in err
    assert main(["learn", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not an equiforce learn run directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        load_learn_config(tmp_path / "missing.yaml")


def test_missing_oracle_package_is_a_clear_error(tmp_path, capsys):
    config = tiny_config(tmp_path / "run", oracle={"name": "custom", "calculator": "no_such_pkg.calc:Calc"})
    path = tmp_path / "learn.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["learn", str(path), "--no-progress"]) == 2
    assert "oracle.calculator: cannot import 'no_such_pkg.calc'" in capsys.readouterr().err
