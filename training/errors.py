"""The trainer's error types: every user mistake is one of these, with one sentence that names
the input (config key, manifest line, file) and the way out. The command line prints the
sentence and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "ModelLoadError", "TrainingError"]


class TrainingError(Exception):
    """Base of every error the trainer raises for bad input."""


class ConfigError(TrainingError):
    """A config file, key or value is wrong (unknown key, bad value, missing path)."""


class DataError(TrainingError):
    """The manifest or one of its rows (or images) is unusable."""


class ModelLoadError(TrainingError):
    """Model files are missing, of the wrong kind, or do not fit each other."""


class CheckpointError(TrainingError):
    """A checkpoint to resume from is missing, incomplete or from another run."""
