"""Numbers as the study's reports write them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_sd", "p_value"]


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` (sample sd) of the finite values, three decimals; one value alone; ``n/a`` for none."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def p_value(p: float) -> str:
    """A p-value with three decimals, ``< 0.001`` below that, ``-`` where there is none (NaN)."""
    return "-" if not np.isfinite(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"
