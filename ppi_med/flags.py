"""Switches given on the command line: ``--linear_reference false`` arrives as the string ``"false"``."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool"]


def as_bool(value: Any, what: str) -> bool:
    """A bundle or config switch as a bool, accepting the strings a command-line override gives.

    Args:
        value: ``True``/``False``, 0/1, or a string such as ``"true"``, ``"false"``, ``"yes"``, ``"off"``.
        what: the switch's name, for the error.

    Raises:
        ValueError: anything else (a typo must not switch a feature on: ``bool("false")`` is ``True``).
    """
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{what} must be true or false, got '{value}'")
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{what} must be true or false, got {value!r}")
