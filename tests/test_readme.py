"""The README's example config must stay a valid config (a user copies it first)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from equiforce.train.config import parse_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_is_valid():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no YAML example"
    for block in blocks:
        config = parse_config(yaml.safe_load(block), "README.md")
        assert config.training.max_time is None or config.training.max_time > 0
