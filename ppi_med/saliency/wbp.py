"""Weight Back Propagation (WBP) saliency: ``s_m(v)_k = [W~0]_{mk} v_k`` (docs/DESIGN.md section 3).

WBP runs on an ordinary forward pass. Layers whose Jacobian differs from their WBP rule (secant-slope
activations, normalisation with data statistics) get a forward hook that wraps their output in a node with
two backward behaviours: the layer's exact Jacobian (so a training loss on the same forward gets true
gradients) and the WBP rule (used only while :meth:`WBPTracer.saliency` runs). One forward therefore
serves both the classification loss and the saliency map, which is what keeps PPI cheap, and because the
WBP backward is built from differentiable operations it can itself be trained through
(``create_graph=True``).

Rules attach to modules, so an operation called as a function inside some ``forward`` (``torch.tanh(x)``,
``torch.special.expit(x)``, ``h * h``, ``F.layer_norm(...)``) would be differentiated by autograd instead of
getting its rule. The tracer runs the traced forward under :class:`~ppi_med.saliency.guard.ForwardGuard`,
which allows only the operations listed in :data:`ppi_med.saliency.rules.FUNCTIONS` (linear and shape
operations, piecewise-linear activations through the origin, batch norm with running statistics) and raises
:class:`~ppi_med.saliency.rules.UnsupportedOperationError` for anything else, naming the operation and the
module whose forward called it.

An activation with ``g(0) != 0`` (``nn.Sigmoid``, ``nn.Softplus``) has a secant slope ``g(v) / v`` that grows
without bound as ``v -> 0``; where it passes :data:`SLOPE_WARNING` the tracer warns once per layer
(:class:`SecantSlopeWarning`), naming the layer and the largest slope.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from .conv_input import ConvRoute, conv_geometry, depends_on_input_only
from .core import (
    Reroute,
    RerouteInPlace,
    Switch,
    Tracer,
    as_target,
    frozen_buffers,
    input_requiring_grad,
    score_gradient,
)
from .guard import ForwardGuard
from .rules import Linear, Rule, Secant, UnsupportedLayerError, layer_rules

__all__ = ["WBPTracer", "wbp", "check_supported", "SecantSlopeWarning", "SLOPE_WARNING", "UnsupportedLayerError"]

#: a secant slope above this (ReLU's is 1, tanh's at most 1) makes WBP warn once per layer
SLOPE_WARNING = 100.0

# layers already warned about, so a training loop warns once, not at every step
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class SecantSlopeWarning(UserWarning):
    """WBP's secant slopes of an activation with ``g(0) != 0`` explode near ``v = 0``."""


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
    return layer_rules(model, rules, "WBP")


