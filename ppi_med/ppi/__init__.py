"""Proactive Pseudo-Intervention: causal masks from saliency and the contrastive training objective."""

from __future__ import annotations

from .masks import (
    MASKS,
    adaptive_sigma,
    box_mask,
    dilate,
    hard_point_mask,
    make_mask,
    normalize,
    soft_mask,
    topk_mask,
)
from .objective import GUIDES, PPIConfig, PPIObjective, PPIOutput, adversarial_partners, contrast_loss, method_fields

__all__ = [
    "GUIDES",
    "MASKS",
    "PPIConfig",
    "PPIObjective",
    "PPIOutput",
    "adaptive_sigma",
    "adversarial_partners",
    "box_mask",
    "contrast_loss",
    "dilate",
    "hard_point_mask",
    "make_mask",
    "method_fields",
    "normalize",
    "soft_mask",
    "topk_mask",
]
