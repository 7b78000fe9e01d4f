"""Checks of the paths a command will write to, made before any work."""

from __future__ import annotations

import os
from pathlib import Path

from equiforce.errors import ConfigError


def check_output_directory(path: str | os.PathLike, option: str) -> None:
    """An output directory that is an existing file (or lies under one) is named by its option before any work
    (``mkdir`` would fail after it, with only "File exists")."""
    for parent in [Path(path), *Path(path).parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a directory; give a directory")
            return
