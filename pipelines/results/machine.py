"""The machine a job ran on, as its ``done.json`` and its ledger entry record it."""

from __future__ import annotations

import os
import platform
import sys
from functools import cache

__all__ = ["machine_info"]


@cache
def machine_info() -> dict[str, object]:
    """CPU architecture and count, Python and torch versions, and the GPU's name (``None`` without one).

    Returns:
        ``{"platform", "cpus", "python", "torch", "gpu"}``; the same for every job of one study run.
    """
    import torch

    return {
        "platform": platform.machine(),
        "cpus": os.cpu_count(),
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
