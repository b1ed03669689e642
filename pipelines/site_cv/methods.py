"""Site CV's methods: the ``--methods`` list, each method's bundle overrides, and its label on the bundle.

A method is one of :mod:`ppi_med.methods` (a PPI variant of :mod:`ppi_med.ppi.variants`, a comparator, or
``<variant>+<comparator>``). It sets only the ``ppi`` fields it names, on top of the bundle's own ``ppi``; its label,
which names it in the tables, the cell keys and MLflow, is :func:`ppi_med.ppi.variant_label` of the configuration
it trains, read against the bundle's ``ppi`` without the user's ``ppi`` overrides (but with the recipe's warm-up,
ramp and contrast classes as run). So ``ppi`` and ``ppi_wbp`` are one method, ``ppi_wbp`` on the GA bundle keeps
its name, ``--ppi#warmup_epochs 0`` leaves it so, and ``--ppi#mode detached`` shows in the label
(``ppi_wbp:mode=detached``) rather than passing as ``ppi_wbp``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ppi_med.methods import method_settings, split_comparator
from ppi_med.methods import split_methods as split_method_list
from ppi_med.ppi import variant, variant_label
from ppi_med.ppi.variants import RECIPE_FIELDS
from ppi_med.robust import RobustConfig

from .config import SiteCVError

__all__ = ["method_labels", "method_overrides", "split_methods"]


def split_methods(text: str) -> list[str]:
    """The ``--methods`` list (:func:`ppi_med.methods.split_methods`).

    Raises:
        SiteCVError: an empty list, or a ``<field>=<value>`` with no method before it.
    """
    try:
        return split_method_list(text)
    except ValueError as err:
        raise SiteCVError(str(err)) from err


def method_overrides(method: str) -> dict[str, Any]:
    """The bundle overrides that make a method.

    Args:
        method: a method of :mod:`ppi_med.methods` (``baseline``, ``ppi_wbp``, ``ppi:mode=detached``,
            ``random_mask``, ``groupdro``, ``ppi_wbp+dfr`` ...).

    Returns:
        ``ppi#<field>`` for each PPI field the method sets, and ``robust#method``.

    Raises:
        SiteCVError: an unknown method, field or value (the grammar is said).
    """
    try:
        settings = method_settings(method)
    except ValueError as err:
        raise SiteCVError(str(err)) from err
    return {f"{part}#{k}": v for part, fields_ in settings.items() for k, v in fields_.items()}


def method_labels(
    methods: Sequence[str], bundle_ppi: Mapping[str, Any], ppi: Mapping[str, Any], where: str = "the bundle"
) -> list[str]:
    """Each method's label: the configuration it trains, named against the bundle's own ``ppi``.

    Args:
        methods: the methods as given.
        bundle_ppi: the bundle's resolved ``ppi`` without the user's ``ppi`` overrides: what labels are read
            against, but for :data:`ppi_med.ppi.variants.RECIPE_FIELDS`, taken from ``ppi`` (a shorter warm-up
            is the recipe's, as in :attr:`ppi_med.ppi.PPIConfig.method`).
        ppi: the bundle's resolved ``ppi`` with every user override (what a method's fields apply to).
        where: the bundle, for messages.

    Returns:
        One label per method, in order (``ppi`` -> ``ppi_wbp``, ``groupdro`` -> ``groupdro``).

    Raises:
        SiteCVError: a method the grammar or the configuration refuses, a bundle ``ppi`` that is no
            configuration, or two methods that train the same configuration.
    """
    try:
        with_overrides = variant(dict(ppi))
        # the recipe's fields (warm-up, ramp, contrast classes) as the study runs them, like PPIConfig.method
        base = replace(variant(dict(bundle_ppi)), **{f: getattr(with_overrides, f) for f in RECIPE_FIELDS})
    except ValueError as err:
        raise SiteCVError(f"{where}: its ppi is not a PPI configuration: {err}") from err
    labels: dict[str, str] = {}
    for method in methods:
        try:
            ppi_part, comparator = split_comparator(method)
            label = variant_label(variant(ppi_part, with_overrides), base)
            label = RobustConfig(method=comparator).method_name(label)
        except ValueError as err:
            raise SiteCVError(str(err)) from err
        if label in labels:
            raise SiteCVError(
                f"methods '{labels[label]}' and '{method}' train the same configuration on {where} ({label})"
            )
        labels[label] = method
    return list(labels)
