"""Every method's name, read back into the settings that make it: PPI's fields and the comparator's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .ppi import method_fields
from .robust import COMPARATORS

__all__ = ["method_settings"]


def method_settings(name: str, saliencies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{"ppi": PPIConfig fields, "robust": RobustConfig fields}`` of a method name.

    Args:
        name: a PPI name of :func:`ppi_med.ppi.method_fields` (``baseline``, ``ppi_wbp``, ``random_mask`` ...),
            a comparator (``groupdro``, ``jtt``, ``dfr``), or ``<PPI name>+<comparator>`` (``ppi_wbp+dfr``: DFR
            on the PPI model).
        saliencies: the saliency method names.

    Raises:
        ValueError: an unknown name (what is allowed is said).
    """
    base, plus, comparator = name.partition("+")
    if not plus and base in COMPARATORS[1:]:
        return {"ppi": {"enabled": False}, "robust": {"method": base}}
    if plus and comparator not in COMPARATORS[1:]:
        raise ValueError(f"unknown method '{name}': after '+' comes one of {', '.join(COMPARATORS[1:])}")
    return {"ppi": method_fields(base, saliencies), "robust": {"method": comparator if plus else "erm"}}
