"""One set of checks for the values users hand InstructMoLE, and one way of saying what is wrong.

An adapter's JSON config, the trainer's YAML, a council's JSON, rule text and node inputs all come
from outside. Each check here takes the input's name as its user knows it (``rank``, ``train.lr``),
refuses a value of the wrong type instead of coercing it (``True`` is not 1, ``"8"`` is not 8: a
coerced typo trains the wrong model silently) and raises one sentence: the name, the value cut
short, and what is allowed, which is the way out.

A dataclass field declares its checks in its metadata (``field_spec``): its help text and its bounds,
``min``/``max`` inclusive and ``gt``/``lt`` exclusive, which ``checked`` reads. So a field's default,
help and checks are one declaration, and the core's ``MoLEConfig`` and the trainer's config read
the same declarations. Pure Python (not even torch), so every host can use it.
"""

from __future__ import annotations

import math
import operator
import reprlib
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from .checks import real_number
from .errors import ConfigError, InstructMoLEError

__all__ = [
    "checked",
    "checked_bool",
    "checked_choice",
    "checked_int",
    "checked_real",
    "field_spec",
    "shown",
    "whole_number",
]

Error = type[InstructMoLEError]
_NO_BOUNDS: Mapping[str, Any] = {}


def field_spec(help: str, **checks: Any) -> dict[str, Any]:
    """A field's metadata: its help text and its checks (``min``, ``max``, ``gt``, ``lt``; the trainer
    adds its own keys, such as ``path``, which the checks here ignore)."""
    return {"help": help, **checks}


def shown(value: Any, limit: int = 60) -> str:
    """``repr`` of a user's value, cut short: a 1 MB string, a 10**5000 or a list nested 10,000 deep
    must become a few characters of an error message, not a new error."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"<an integer of {value.bit_length()} bits>"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    try:
        text = short.repr(value)
    except Exception:  # a foreign object's own repr failing, or a recursion too deep for it
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def whole_number(value: Any) -> int | None:
    """``value`` as an int if it is a whole number (an int, a NumPy or 0-d tensor integer), else None.

    Bools, and bool arrays, are not numbers here; nor are floats, even ``4.0``: a config that says
    4.0 where a count belongs was not written with care, and the user is better told."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _bound(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


def _allowed(kind: str, bounds: Mapping[str, Any]) -> str:
    """What ``bounds`` allow, in words: ``an integer from 1 to 256``, ``a number greater than 0``."""
    if "min" in bounds and "max" in bounds:
        return f"{kind} from {_bound(bounds['min'])} to {_bound(bounds['max'])}"
    parts = [f"{words} {_bound(bounds[key])}" for key, words in _BOUND_WORDS if key in bounds]
    if not parts:
        return kind
    return f"{kind} {'of ' if parts[0].startswith('at ') else ''}{' and '.join(parts)}"


_BOUND_WORDS = (("min", "at least"), ("gt", "greater than"), ("max", "at most"), ("lt", "less than"))


def _in_bounds(name: str, number: Any, kind: str, bounds: Mapping[str, Any], error: Error) -> Any:
    too_small = ("min" in bounds and number < bounds["min"]) or ("gt" in bounds and number <= bounds["gt"])
    too_large = ("max" in bounds and number > bounds["max"]) or ("lt" in bounds and number >= bounds["lt"])
    if too_small and isinstance(number, int) and bounds.get("min") == 1:  # a count: 0 and -3 are one mistake
        raise error(f"{name}={shown(number)} must be a positive integer{_range_note(bounds)}")
    if too_small or too_large:
        raise error(
            f"{name}={shown(number)} is too {'small' if too_small else 'large'}: it must be {_allowed(kind, bounds)}"
        )
    return number


def _range_note(bounds: Mapping[str, Any]) -> str:
    return f" (from {_bound(bounds['min'])} to {_bound(bounds['max'])})" if "max" in bounds else ""


def checked_int(name: str, value: Any, bounds: Mapping[str, Any] = _NO_BOUNDS, error: Error = ConfigError) -> int:
    """``value`` as an int within ``bounds``; else ``error`` naming ``name``."""
    number = whole_number(value)
    if number is None:
        raise error(f"{name}={shown(value)} must be {_allowed('an integer', bounds)}")
    return _in_bounds(name, number, "an integer", bounds, error)


def checked_real(name: str, value: Any, bounds: Mapping[str, Any] = _NO_BOUNDS, error: Error = ConfigError) -> float:
    """``value`` as a finite float within ``bounds`` (an int is fine, a bool or a string is not)."""
    number = real_number(value)
    if number is None:
        raise error(f"{name}={shown(value)} must be a number")
    if not math.isfinite(number):  # NaN, inf, or an int beyond any float (10**400)
        raise error(f"{name}={shown(value)} must be a finite number")
    return _in_bounds(name, number, "a number", bounds, error)


def checked_bool(name: str, value: Any, error: Error = ConfigError) -> bool:
    """``value`` if it is True or False (1 and "yes" are not)."""
    if not isinstance(value, bool):
        raise error(f"{name}={shown(value)} must be true or false")
    return value


def checked_choice(name: str, value: Any, choices: tuple[Any, ...], error: Error = ConfigError) -> Any:
    """``value`` if it is one of ``choices``, of the same type (``True`` is not ``1``, nor a tensor anything)."""
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        raise error(f"{name}={shown(value)} must be one of: {', '.join(map(str, choices))}")
    return value


def checked(name: str, value: Any, tp: Any, bounds: Mapping[str, Any] = _NO_BOUNDS, error: Error = ConfigError) -> Any:
    """``value`` checked as a field of type ``tp`` (bool, int, float or a ``Literal`` of choices)."""
    if get_origin(tp) is Literal:
        return checked_choice(name, value, get_args(tp), error)
    if tp is bool:
        return checked_bool(name, value, error)
    if tp is int:
        return checked_int(name, value, bounds, error)
    if tp is float:
        return checked_real(name, value, bounds, error)
    raise TypeError(f"no check for {name} of type {tp!r}")  # a bug in a declaration, not user input
