"""Every method's name, read back into the settings that make it: PPI's fields and the comparator's.

A method is a PPI variant of :mod:`ppi_med.ppi.variants` (``baseline``, ``ppi_wbp``,
``ppi:mode=detached,partner=roll``, ``random_mask`` ...), a comparator alone (``groupdro``, ``jtt``, ``dfr``: on the
baseline), or a variant followed by ``+<comparator>`` (``ppi_wbp+dfr``: DFR on the PPI model).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .ppi import PPIConfig, variant, variant_fields, variant_label
from .ppi.variants import split_fields
from .robust import COMPARATORS, RobustConfig
from .saliency import METHODS as SALIENCIES

__all__ = ["method_label", "method_settings", "split_comparator", "split_methods"]

_WORD = re.compile(r"[a-z_]+")
_FIELD_ITEM = re.compile(r"\s*[A-Za-z_]\w*\s*=")


def split_methods(text: str) -> list[str]:
    """A comma-separated list of methods, where the commas between a variant's fields stay in the variant.

    ``baseline,ppi:mode=detached,partner=roll,ppi_wbp+dfr`` -> ``baseline``, ``ppi:mode=detached,partner=roll``,
    ``ppi_wbp+dfr``: an item ``<field>=<value>`` (no method name has ``=`` before a ``:``) continues the one before.

    Raises:
        ValueError: an empty list, or a ``<field>=<value>`` with no method before it.
    """
    methods: list[str] = []
    for item in split_fields(text):
        if _FIELD_ITEM.match(item) and ":" not in item.split("=", 1)[0]:
            if not methods or ":" not in methods[-1]:
                raise ValueError(f"methods '{text}': '{item}' follows no <method>:<field>=<value>")
            methods[-1] += "," + item
        else:
            methods.append(item)
    if not methods:
        raise ValueError(f"expected a comma-separated list of methods, got '{text}'")
    return methods


def split_comparator(name: str) -> tuple[str, str]:
    """A method's PPI variant and its comparator: ``groupdro`` -> (``baseline``, ``groupdro``), ``ppi_wbp+dfr`` ->
    (``ppi_wbp``, ``dfr``), ``ppi:fill=zero`` -> (``ppi:fill=zero``, ``erm``).

    Raises:
        ValueError: a word after the last ``+`` that is no comparator.
    """
    if name in COMPARATORS[1:]:
        return "baseline", name
    head, plus, tail = name.rpartition("+")
    if not plus or not _WORD.fullmatch(tail):  # a '+' inside a value (w_con=1e+1) is not a comparator's
        return name, "erm"
    if tail not in COMPARATORS[1:]:
        raise ValueError(f"unknown method '{name}': after '+' comes one of {', '.join(COMPARATORS[1:])}")
    return head, tail


def method_settings(name: str, saliencies: Sequence[str] = SALIENCIES) -> dict[str, dict[str, Any]]:
    """``{"ppi": PPIConfig fields, "robust": RobustConfig fields}`` of a method name.

    Args:
        name: a method (module docstring); the ``ppi`` part holds only the fields the name sets, so that it
            applies on top of a bundle's own ``ppi``.
        saliencies: the saliency method names.

    Raises:
        ValueError: an unknown name, field or value (what is allowed is said).
    """
    ppi_part, comparator = split_comparator(name)
    return {"ppi": variant_fields(ppi_part, saliencies), "robust": {"method": comparator}}


def method_label(
    name: str, base: PPIConfig | Mapping[str, Any] | None = None, saliencies: Sequence[str] = SALIENCIES
) -> str:
    """The canonical name of a method on ``base``: its variant's :func:`ppi_med.ppi.variant_label`, then the
    comparator as :meth:`ppi_med.robust.RobustConfig.method_name` names it (``ppi`` -> ``ppi_wbp``,
    ``ppi:mask=box+dfr`` -> ``ppi_wbp_box+dfr``, ``groupdro`` -> ``groupdro``).

    Raises:
        ValueError: what :func:`method_settings` or the configuration refuses.
    """
    ppi_part, comparator = split_comparator(name)
    label = variant_label(variant(ppi_part, base, saliencies), base)
    return RobustConfig(method=comparator).method_name(label)
