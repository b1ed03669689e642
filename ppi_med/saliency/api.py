"""One entry point for every saliency method, by name."""

from __future__ import annotations

import torch
from torch import nn

from .core import Tracer, frozen_buffers, input_requiring_grad
from .gradcam import GradCAMTracer
from .gradient import GradientTracer
from .lrp import LRPTracer
from .wbp import WBPTracer

__all__ = ["METHODS", "make_tracer", "compute"]

METHODS = ("wbp", "gradient", "input_x_gradient", "gradcam", "lrp")


def make_tracer(method: str, model: nn.Module, **kwargs) -> Tracer:
    """The tracer of ``method`` for ``model``.

    Args:
        method: one of :data:`METHODS`.
        model: the classifier.
        **kwargs: method options (``layer`` for gradcam, ``epsilon`` for lrp, ``rules`` for wbp).

    Raises:
        ValueError: an unknown method or an option the method does not take.
    """
    factories = {
        "wbp": lambda: WBPTracer(model, **kwargs),
        "gradient": lambda: GradientTracer(model, **kwargs),
        "input_x_gradient": lambda: GradientTracer(model, times_input=True, **kwargs),
        "gradcam": lambda: GradCAMTracer(model, **kwargs),
        "lrp": lambda: LRPTracer(model, **kwargs),
    }
    if method not in factories:
        raise ValueError(f"unknown saliency method '{method}'; choose one of {', '.join(METHODS)}")
    try:
        return factories[method]()
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
    xg = input_requiring_grad(x)
    with torch.enable_grad():
        if isinstance(tracer, LRPTracer):
            return tracer.explain(xg, target)
        with frozen_buffers(model), tracer:
            logits = model(xg)
        return tracer.saliency(logits, xg, target, create_graph=create_graph)
