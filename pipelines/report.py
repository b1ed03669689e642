"""Temporary: ``mean_sd`` where ``pipelines.results`` still imports it from; it lives in :mod:`pipelines.formatting`.

Remove once ``pipelines/results`` imports ``from ...formatting import mean_sd``.
"""

from __future__ import annotations

from .formatting import mean_sd

__all__ = ["mean_sd"]
