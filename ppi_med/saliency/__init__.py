"""Saliency maps: WBP (the method's own), gradient, input x gradient, Grad-CAM and LRP.

``compute(method, model, x, target)`` is the entry point; :func:`wbp` is WBP directly; the tracers let a
training step reuse its own forward pass for the saliency (see :mod:`ppi_med.ppi`).
"""

from __future__ import annotations

from .api import METHODS, compute, make_tracer
from .core import Tracer, as_target, frozen_buffers, plain
from .gradcam import GradCAMTracer
from .gradient import GradientTracer
from .guard import ForwardGuard
from .lrp import LRPTracer, lrp
from .rules import (
    FUNCTIONS,
    RULES,
    Linear,
    NormScale,
    Rule,
    Secant,
    UnsupportedLayerError,
    UnsupportedOperationError,
    register_rule,
)
from .wbp import SecantSlopeWarning, WBPTracer, check_supported, wbp

__all__ = [
    "METHODS",
    "compute",
    "make_tracer",
    "wbp",
    "lrp",
    "Tracer",
    "WBPTracer",
    "GradientTracer",
    "GradCAMTracer",
    "LRPTracer",
    "Rule",
    "Linear",
    "Secant",
    "NormScale",
    "RULES",
    "FUNCTIONS",
    "register_rule",
    "check_supported",
    "ForwardGuard",
    "SecantSlopeWarning",
    "UnsupportedLayerError",
    "UnsupportedOperationError",
    "as_target",
    "frozen_buffers",
    "plain",
]