def _warn_exploding(name: str, module: nn.Module, rule: Secant, v: torch.Tensor, slope: torch.Tensor) -> None:
    """Warn (once per layer) where an activation with ``g(0) != 0`` gives secant slopes above SLOPE_WARNING."""
    g0 = rule.value_at_zero(module, v)
    if g0 == 0:
        return
    largest = float(slope.detach().abs().max())
    if largest <= SLOPE_WARNING:
        return
    _WARNED.add(module)
    warnings.warn(
        f"WBP: the secant slopes g(v) / v of layer '{name}' ({type(module).__name__}) reach {largest:.3g}: "
        f"g(0) = {g0:.3g} is not 0, so g(v) / v grows without bound as v -> 0 and the units whose input is "
        "near 0 dominate the map (it can be orders of magnitude larger than input x gradient). Use an "
        "activation through the origin in this layer (nn.Tanh, nn.SiLU, nn.GELU, nn.ReLU), or read this "
        "network's saliency with another method (input_x_gradient, lrp)",
        SecantSlopeWarning,
        stacklevel=2,
    )


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
        self.switch = Switch()
        self._traced: torch.Tensor | None = None  # the traced forward's input, while it runs

    def __enter__(self) -> WBPTracer:
        modules = dict(self.model.named_modules())
        self._traced = None
        self._handles.append(self.model.register_forward_pre_hook(self._note_input))
        for name, rule in self.rules.items():
            module = modules[name]
            if isinstance(rule, Linear):
                geometry = conv_geometry(module)
                if geometry is not None:
                    self._handles.append(module.register_forward_pre_hook(self._detach_input))
                    self._handles.append(module.register_forward_hook(self._conv_hook(geometry)))
                continue
            if getattr(module, "inplace", False):
                self._handles.append(module.register_forward_pre_hook(self._keep_input))
            self._handles.append(module.register_forward_hook(self._make_hook(name, rule)))
        # registered after the rerouting hooks, so that a layer's rule runs while the guard counts it as inside
        self._guard = ForwardGuard(self.model, set(self.rules), "WBP")
        self._guard.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        guard = self.__dict__.pop("_guard", None)
        if guard is not None:
            guard.__exit__(None, None, None)
            guard.remove()
        self._traced = None
        super().__exit__(*exc)

    def _note_input(self, module, inputs):
        if self._traced is None and inputs and isinstance(inputs[0], torch.Tensor):
            self._traced = inputs[0]

    def _detach_input(self, module, inputs):
        # a convolution reading the input: its input gradient serves the saliency only (Tracer.input_gradient)
        v = inputs[0]
        if self.input_gradient or not torch.is_grad_enabled() or not depends_on_input_only(v, self._traced):
            return None
        module._wbp_entry = v
        return (v.detach(), *inputs[1:])

    def _conv_hook(self, geometry: tuple):
        switch = self.switch

        def hook(module, inputs, output):
            v = module.__dict__.pop("_wbp_entry", None)
            if v is None:
                v = inputs[0]
            if not torch.is_grad_enabled() or not v.requires_grad:
                return None
            return ConvRoute.apply(output, v, module.weight, geometry, switch)

        return hook

    @staticmethod
    def _keep_input(module, inputs):
        # an in-place activation overwrites its input; the secant slope needs it
        module._wbp_input = inputs[0].clone()

    def _make_hook(self, name: str, rule: Rule):
        switch = self.switch
        check = isinstance(rule, Secant)

        def hook(module, inputs, output):
            v = module.__dict__.pop("_wbp_input", None)
            if v is None:
                v = inputs[0]
            if not torch.is_grad_enabled() or not v.requires_grad:
                return None
            # batch norm's node keeps its input and statistics, not its output: no copy needed
            in_place = type(output.grad_fn).__name__ == "NativeBatchNormBackward0"
            slope = rule.slope(module, v, output)
            if slope is None:
                return None
            if check and module not in _WARNED:
                _warn_exploding(name, module, rule, v, slope)
            return (RerouteInPlace if in_place else Reroute).apply(output, v, slope, switch)

        return hook

    def saliency(self, logits, x, target, *, create_graph=False, retain_graph=None):
        target = as_target(target, logits)
        if not x.requires_grad:
            raise ValueError("the traced forward's input must require grad (see input_requiring_grad)")
        self.switch.on = True
        try:
            weights = score_gradient(logits, target, x, create_graph=create_graph, retain_graph=retain_graph)
        finally:
            self.switch.on = False
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
        UnsupportedLayerError: the model has a layer without a WBP rule, or its forward calls an operation
            outside :data:`ppi_med.saliency.rules.FUNCTIONS` (:class:`UnsupportedOperationError`).
        ValueError: a target out of range or of the wrong shape.

    Warns:
        SecantSlopeWarning: an activation with ``g(0) != 0`` has secant slopes above :data:`SLOPE_WARNING`.
    """
    xg = input_requiring_grad(x)
    with torch.enable_grad(), frozen_buffers(model), WBPTracer(model) as tracer:
        logits = model(xg)
    with torch.enable_grad():
        return tracer.saliency(logits, xg, target, create_graph=create_graph)
