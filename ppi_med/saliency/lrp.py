"""Layer-wise relevance propagation, epsilon-plus composite with batch-norm merging.

Rules (Montavon et al.'s "LRP-epsilon / z-plus" composite):

* convolutions: z-plus, ``R_i = sum_j (w+_ij a+_i + w-_ij a-_i) / z+_j R_j``;
* dense layers: epsilon, ``R_i = sum_j a_i w_ij / (z_j + eps sign z_j) R_j``;
* a batch norm that directly follows a convolution or dense layer is merged into it first (the canonical
  form: ``W' = s W``, ``b' = s b + t``), then the rule applies to the merged layer;
* activations, pooling, additions and reshapes pass relevance on as the gradient does.

Each rule is written as a "gradient trick": the layer's forward value is kept, and a detached ratio makes
the backward carry ``R / a``, so relevance at the input is ``x * grad``. LRP is post-hoc: the map is
detached, the model runs in eval mode for it and is put back as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .core import Tracer, as_target, frozen_buffers, score_gradient
from .rules import RULES, Linear, UnsupportedLayerError, is_leaf, rule_for

__all__ = ["LRPTracer", "lrp"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = nn.modules.batchnorm._BatchNorm


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def _bn_affine(bn: _BN, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = [1, -1] + [1] * (ndim - 2)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale.view(shape), shift.view(shape)


class LRPTracer(Tracer):
    """Epsilon-plus LRP; it runs its own eval-mode forward inside :meth:`saliency`.

    Args:
        model: the classifier (ReLU-family activations expected, as for any LRP rule set).
        epsilon: stabiliser of the epsilon and z-plus denominators.
    """

    differentiable = False

    def __init__(self, model: nn.Module, epsilon: float = 1e-6) -> None:
        super().__init__(model)
        self.epsilon = epsilon
        for name, module in model.named_modules():
            own = next(module.parameters(recurse=False), None) is not None
            if (is_leaf(module) or own) and not isinstance(module, (*_CONV, nn.Linear, _BN)):
                rule = rule_for(module, RULES)
                if rule is None or (own and not isinstance(rule, Linear)):
                    raise UnsupportedLayerError(f"LRP has no rule for layer '{name}' ({type(module).__name__})")

    def _pairs(self, x: torch.Tensor) -> dict[nn.Module, nn.Module]:
        """Linear layers whose output goes straight into a batch norm, found by a dry forward."""
        last: dict[str, object] = {}
        pairs: dict[nn.Module, nn.Module] = {}

        def hook(module, inputs, output):
            if isinstance(module, _BN) and last and inputs[0] is last["out"]:
                pairs[last["module"]] = module
            if isinstance(module, (*_CONV, nn.Linear)):
                last.update(module=module, out=output)

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if is_leaf(m)]
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return pairs

    def _attach(self, pairs: dict[nn.Module, nn.Module]) -> None:
        eps = self.epsilon
        merged_bn = set(pairs.values())

        def linear_hook(module, inputs, z):
            a = inputs[0]
            bn = pairs.get(module)
            if bn is not None:
                scale, shift = _bn_affine(bn, z.ndim)
                y = z * scale + shift
                w_scale = scale.reshape(-1, *([1] * (module.weight.ndim - 1)))
            else:
                y, w_scale = z, 1.0
            w = module.weight * w_scale
            if isinstance(module, nn.Linear):
                zz = nn.functional.linear(a, w)
                ratio = (y / _stab(y, eps)).detach()
            else:
                zz = module._conv_forward(a.clamp(min=0), w.clamp(min=0), None) + module._conv_forward(
                    a.clamp(max=0), w.clamp(max=0), None
                )
                ratio = (y / _stab(zz, eps)).detach()
            return z.detach() + (zz - zz.detach()) * ratio

        def merged_bn_hook(module, inputs, y):
            z = inputs[0]
            return y.detach() + (z - z.detach())

        for m in self.model.modules():
            if isinstance(m, (*_CONV, nn.Linear)):
                self._handles.append(m.register_forward_hook(linear_hook))
            elif m in merged_bn:
                self._handles.append(m.register_forward_hook(merged_bn_hook))

    def saliency(self, logits, x, target, *, create_graph=False, retain_graph=None):
        if create_graph:
            raise ValueError("LRP saliency is post-hoc only: create_graph=True is not supported")
        return self.explain(x, target)

    def attribute(
        self, inputs: torch.Tensor, target: int | torch.Tensor, *, create_graph: bool = False
    ) -> torch.Tensor:
        """LRP runs its own forward, in eval mode with its rules attached; the map is detached (post-hoc)."""
        if create_graph:
            raise ValueError("LRPTracer is post-hoc only: create_graph=True is not supported")
        return self.explain(inputs, target)

    def explain(self, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
        """Run the eval-mode LRP forward and backward; returns the detached relevance map."""
        modes = {m: m.training for m in self.model.modules()}
        x_leaf = x.detach().requires_grad_(True)
        try:
            self.model.eval()
            with torch.enable_grad(), frozen_buffers(self.model):
                self._attach(self._pairs(x_leaf))
                try:
                    out = self.model(x_leaf)
                finally:
                    for h in self._handles:
                        h.remove()
                    self._handles.clear()
                grad = score_gradient(out, as_target(target, out), x_leaf)
        finally:
            for m, mode in modes.items():
                m.train(mode)
        return (grad * x_leaf).detach()


def lrp(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor, *, epsilon: float = 1e-6) -> torch.Tensor:
    """Epsilon-plus LRP relevance of class ``target`` for the batch ``x`` (detached, shape of ``x``).

    Raises:
        UnsupportedLayerError: a layer outside the rule set (e.g. attention).
        ValueError: a target out of range.
    """
    return LRPTracer(model, epsilon=epsilon).explain(x, target)
