"""Weight Back Propagation (WBP) saliency: ``s_m(v)_k = [W~0]_{mk} v_k`` (docs/DESIGN.md section 3).

WBP runs on an ordinary forward pass. Layers whose Jacobian differs from their WBP rule (secant-slope
activations, normalisation with data statistics) get a forward hook that wraps their output in a node with
two backward behaviours: the layer's exact Jacobian (so a training loss on the same forward gets true
gradients) and the WBP rule (used only while :meth:`WBPTracer.saliency` runs). One forward therefore
serves both the classification loss and the saliency map, which is what keeps PPI cheap, and because the
WBP backward is built from differentiable operations it can itself be trained through
(``create_graph=True``).

Rules attach to modules, so a nonlinearity called as a function inside some ``forward`` (``torch.tanh(x)``,
``F.gelu(x)``, ``F.layer_norm(...)``) would be differentiated by autograd instead of getting its rule. The
tracer watches the traced forward (a :class:`torch.overrides.TorchFunctionMode`) and, when it returns, raises
:class:`UnsupportedLayerError` for such a call, naming the function and the module whose forward made it.
Functional calls whose derivative *is* their WBP rule pass: ``relu``, ``leaky_relu``, ``prelu``,
``rrelu``, ``abs``, ``hardshrink``, ``clamp`` at 0 (piecewise linear through the origin: secant slope ==
derivative), convolutions, pooling, dropout, reshapes and sums (linear), and ``batch_norm`` with running
statistics outside training (its variance is already a constant).
"""

from __future__ import annotations

from numbers import Number
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from .core import Tracer, as_target, frozen_buffers, input_requiring_grad, score_gradient
from .rules import RULES, Linear, Rule, UnsupportedLayerError, is_leaf, rule_for

__all__ = ["WBPTracer", "wbp", "check_supported", "functional_call_problem", "UnsupportedLayerError"]


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


# functions whose autograd derivative differs from their WBP rule (section 3: secant slope for an
# activation, the affine scale only for a normalisation); names as in torch, torch.nn.functional and
# Tensor methods, in-place variants included by stripping a trailing "_"
_NONLINEAR = frozenset(
    {
        "tanh", "sigmoid", "gelu", "silu", "elu", "celu", "selu", "mish", "softplus", "softsign", "tanhshrink",
        "hardtanh", "relu6", "hardswish", "hardsigmoid", "logsigmoid", "softshrink", "glu", "erf", "exp", "exp2",
        "log", "log2", "log10", "log1p", "expm1", "sqrt", "rsqrt", "square", "pow", "reciprocal", "sin", "cos",
        "softmax", "log_softmax", "softmin", "normalize", "instance_norm", "group_norm", "layer_norm", "rms_norm",
        "local_response_norm", "norm", "vector_norm", "var", "std",
    }
)  # fmt: skip
_CLAMPS = frozenset({"clamp", "clip", "clamp_min", "clamp_max"})


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _zero_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, Number) and v == 0)


def functional_call_problem(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why a call made in a traced forward escapes WBP's rules, or ``None`` when autograd is exact for it.

    Args:
        func: the called function (as :class:`torch.overrides.TorchFunctionMode` sees it).
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        A short reason, e.g. ``"an activation (secant slope)"``, or ``None``.
    """
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not any(t.requires_grad for t in tensors):
        return None  # a constant, not part of the saliency path
    # F.threshold is "_threshold", x ** 2 is "__pow__", in-place variants end in "_"
    name = getattr(func, "__name__", "").strip("_")
    if name == "batch_norm":
        training, running_var = _arg(args, kwargs, 5, "training", False), _arg(args, kwargs, 2, "running_var")
        if training or running_var is None:
            return "a normalisation with batch statistics (WBP keeps only the affine scale)"
        return None
    if name in _CLAMPS:
        if name == "clamp_min":
            low, high = _arg(args, kwargs, 1, "min"), None
        elif name == "clamp_max":
            low, high = None, _arg(args, kwargs, 1, "max")
        else:
            low, high = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
        if _zero_or_none(low) and _zero_or_none(high):
            return None  # relu (or its mirror): secant slope == derivative
        return "a clamp away from 0 (secant slope)"
    if name == "threshold":
        if _zero_or_none(_arg(args, kwargs, 1, "threshold")) and _zero_or_none(_arg(args, kwargs, 2, "value")):
            return None
        return "a threshold away from 0 (secant slope)"
    if name in _NONLINEAR:
        return "a nonlinearity or normalisation (its WBP rule differs from its derivative)"
    return None


class _FunctionalWatch(TorchFunctionMode):
    """Find a functional nonlinearity called outside every layer that has a rule; raise when the forward returns."""

    def __init__(self, modules: dict[str, nn.Module], ruled: set[str]) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []  # (qualified name, type) of the modules the forward is in
        self.depth = 0  # how many layers with a rule the forward is inside
        self.found: str | None = None  # the first functional call that escapes the rules
        self.handles = []
        for name, module in modules.items():
            self.handles.append(
                module.register_forward_pre_hook(self._push(name, type(module).__name__, name in ruled))
            )
            self.handles.append(module.register_forward_hook(self._pop(name in ruled)))

    def _push(self, name: str, kind: str, ruled: bool):
        def hook(module, inputs):
            self.stack.append((name, kind))
            self.depth += ruled

        return hook

    def _pop(self, ruled: bool):
        def hook(module, inputs, output):
            self.stack.pop()
            self.depth -= ruled
            if not self.stack and self.found is not None:
                # raised here, when the model's forward returns: an exception inside __torch_function__ of an
                # operator (x ** 2) is a TypeError that Python turns into "unsupported operand"
                raise UnsupportedLayerError(self.found)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if self.depth == 0 and self.stack and self.found is None:
            why = functional_call_problem(func, args, kwargs)
            if why is not None:
                name, kind = self.stack[-1]
                where = f"'{name}' ({kind})" if name else f"the model ({kind})"
                self.found = (
                    f"WBP: {resolve_name(func) or func} is called as a function in the forward of {where}, "
                    f"{why}; autograd would differentiate it instead of applying "
                    "WBP's rule. Use the layer (nn.Tanh(), nn.GELU(), nn.LayerNorm(...)) in that forward, or "
                    "register a rule for the calling module's type with ppi_med.saliency.register_rule"
                )
        return func(*args, **kwargs)


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
        # registered after the rerouting hooks, so that a layer's rule runs while the watch counts it as inside
        self._watch = _FunctionalWatch(modules, set(self.rules))
        self._watch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        watch = self.__dict__.pop("_watch", None)
        if watch is not None:
            watch.__exit__(None, None, None)
            watch.remove()
        super().__exit__(*exc)

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
            weights = score_gradient(logits, target, x, create_graph=create_graph, retain_graph=retain_graph)
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
