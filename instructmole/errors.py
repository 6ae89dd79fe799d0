"""The one base of every error InstructMoLE raises for bad input, and the one config error.

Callers (the nodes, the command lines, notebooks) catch ``InstructMoLEError`` and show its message,
which is one sentence naming the input and the way out; anything else escaping the library is a
bug. It subclasses ``ValueError`` so that code written against the earlier ``ValueError``
subclasses keeps working. The trainer's errors (``training.errors``) are subclasses too, and its
config errors are this ``ConfigError``: one family, caught in one place.
"""

from __future__ import annotations

__all__ = ["ConfigError", "InstructMoLEError"]


class InstructMoLEError(ValueError):
    """Bad input to InstructMoLE: a file, a config, a council, a rule, a model that does not fit."""


class ConfigError(InstructMoLEError):
    """A configuration is invalid: an adapter's MoLE config (or a file's copy of one), or a training
    config's file, key or value."""
