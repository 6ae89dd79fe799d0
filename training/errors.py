"""The trainer's error types: every user mistake is one of these, with one sentence that names
the input (config key, manifest line, file) and the way out. The command line prints the
sentence and exits 2; anything else is a bug and keeps its traceback.

They are one family with the core's: ``TrainingError`` is an ``InstructMoLEError``, and a config
mistake is the core's own ``ConfigError`` (one class, whether an adapter's config or the training
config is wrong), so a caller catches ``InstructMoLEError`` and has every user mistake.
"""

from __future__ import annotations

from instructmole.errors import ConfigError, InstructMoLEError

__all__ = ["CheckpointError", "ConfigError", "DataError", "ModelLoadError", "TrainingError"]


class TrainingError(InstructMoLEError):
    """Base of the trainer's own errors for bad input (a config error is a ``ConfigError``)."""


class DataError(TrainingError):
    """The manifest or one of its rows (or images) is unusable."""


class ModelLoadError(TrainingError):
    """Model files are missing, of the wrong kind, or do not fit each other."""


class CheckpointError(TrainingError):
    """A checkpoint to resume from is missing, incomplete or from another run."""
