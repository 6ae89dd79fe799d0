"""Numbers that come from outside (node inputs, ``attach`` arguments) checked before any use.

ComfyUI's own min/max validation compares with ``<`` and ``>``, which lets NaN through, and a
Python caller can pass anything; one NaN strength turns every image into NaN. So every such
number is checked for type, finiteness and range here, with the caller's error type, and the
message names the input, the value and the allowed range.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import InstructMoLEError

__all__ = ["STRENGTH_RANGE", "checked_number", "checked_strength", "real_number"]

# How far an adapter's effect may be turned up or down (negative inverts it). The nodes' sliders
# use the same range.
STRENGTH_RANGE = (-10.0, 10.0)


def real_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else None; an int too large for a
    float (``10**400``) is ``inf``, so range checks refuse it instead of raising ``OverflowError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except (OverflowError, ValueError, TypeError):  # an int with hundreds of digits, an odd Real
        return math.inf


def checked_number(
    name: str, value: Any, low: float, high: float, error: type[InstructMoLEError] = InstructMoLEError
) -> float:
    """``value`` as a float, if it is a real finite number in ``[low, high]``; else ``error``."""
    number = real_number(value)
    if number is None:
        raise error(f"{name} must be a number from {low:g} to {high:g}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(number) or not low <= number <= high:
        raise error(f"{name}={number!r} is out of range: choose a finite number from {low:g} to {high:g}")
    return number


def checked_strength(name: str, value: Any, error: type[InstructMoLEError] = InstructMoLEError) -> float:
    """An expert or LoRA strength: a finite number in ``STRENGTH_RANGE``."""
    return checked_number(name, value, *STRENGTH_RANGE, error=error)
