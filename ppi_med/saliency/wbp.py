"""Weight Back Propagation (WBP) saliency: ``s_m(v)_k = [W~0]_{mk} v_k`` (docs/DESIGN.md section 3).

WBP runs on an ordinary forward pass. Layers whose Jacobian differs from their WBP rule (secant-slope
activations, normalisation with data statistics) get a forward hook that wraps their output in a node with
two backward behaviours: the layer's exact Jacobian (so a training loss on the same forward gets true
gradients) and the WBP rule (used only while :meth:`WBPTracer.saliency` runs). One forward therefore
serves both the classification loss and the saliency map, which is what keeps PPI cheap, and because the
WBP backward is built from differentiable operations it can itself be trained through
(``create_graph=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from .core import Tracer, as_target, class_score, frozen_buffers, input_requiring_grad
from .rules import RULES, Linear, Rule, UnsupportedLayerError, is_leaf, rule_for

__all__ = ["WBPTracer", "wbp", "check_supported", "UnsupportedLayerError"]


class _Switch:
    """Which backward the rerouting nodes of one tracer take; read at backward time."""

    def __init__(self) -> None:
        self.wbp = False


class _Reroute(torch.autograd.Function):
    """Identity on the layer output ``y``; backward is exact, or ``grad * slope`` straight to the input ``v``."""

    @staticmethod
    def forward(ctx, y, v, slope, switch):  # noqa: D102
        ctx.switch = switch
        ctx.save_for_backward(slope)
        # a clone, not a view: models add residuals in place on these outputs
        return y.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if ctx.switch.wbp:
            (slope,) = ctx.saved_tensors
            return None, grad * slope, None, None
        return grad, None, None, None


def check_supported(model: nn.Module, rules: dict[type[nn.Module], Rule] | None = None) -> dict[str, Rule]:
    """Map every layer of ``model`` that WBP must handle to its rule.

    Args:
        model: any classifier.
        rules: a registry to use instead of :data:`ppi_med.saliency.rules.RULES`.

    Returns:
        ``{qualified layer name: rule}`` for the leaf layers.

    Raises:
        UnsupportedLayerError: a leaf layer, or a container with parameters of its own, has no rule.
    """
    table = RULES if rules is None else rules
    found: dict[str, Rule] = {}
    for name, module in model.named_modules():
        own_params = next(module.parameters(recurse=False), None) is not None
        if not (is_leaf(module) or own_params):
            continue
        rule = rule_for(module, table)
        if rule is None:
            raise UnsupportedLayerError(
                f"WBP has no rule for layer '{name or type(module).__name__}' ({type(module).__name__}); "
                "register one with ppi_med.saliency.register_rule(layer_type, rule)"
            )
        found[name] = rule
    return found


class WBPTracer(Tracer):
    """Attach WBP's rerouting hooks for one forward pass.

    Example:
        >>> with WBPTracer(model) as tracer:
        ...     logits = model(x)  # x.requires_grad is True
        >>> s = tracer.saliency(logits, x, y, create_graph=True)

    Args:
        model: the classifier; it is not modified.
        rules: optional registry overriding the default one.
    """

    def __init__(self, model: nn.Module, rules: dict[type[nn.Module], Rule] | None = None) -> None:
        super().__init__(model)
        self.rules = check_supported(model, rules)
        self.switch = _Switch()

    def __enter__(self) -> WBPTracer:
        modules = dict(self.model.named_modules())
        for name, rule in self.rules.items():
            if isinstance(rule, Linear):
                continue
            module = modules[name]
            if getattr(module, "inplace", False):
                self._handles.append(module.register_forward_pre_hook(self._keep_input))
            self._handles.append(module.register_forward_hook(self._make_hook(rule)))
        return self

    @staticmethod
    def _keep_input(module, inputs):
        # an in-place activation overwrites its input; the secant slope needs it
        module._wbp_input = inputs[0].clone()

    def _make_hook(self, rule: Rule):
        switch = self.switch

        def hook(module, inputs, output):
            v = module.__dict__.pop("_wbp_input", None)
            if v is None:
                v = inputs[0]
            if not torch.is_grad_enabled() or not v.requires_grad:
                return None
            slope = rule.slope(module, v, output)
            if slope is None:
                return None
            return _Reroute.apply(output, v, slope, switch)

        return hook

    def saliency(self, logits, x, target, *, create_graph=False, retain_graph=None):
        target = as_target(target, logits)
        if not x.requires_grad:
            raise ValueError("the traced forward's input must require grad (see input_requiring_grad)")
        self.switch.wbp = True
        try:
            (weights,) = torch.autograd.grad(
                class_score(logits, target),
                x,
                create_graph=create_graph,
                retain_graph=create_graph if retain_graph is None else retain_graph,
            )
        finally:
            self.switch.wbp = False
        s = weights * x
        return s if create_graph else s.detach()


def wbp(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """WBP saliency of class ``target`` for the batch ``x``.

    Args:
        model: a classifier returning logits ``(N, M)``; it is left as it was (mode, parameters, buffers).
        x: input batch, any spatial dimensionality.
        target: an int, or a LongTensor with one class per sample.
        create_graph: keep the saliency differentiable w.r.t. the parameters (and ``x`` if it requires grad).

    Returns:
        Signed saliency ``[W~0]_target * x``, the shape of ``x``.

    Raises:
        UnsupportedLayerError: the model has a layer without a WBP rule.
        ValueError: a target out of range or of the wrong shape.
    """
    xg = input_requiring_grad(x)
    with torch.enable_grad(), frozen_buffers(model), WBPTracer(model) as tracer:
        logits = model(xg)
    with torch.enable_grad():
        return tracer.saliency(logits, xg, target, create_graph=create_graph)
