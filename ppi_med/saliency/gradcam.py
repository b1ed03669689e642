"""Grad-CAM that can be trained through.

MONAI's ``monai.visualize.GradCAM`` is the reference for post-hoc maps, but its hooks switch the model to
eval mode, zero its gradients and run a backward of their own, so it cannot sit inside a training step.
This version takes the feature map from the caller's forward and the class gradient from
``torch.autograd.grad`` (optionally with ``create_graph``), leaving the model and its ``.grad`` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .core import Tracer, as_target, score_gradient
from .rules import is_leaf

__all__ = ["GradCAMTracer", "upsample_cam"]


def _spatial(t: torch.Tensor) -> bool:
    return t.ndim >= 3 and any(s > 1 for s in t.shape[2:])


def upsample_cam(cam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Resize a ``(B, 1, *spatial)`` class map to ``x``'s grid, shape ``(N, C, *x_spatial)``.

    A multi-view network runs its 2D backbone on ``N * V`` views, V being the input's first spatial axis;
    its maps are regrouped per volume and resized view by view.

    Raises:
        ValueError: the map's batch matches neither the input's batch nor its batch times views.
    """
    n = x.shape[0]
    if cam.shape[0] == n and cam.ndim == x.ndim:
        mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[x.ndim]
        up = F.interpolate(cam, size=x.shape[2:], mode=mode, align_corners=False)
    elif x.ndim == 5 and cam.ndim == 4 and cam.shape[0] == n * x.shape[2]:
        up = F.interpolate(cam, size=x.shape[3:], mode="bilinear", align_corners=False)
        up = up.reshape(n, x.shape[2], *x.shape[3:]).unsqueeze(1)
    else:
        raise ValueError(
            f"Grad-CAM feature map of shape {tuple(cam.shape)} cannot be mapped onto an input of shape "
            f"{tuple(x.shape)}; choose another layer"
        )
    return up.expand(-1, x.shape[1], *([-1] * (x.ndim - 2)))


class GradCAMTracer(Tracer):
    """Grad-CAM on a chosen layer, or by default the last layer with a spatial output in the forward.

    Args:
        model: the classifier.
        layer: qualified name of the layer whose output is the feature map (``None``: automatic).

    Raises:
        ValueError: ``layer`` names no module of the model.
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        super().__init__(model)
        modules = dict(model.named_modules())
        if layer is not None and layer not in modules:
            raise ValueError(f"Grad-CAM layer '{layer}' is not a module of {type(model).__name__}")
        self.layer = layer
        self._targets = [modules[layer]] if layer else [m for m in modules.values() if is_leaf(m)]
        self.features: torch.Tensor | None = None

    def __enter__(self) -> GradCAMTracer:
        self.features = None
        for m in self._targets:
            self._handles.append(m.register_forward_hook(self._record))
        return self

    def _record(self, module, inputs, output):
        if isinstance(output, torch.Tensor) and (self.layer is not None or _spatial(output)):
            self.features = output

    def saliency(self, logits, x, target, *, create_graph=False, retain_graph=None):
        target = as_target(target, logits)
        a = self.features
        if a is None or not a.requires_grad:
            raise ValueError("Grad-CAM found no spatial feature map in the traced forward (is grad enabled?)")
        grad = score_gradient(logits, target, a, create_graph=create_graph, retain_graph=retain_graph)
        dims = tuple(range(2, a.ndim))
        weights = grad.mean(dim=dims, keepdim=True)
        cam = F.relu((weights * a).sum(dim=1, keepdim=True))
        s = upsample_cam(cam, x)
        return s if create_graph else s.detach()
