"""Plain JSON for files anything must read: no NaN or infinity (written as null)."""

from __future__ import annotations

from typing import Any

import numpy as np


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (a Spearman ρ of one structure, an empty mean) as ``None``: plain
    JSON has no NaN, and a journal "read by anything" must parse in any JSON reader."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if np.isfinite(value) else None
    return value
