"""Errors a user can act on.

Every `SapoError` carries a one-line message naming the culprit and, where there is one,
a hint naming the fix. The CLI prints both and exits 1; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class SapoError(Exception):
    """A problem with the user's input or environment, with the fix in `hint`."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(SapoError):
    """A preset, config file or override is unknown or invalid."""


class DataError(SapoError):
    """The training data cannot be found, read or used."""


class ModelError(SapoError):
    """The model, tokenizer or quantisation backend cannot be loaded."""


class RunDirError(SapoError):
    """The run directory is missing, not a run, or would be overwritten."""


class TrainingDiverged(SapoError):
    """The loss, gradients or EMA samples stopped being finite numbers."""


class StorageError(SapoError):
    """A run's file could not be written or read: full disk, read-only folder, damaged file."""
