"""Exceptions that tell the user what to fix, not where torch broke."""

from __future__ import annotations


class EquiforceError(Exception):
    """Base class of every error equiforce raises on purpose."""


class DataError(EquiforceError, ValueError):
    """Bad input data. The message names the file, the frame and the field."""

    def __init__(self, message: str, *, source: str | None = None, frame: int | None = None,
                 field: str | None = None) -> None:
        where = []
        if source is not None:
            where.append(f"file {source}")
        if frame is not None:
            where.append(f"frame {frame}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.source, self.frame, self.field = source, frame, field


class ConfigError(EquiforceError, ValueError):
    """An invalid configuration file or option."""


class ModelFileError(EquiforceError, ValueError):
    """A model file that is not a valid equiforce model (or is unsafe to load)."""


class UnknownElementError(EquiforceError, ValueError):
    """A structure holds an element the model was not trained on."""


class TrainingError(EquiforceError):
    """Training cannot go on (e.g. the loss became NaN or infinite); the message says what to change."""
