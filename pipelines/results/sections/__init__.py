"""The report's sections, one module each: every function turns job outputs into Markdown lines."""

from __future__ import annotations

from .attempts import attempts_section
from .comparators import comparators_section
from .cost import cost_section
from .ga import ga_section
from .goals import goals_section
from .lidc import lidc_section
from .saliency import saliency_section
from .shortcut import outlines_section, shortcut_section
from .sites import sites_section

__all__ = [
    "attempts_section",
    "comparators_section",
    "cost_section",
    "ga_section",
    "goals_section",
    "lidc_section",
    "outlines_section",
    "saliency_section",
    "shortcut_section",
    "sites_section",
]
