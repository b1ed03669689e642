"""Numbers as the study's reports write them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_sd"]


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` (sample sd) of the finite values, three decimals; one value alone; ``n/a`` for none."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
