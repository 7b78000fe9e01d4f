"""Reading the YAML config files strictly: a config that reads differently from how it looks is an error.

PyYAML keeps the last of two equal keys without a word, so a second ``training:`` section silently replaces
the first (its epochs, lr, max_time gone); here that is an error naming the key and both lines.  A file that
is not UTF-8 text is one too, instead of a ``UnicodeDecodeError`` traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from equiforce.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # keys merged in by << may be overridden: that is YAML
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key].line + 1}); "
                "YAML would keep only the last", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any] | Any:
    """The parsed content of a YAML config file (``{}`` for an empty one); every problem a :class:`ConfigError`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}, line {line}); save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        context = f"{err.context}; " if err.context else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {context}{err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return data if data is not None else {}
