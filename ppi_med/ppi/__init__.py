"""Proactive Pseudo-Intervention: causal masks from saliency, the contrastive training objective, and the grammar
that names its variants."""

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
from .objective import GUIDES, PPIConfig, PPIObjective, PPIOutput, adversarial_partners, contrast_loss
from .variants import VariantError, variant, variant_fields, variant_label

__all__ = [
    "GUIDES",
    "MASKS",
    "PPIConfig",
    "PPIObjective",
    "PPIOutput",
    "VariantError",
    "adaptive_sigma",
    "adversarial_partners",
    "box_mask",
    "contrast_loss",
    "dilate",
    "hard_point_mask",
    "make_mask",
    "normalize",
    "soft_mask",
    "topk_mask",
    "variant",
    "variant_fields",
    "variant_label",
]
