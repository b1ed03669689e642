"""Vanilla gradient and input x gradient saliency."""

from __future__ import annotations

from .core import Tracer, as_target, score_gradient

__all__ = ["GradientTracer"]


class GradientTracer(Tracer):
    """Gradient of the target logit w.r.t. the input, optionally times the input.

    Args:
        model: the classifier.
        times_input: return ``x * grad`` (input x gradient) instead of ``grad``.
    """

    def __init__(self, model, times_input: bool = False) -> None:
        super().__init__(model)
        self.times_input = times_input

    def saliency(self, logits, x, target, *, create_graph=False, retain_graph=None):
        target = as_target(target, logits)
        grad = score_gradient(logits, target, x, create_graph=create_graph, retain_graph=retain_graph)
        s = grad * x if self.times_input else grad
        return s if create_graph else s.detach()
