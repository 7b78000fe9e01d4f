"""argparse types that refuse impossible numbers when the command is read, not deep inside a run
(``--batch-size 0`` crashed in ``range``, ``--batch-size -1`` evaluated nothing and reported success)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _bounded(kind: type, name: str, ok: Callable[[float], bool]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _bounded(int, "a positive integer", lambda v: v > 0)
non_negative_int = _bounded(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _bounded(float, "a positive number", lambda v: v > 0)
non_negative_float = _bounded(float, "a number >= 0", lambda v: v >= 0)
finite_float = _bounded(float, "a finite number", lambda v: True)
