"""Training: the YAML config, the loss, EMA, pickle-free checkpoints and the epoch loop.

Names are resolved lazily so that importing a light submodule (``equiforce.train.metrics``, used by
``equiforce.evaluate``) does not pull in the trainer, which itself imports ``equiforce.evaluate``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TrainConfig": "config", "load_config": "config", "fit": "trainer", "train": "trainer",
            "train_configs": "trainer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"equiforce.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'equiforce.train' has no attribute {name!r}")
