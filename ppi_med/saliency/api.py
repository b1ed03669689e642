"""One entry point for every saliency method, by name."""

from __future__ import annotations

import torch
from torch import nn

from .core import Tracer
from .gradcam import GradCAMTracer
from .gradient import GradientTracer
from .lrp import LRPTracer
from .wbp import WBPTracer

__all__ = ["METHODS", "TRACERS", "compute", "make_tracer"]

#: every method by name: the one registry the method list, PPI, export, evaluation and site CV read
TRACERS = {
    "wbp": WBPTracer,
    "gradient": GradientTracer,
    "input_x_gradient": lambda model, **kw: GradientTracer(model, times_input=True, **kw),
    "gradcam": GradCAMTracer,
    "lrp": LRPTracer,
}
METHODS = tuple(TRACERS)


def make_tracer(method: str, model: nn.Module, **kwargs) -> Tracer:
    """The tracer of ``method`` for ``model``.

    Args:
        method: one of :data:`METHODS`.
        model: the classifier.
        **kwargs: method options (``layer`` for gradcam, ``epsilon`` for lrp, ``rules`` for wbp).

    Raises:
        ValueError: an unknown method or an option the method does not take.
    """
    if method not in TRACERS:
        raise ValueError(f"unknown saliency method '{method}'; choose one of {', '.join(METHODS)}")
    try:
        return TRACERS[method](model, **kwargs)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(f"saliency method '{method}' does not take option(s) {sorted(kwargs)}") from err
        raise


def compute(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor,
    *,
    create_graph: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Saliency map of ``target`` for the batch ``x`` by ``method``.

    The model's mode, parameters, gradients and buffers are left as they were.

    Args:
        method: ``wbp``, ``gradient``, ``input_x_gradient``, ``gradcam`` or ``lrp``.
        model: a classifier returning logits ``(N, M)``.
        x: the input batch (2D or 3D images, channels first).
        target: an int or a LongTensor of one class per sample.
        create_graph: keep the map differentiable (not for ``lrp``).
        **kwargs: method options, see :func:`make_tracer`.

    Returns:
        A tensor of the shape of ``x``.

    Raises:
        ValueError: unknown method, bad target, or ``create_graph`` with a post-hoc method.
        UnsupportedLayerError: the model has a layer the method cannot handle.
    """
    tracer = make_tracer(method, model, **kwargs)
    if create_graph and not tracer.differentiable:
        raise ValueError(f"saliency method '{method}' is post-hoc only: create_graph=True is not supported")
    return tracer.attribute(x, target, create_graph=create_graph)
