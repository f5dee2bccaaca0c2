"""Argument checks shared by the library's option classes and functions.

Each check returns the value it accepts (as a plain ``int`` / ``float`` / ``bool``) and
otherwise raises a ``ValueError`` that names the argument, says what it must be and shows what
it got. ``bool`` is refused wherever a number is wanted: ``True`` is an ``int`` to Python, but
``epochs=True`` is a mistake, never a count. NumPy and PyTorch integer scalars are accepted as
integers (``numbers.Integral``), as are their floating scalars as numbers (``numbers.Real``).

Written by hand: the checks are a few lines each, and the libraries that validate arguments
(pydantic, attrs validators) would add a dependency and their own error style to every option
class for what these lines do.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _bad(name: str, requirement: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {requirement}, got {value!r}")


def integer(name: str, value: Any, minimum: int = 0, *, requirement: str | None = None) -> int:
    """``value`` as an ``int`` if it is an integer ``>= minimum`` (bools refused).

    ``requirement`` replaces the phrase of the error ("a positive integer" for ``minimum=1``,
    "an integer >= N" otherwise), for arguments whose meaning says more (a number of samples).
    """
    if requirement is None:
        requirement = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise _bad(name, requirement, value)
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1 (bools refused)."""
    return integer(name, value, 1)


def number(
    name: str,
    value: Any,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> float:
    """``value`` as a ``float`` if it is a finite real number (bools, NaN and infinities
    refused) within the bounds given: ``> above`` or ``>= at_least``, ``< below`` or
    ``<= at_most``."""
    if above is not None and at_least is not None or below is not None and at_most is not None:
        raise TypeError("give at most one bound on each side (above or at_least, below or at_most)")
    low = above if above is not None else at_least
    high = below if below is not None else at_most
    if low is not None and high is not None:
        requirement = (
            f"a number in {'(' if above is not None else '['}{low:g}, "
            f"{high:g}{')' if below is not None else ']'}"
        )
    elif above == 0:
        requirement = "a positive number"
    elif low is not None:
        requirement = f"a number {'>' if above is not None else '>='} {low:g}"
    elif high is not None:
        requirement = f"a number {'<' if below is not None else '<='} {high:g}"
    else:
        requirement = "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, requirement, value)
    v = float(value)
    ok = math.isfinite(v)  # (an infinite learning rate or temperature is no setting either)
    ok = ok and (above is None or v > above) and (at_least is None or v >= at_least)
    ok = ok and (below is None or v < below) and (at_most is None or v <= at_most)
    if not ok:
        raise _bad(name, requirement, value)
    return v


def probability(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it lies in ``[0, 1)`` (a dropout rate, a held-out share)."""
    return number(name, value, at_least=0, below=1)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool`` (no truthy strings or numbers)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


__all__ = ["boolean", "integer", "number", "positive_int", "probability"]
