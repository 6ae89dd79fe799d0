"""The one base of every error InstructMoLE raises for bad input.

Callers (the nodes, the command line, notebooks) catch ``InstructMoLEError`` and show its message,
which is one sentence naming the input and the way out; anything else escaping the library is a
bug. It subclasses ``ValueError`` so that code written against the earlier ``ValueError``
subclasses keeps working.
"""

from __future__ import annotations

__all__ = ["InstructMoLEError"]


class InstructMoLEError(ValueError):
    """Bad input to InstructMoLE: a file, a config, a council, a rule, a model that does not fit."""
