"""Errors: one base exception and a few typed subclasses.

Every message names the argument, what was expected and what was received, in the form
``where: argument 'name' expected ..., got ...``. Validation happens when something is
registered, never inside ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "AdapterError",
    "LayerTypeError",
    "OptionError",
    "ShapeError",
    "StateError",
    "UnknownNameError",
    "WeightcondError",
]


class WeightcondError(Exception):
    """Base class of every error raised by weightcond."""


class OptionError(WeightcondError, ValueError):
    """An argument or option has a value outside what is accepted."""


class UnknownNameError(OptionError, KeyError):
    """A name (transform, preset, placement, side, map, option) is not one of the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ShapeError(WeightcondError, ValueError):
    """A dimension does not fit: a rank larger than the dimension, a block size that does
    not divide it, a transform built for another size."""


class LayerTypeError(WeightcondError, TypeError):
    """The layer (or object passed as a layer or transform) has a type that is not supported."""


class StateError(WeightcondError, RuntimeError):
    """The operation does not fit the layer's current state (e.g. a second update)."""


class AdapterError(WeightcondError, ValueError):
    """A saved adapter cannot be read or does not fit the model: a missing, truncated or
    foreign file, a malformed configuration, missing or extra tensors, other shapes, layers
    or transforms."""


def _choices(choices: Iterable[Any]) -> str:
    return ", ".join(repr(c) for c in choices)


def check_choice(where: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise :class:`UnknownNameError`."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise UnknownNameError(
            f"{where}: argument '{name}' expected one of {_choices(choices)}, got {value!r}"
        )
    return value


def check_int(where: str, name: str, value: Any, *, low: int = 1, high: int | None = None,
              what: str = "") -> int:
    """Return ``value`` if it is an int in ``[low, high]``; else raise.

    Values outside the range raise :class:`ShapeError` when ``high`` comes from a dimension
    (``what`` names it), :class:`OptionError` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{where}: argument '{name}' expected an int, got {value!r}")
    if value < low:
        raise OptionError(f"{where}: argument '{name}' expected an int >= {low}, got {value}")
    if high is not None and value > high:
        bound = f"<= {high}" + (f" ({what})" if what else "")
        raise ShapeError(f"{where}: argument '{name}' expected an int {bound}, got {value}")
    return value


def check_bool(where: str, name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise :class:`OptionError`."""
    if not isinstance(value, bool):
        raise OptionError(f"{where}: argument '{name}' expected a bool, got {value!r}")
    return value


def check_positive(where: str, name: str, value: Any) -> float:
    """Return ``float(value)`` if it is a finite real number > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or value == float("inf"):
        raise OptionError(f"{where}: argument '{name}' expected a finite number > 0, got {value!r}")
    return float(value)
