"""The bundle overrides of one method of the study: the one place that turns a method name into arguments.

Kept apart so the study can move to a single grammar of PPI variants without touching the job list.
"""

from __future__ import annotations

import json

from ppi_med.methods import method_settings
from ppi_med.saliency import METHODS

__all__ = ["method_args"]


def method_args(method: str, mask: str = "soft") -> list[str]:
    """The bundle overrides of a method name: PPI's fields, and the comparator's when it names one.

    Args:
        method: a method name of :func:`ppi_med.methods.method_settings` (``baseline``, ``ppi_wbp``,
            ``random_mask``, ``dfr``, ``ppi_wbp+dfr`` ...).
        mask: the PPI mask, for a method that runs PPI (``soft``, the bundles' default, adds nothing).

    Returns:
        ``--ppi#<field> <value>`` (and ``--robust#<field> <value>``) pairs, values as the bundle CLI reads them.

    Raises:
        ValueError: an unknown method name.
    """
    settings = method_settings(method, METHODS)
    if settings["ppi"].get("enabled", True) and mask != "soft":
        settings["ppi"]["mask"] = mask
    if settings["robust"]["method"] == "erm":  # the bundle's own default: the command line stays as before
        del settings["robust"]
    return [
        arg
        for part, fields in settings.items()
        for k, v in fields.items()
        for arg in (f"--{part}#{k}", v if isinstance(v, str) else json.dumps(v))
    ]
