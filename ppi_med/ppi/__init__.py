"""Proactive Pseudo-Intervention: causal masks from saliency and the contrastive training objective."""

from __future__ import annotations

from .masks import (
    MASKS,
    adaptive_sigma,
    box_mask,
    hard_point_mask,
    make_mask,
    normalize,
    soft_mask,
    topk_mask,
)
from .objective import PPIConfig, PPIObjective, PPIOutput, contrast_loss

__all__ = [
    "MASKS",
    "PPIConfig",
    "PPIObjective",
    "PPIOutput",
    "adaptive_sigma",
    "box_mask",
    "contrast_loss",
    "hard_point_mask",
    "make_mask",
    "normalize",
    "soft_mask",
    "topk_mask",
]
