"""WBP update rules, one small object per kind of layer, and the registry that maps layer types to them.

WBP (docs/DESIGN.md section 3) collapses every layer after ``l`` into ``W~l`` and recurses backward from
``W~L = 1``. Autograd already applies the linear rules exactly (the backward of a convolution *is* the
transposed convolution with its kernel, pooling relocates or distributes, adds and reshapes pass through),
so a rule only has to say how a layer's Jacobian must be *replaced*:

* :class:`Linear` -- the layer's own backward is the WBP rule (convolutions, linear layers, pooling,
  dropout, reshapes, padding, up-sampling, and the piecewise-linear activations ReLU/LeakyReLU/PReLU whose
  secant slope equals their derivative).
* :class:`Secant` -- an activation ``g`` is replaced by its secant slope ``h(v) = g(v) / v`` (the limit
  ``g'(0)`` where ``v == 0``).
* :class:`NormScale` -- a normalisation layer contributes only its affine scale
  ``gamma / sqrt(var + eps)``; batch or instance statistics are treated as constants of the input.

Each rule returns the per-element multiplier ("slope") that the WBP backward uses in place of the layer's
Jacobian, or ``None`` when autograd is already exact.

LRP (``lrp.py``) reads the same table: its "gradient trick" carries ``R / a`` backward, so a layer whose own
backward is its WBP rule (:class:`Linear`) passes relevance as LRP's rules ask, and the secant slope of an
element-wise activation is exactly the multiplier that passes relevance through it unchanged
(``R_v = v * h(v) * R_y / y = R_y``), which is LRP's rule for activations. Convolutions, dense layers and
batch norm get LRP's own rules on top; other normalisations have no LRP rule.

Operations called inside a ``forward`` (torch functions, tensor methods, operators) are in the second half of
the table, :data:`FUNCTIONS`, checked by :mod:`ppi_med.saliency.guard`: an allow-list, so anything it does not
name is refused.
"""

from __future__ import annotations

import weakref
from numbers import Number
from typing import Any

import torch
from torch import nn

__all__ = [
    "Rule",
    "Linear",
    "Secant",
    "NormScale",
    "UnsupportedLayerError",
    "UnsupportedOperationError",
    "RULES",
    "FUNCTIONS",
    "OpRule",
    "LinearOp",
    "ProductOp",
    "QuotientOp",
    "PiecewiseOp",
    "ExtremumOp",
    "ZeroBoundOp",
    "RunningStatsOp",
    "is_data",
    "operation_problem",
    "register_rule",
    "rule_for",
    "layer_rules",
    "is_leaf",
]


class UnsupportedLayerError(TypeError):
    """Raised when a saliency method meets a layer it has no rule for."""


class UnsupportedOperationError(UnsupportedLayerError):
    """Raised when a traced forward calls an operation (function, method, operator) that no rule covers."""


class Rule:
    """Base class: how a layer's Jacobian is replaced in the WBP backward."""

    def slope(self, module: nn.Module, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Return the multiplier that maps the output's saliency weight to the input's, or ``None``.

        Args:
            module: the layer.
            v: its input.
            y: its output.
        """
        raise NotImplementedError


class Linear(Rule):
    """The layer's own backward already is the WBP rule."""

    def slope(self, module, v, y):
        return None


# g(0) of each element-wise activation met so far (see Secant.value_at_zero)
_AT_ZERO: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


class Secant(Rule):
    """Element-wise activation ``g``: ``W~l = h(v) * W~{l+1}`` with ``h(v) = g(v) / v``."""

    def __init__(self, delta: float = 1e-3) -> None:
        self.delta = delta

    def derivative_at_zero(self, module: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """``g'(0)`` by a central difference of the module itself."""
        with torch.no_grad():
            pts = torch.tensor([-self.delta, self.delta], dtype=like.dtype, device=like.device)
            g = module.forward(pts)  # forward, not __call__: the tracers' own hooks must not see this probe
        return (g[1] - g[0]) / (2 * self.delta)

    def value_at_zero(self, module: nn.Module, like: torch.Tensor) -> float:
        """``g(0)``: where it is not 0 the secant slope ``g(v) / v`` grows without bound as ``v -> 0``.

        Computed once per layer (a host read, which would stall a GPU at every step) and kept while the layer
        lives.
        """
        value = _AT_ZERO.get(module)
        if value is None:
            with torch.no_grad():
                value = float(module.forward(like.new_zeros((1,) * like.ndim)).reshape(-1)[0])
            _AT_ZERO[module] = value
        return value

    def slope(self, module, v, y):
        zero = v == 0
        if not bool(zero.any()):
            return y / v
        safe_v = torch.where(zero, torch.ones_like(v), v)
        return torch.where(zero, self.derivative_at_zero(module, v), y / safe_v)


class _PopulationVar(torch.autograd.Function):
    """Biased variance over ``dims`` (kept), computed by two passes: mean, then mean squared deviation.

    On CPU ``aten::var`` over a batch norm's (N, *spatial) axes is about 3x slower than this, and it runs
    in every traced training forward. The backward saves only ``v`` and recomputes the mean inside, so it
    stays exact when differentiated again (``create_graph=True``).
    """

    @staticmethod
    def forward(ctx, v, dims):  # noqa: D102
        ctx.set_materialize_grads(False)  # the exact backward sends nothing to a rerouting node's slope
        ctx.dims = dims
        ctx.save_for_backward(v)
        mean = v.mean(dim=dims, keepdim=True)
        return (v - mean).square_().mean(dim=dims, keepdim=True)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if grad is None:
            return None, None
        (v,) = ctx.saved_tensors
        count = v.numel() // grad.numel()
        return grad * (2.0 / count) * (v - v.mean(dim=ctx.dims, keepdim=True)), None


def population_var(v: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``v.var(dim=dims, unbiased=False, keepdim=True)``, faster on CPU (see :class:`_PopulationVar`).

    Elsewhere (CUDA's reduction is fast) and for half precision (whose squares can overflow) it is
    ``aten::var`` itself.
    """
    if v.device.type != "cpu" or v.dtype not in (torch.float32, torch.float64):
        return v.var(dim=dims, unbiased=False, keepdim=True)
    return _PopulationVar.apply(v, tuple(d % v.ndim for d in dims))


def saved_tensor_hooks_active() -> bool:
    """True inside :func:`torch.autograd.graph.saved_tensors_hooks` (activation checkpointing installs them).

    There, reading a tensor a node has saved would unpack it (for a checkpointed segment: recompute it).
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - a torch without it: assume hooks, the safe answer
        return True
    return top(False) is not None


class _SavedInvStd(torch.autograd.Function):
    """A training-mode batch norm's ``1 / sqrt(var + eps)``, as its forward computed it, differentiable in ``v``.

    The forward reads nothing new (the batch norm's node keeps its batch mean and inverse deviation for its
    own backward); the backward is ``d invstd / dv = -invstd^3 (v - mean) / count``, what autograd gives for
    ``rsqrt(population_var(v) + eps)``. Once differentiable: the mean and the inverse deviation it uses are
    constants of the forward.
    """

    @staticmethod
    def forward(ctx, v, mean, invstd):  # noqa: D102
        # the exact backward and the saliency's send nothing to the slope: no zeros computed and carried back
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(v, mean, invstd)
        return invstd.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # noqa: D102
        if grad is None:
            return None, None, None
        v, mean, invstd = ctx.saved_tensors
        count = v.numel() // invstd.numel()
        k = grad * invstd.pow(3) * (-1.0 / count)
        # (v - mean) * k in one pass over v: -mean * k + v * k
        return torch.addcmul(-mean * k, v, k), None, None


def forward_invstd(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """``rsqrt(var + eps)`` per channel, shaped ``(1, C, 1, ...)``, of the batch norm ``v -> y`` in batch
    statistics mode, taken from its forward; ``None`` where it cannot be read without cost (another kernel
    than the native one, half precision, or saved-tensor hooks active, under which reading would recompute).
    """
    node = y.grad_fn
    if (
        type(node).__name__ != "NativeBatchNormBackward0"
        or v.dtype not in (torch.float32, torch.float64)
        or not getattr(node, "_saved_training", False)
        or saved_tensor_hooks_active()
    ):
        return None
    mean, invstd = node._saved_result1, node._saved_result2
    if mean.dtype != v.dtype or invstd.dtype != v.dtype or invstd.numel() != v.shape[1]:
        return None
    shape = (1, -1, *([1] * (v.ndim - 2)))
    return _SavedInvStd.apply(v, mean.view(shape), invstd.view(shape))


class NormScale(Rule):
    """Normalisation: keep only the affine scale ``gamma / sqrt(var + eps)``.

    Batch norm in eval mode uses its running variance, which autograd already treats as a constant, so it
    needs no replacement. In training mode (and for instance, group and layer norm) the variance comes from
    the data; WBP keeps it as a per-sample (or per-batch) constant instead of differentiating through it.
    """

    def slope(self, module, v, y):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not (module.training or module.running_var is None):
                return None
            scale = forward_invstd(v, y)
            if scale is None:
                scale = torch.rsqrt(population_var(v, [0, *range(2, v.ndim)]) + module.eps)
            weight = module.weight
            shape = [1, -1] + [1] * (v.ndim - 2)
        elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
            if not module.training and module.track_running_stats:
                var = module.running_var.view(1, -1, *([1] * (v.ndim - 2)))
            else:
                var = population_var(v, list(range(2, v.ndim)))
            scale = torch.rsqrt(var + module.eps)
            weight = module.weight
            shape = [1, -1] + [1] * (v.ndim - 2)
        elif isinstance(module, nn.GroupNorm):
            n, c = v.shape[:2]
            grouped = v.reshape(n, module.num_groups, -1)
            var = population_var(grouped, [-1])
            scale = torch.rsqrt(var + module.eps).expand(n, module.num_groups, c // module.num_groups)
            scale = scale.reshape(n, c, *([1] * (v.ndim - 2)))
            weight = module.weight
            shape = [1, -1] + [1] * (v.ndim - 2)
        elif isinstance(module, nn.LayerNorm):
            dims = list(range(v.ndim - len(module.normalized_shape), v.ndim))
            var = population_var(v, dims)
            scale = torch.rsqrt(var + module.eps)
            weight = module.weight
            shape = list(module.normalized_shape)
        else:  # pragma: no cover - registry only maps the classes above here
            raise UnsupportedLayerError(f"NormScale has no formula for {type(module).__name__}")
        if weight is not None:
            scale = scale * weight.view(*shape)
        return scale


LINEAR = Linear()
SECANT = Secant()
NORM = NormScale()

_LINEAR_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Upsample,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.ReflectionPad1d,
    nn.ReflectionPad2d,
    nn.ReflectionPad3d,
    nn.ReplicationPad1d,
    nn.ReplicationPad2d,
    nn.ReplicationPad3d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
    # piecewise linear through the origin: secant slope == derivative
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
)

_SECANT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LogSigmoid,
    nn.Softshrink,
    nn.Hardshrink,
)

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)

RULES: dict[type[nn.Module], Rule] = {
    **dict.fromkeys(_LINEAR_TYPES, LINEAR),
    **dict.fromkeys(_SECANT_TYPES, SECANT),
    **dict.fromkeys(_NORM_TYPES, NORM),
}


def _register_monai() -> None:
    """MONAI's own element-wise activations and shape layers."""
    from monai.networks.blocks import activation as act
    from monai.networks.layers import simplelayers as simple

    for name in ("Swish", "MemoryEfficientSwish", "Mish"):
        if hasattr(act, name):
            RULES[getattr(act, name)] = SECANT
    for name in ("Flatten", "Reshape"):
        if hasattr(simple, name):
            RULES[getattr(simple, name)] = LINEAR


_register_monai()


# ---------------------------------------------------------------------------------------------------------
# operations called inside a forward: the allow-list the guard (guard.py) checks every call against


def is_data(t: object) -> bool:
    """True for a tensor that depends on the input: it requires grad and is not a parameter.

    A tensor computed from parameters alone inside a container's ``forward`` also counts (the guard cannot
    tell it from data without tracing every call); compute it inside a layer with a rule instead.
    """
    return isinstance(t, torch.Tensor) and t.requires_grad and not isinstance(t, nn.Parameter)


def _flat(values) -> list:
    out = []
    for a in values:
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _zero_or_none(v: Any) -> bool:
    return v is None or (isinstance(v, Number) and v == 0)


class OpRule:
    """How WBP and LRP treat one operation called inside a forward (a torch function, method or operator)."""

    def problem(self, args: tuple, kwargs: dict) -> str | None:
        """Why this call escapes the rules, or ``None`` when autograd's derivative is the rule for it.

        Args:
            args: the call's positional arguments.
            kwargs: its keyword arguments.
        """
        return None


class LinearOp(OpRule):
    """Linear in all its data operands together (adds, concatenation, views, sums, average pooling, dropout):
    its derivative is its WBP rule, and LRP's gradient trick passes relevance through it as through a
    residual add or a reshape."""


class ProductOp(OpRule):
    """Linear in each operand apart (products, matrix products, convolutions): linear in the input only
    while at most one operand depends on the data (``h * mask``, ``h @ W``); ``h * h`` (a gate, a
    squeeze-excitation) is a product of two data-dependent tensors, for which neither method has a rule."""

    def problem(self, args, kwargs):
        if sum(is_data(a) for a in _flat((*args, *kwargs.values()))) > 1:
            return "a product of two data-dependent tensors (a gate, squeeze-excitation, attention), not linear"
        return None


class QuotientOp(OpRule):
    """Division: linear in the numerator, so allowed while the divisor (argument ``divisor``) is constant."""

    def __init__(self, divisor: int) -> None:
        self.divisor = divisor

    def problem(self, args, kwargs):
        if is_data(_arg(args, kwargs, self.divisor, "other")):
            return "a division by a data-dependent tensor, not linear"
        return None


class PiecewiseOp(OpRule):
    """Piecewise linear through the origin (``relu``, ``leaky_relu``, ``abs``, max pooling): the secant slope
    equals the derivative, so autograd applies WBP's rule, and LRP's relevance passes through unchanged."""


class ExtremumOp(PiecewiseOp):
    """``max``/``min``/``maximum``/``minimum``: a reduction or a choice between data tensors is piecewise
    linear through the origin; a choice against a constant (``maximum(h, 1)``) is an activation away from 0."""

    def problem(self, args, kwargs):
        operands = [a for a in (*args[:2], kwargs.get("other")) if isinstance(a, torch.Tensor)]
        if len(operands) == 2 and not all(is_data(a) for a in operands):
            return "a max/min against a constant (an activation away from 0: secant slope)"
        return None


class ZeroBoundOp(PiecewiseOp):
    """``clamp``/``threshold``: piecewise linear through the origin when its bounds are 0 (``clamp(min=0)`` is
    ReLU), else an activation whose secant slope differs from its derivative."""

    def __init__(self, bounds: tuple[tuple[int, str], ...]) -> None:
        self.bounds = bounds

    def problem(self, args, kwargs):
        if all(_zero_or_none(_arg(args, kwargs, i, name)) for i, name in self.bounds):
            return None
        return "a clamp or threshold away from 0 (an activation: secant slope)"


class RunningStatsOp(OpRule):
    """``batch_norm``: with running statistics outside training an affine map, whose derivative is the affine
    scale WBP keeps (and LRP's epsilon rule on it); with batch statistics WBP keeps only that scale."""

    def problem(self, args, kwargs):
        if _arg(args, kwargs, 5, "training", False) or _arg(args, kwargs, 2, "running_var") is None:
            return "a normalisation with batch statistics (WBP keeps only the affine scale)"
        return None


#: every operation a traced forward may call outside a layer with a rule, by the name torch gives the function
#: with surrounding underscores stripped (``__radd__`` -> ``radd``, ``relu_`` -> ``relu``, ``Tensor.shape``'s
#: getter -> ``get``); a call that is not here, and whose result carries gradient, is refused by the guard
_LINEAR_NAMES = """
    add sub subtract iadd isub radd rsub neg negative pos positive sum mean cumsum
    cat concat concatenate stack hstack vstack dstack
    view view_as reshape reshape_as flatten unflatten squeeze unsqueeze permute transpose swapaxes swapdims
    movedim moveaxis t contiguous clone detach expand expand_as broadcast_to repeat repeat_interleave tile
    narrow select index_select gather take_along_dim getitem setitem split split_with_sizes tensor_split
    chunk unbind flip roll get to type type_as float double half bfloat16 cpu cuda
    pad interpolate upsample upsample_nearest upsample_bilinear pixel_shuffle pixel_unshuffle
    channel_shuffle native_channel_shuffle avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d dropout dropout1d dropout2d dropout3d alpha_dropout
    feature_alpha_dropout feature_dropout
"""
_PRODUCT_NAMES = """
    mul multiply imul rmul matmul rmatmul imatmul mm bmm mv dot vdot inner outer einsum tensordot kron
    linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d multi_dot
"""
_PIECEWISE_NAMES = """
    relu leaky_relu prelu rrelu abs absolute hardshrink max_pool1d max_pool2d max_pool3d
    max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d adaptive_max_pool1d_with_indices
    adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices max_unpool1d max_unpool2d max_unpool3d
    amax amin
"""

#: every operation a traced forward may call outside a layer with a rule, by the name torch gives the function
#: with surrounding underscores stripped (``__radd__`` -> ``radd``, ``relu_`` -> ``relu``, ``Tensor.shape``'s
#: getter -> ``get``); a call that is not here, and whose result carries gradient, is refused by the guard
FUNCTIONS: dict[str, OpRule] = {
    **dict.fromkeys(_LINEAR_NAMES.split(), LinearOp()),
    **dict.fromkeys(_PRODUCT_NAMES.split(), ProductOp()),
    **dict.fromkeys(("div", "divide", "true_divide", "truediv", "itruediv"), QuotientOp(divisor=1)),
    **dict.fromkeys(("rtruediv", "rdiv"), QuotientOp(divisor=0)),
    **dict.fromkeys(_PIECEWISE_NAMES.split(), PiecewiseOp()),
    **dict.fromkeys(("max", "min", "maximum", "minimum", "fmax", "fmin"), ExtremumOp()),
    **dict.fromkeys(("clamp", "clip"), ZeroBoundOp(((1, "min"), (2, "max")))),
    "clamp_min": ZeroBoundOp(((1, "min"),)),
    "clamp_max": ZeroBoundOp(((1, "max"),)),
    "threshold": ZeroBoundOp(((1, "threshold"), (2, "value"))),
    "batch_norm": RunningStatsOp(),
}


def operation_problem(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why a call made in a traced forward escapes the rules, or ``None`` when :data:`FUNCTIONS` allows it.

    Args:
        func: the called function, as :class:`torch.overrides.TorchFunctionMode` sees it.
        args: its positional arguments.
        kwargs: its keyword arguments.

    Returns:
        A short reason, e.g. ``"a product of two data-dependent tensors ..."``, or ``None``.
    """
    if not any(is_data(a) for a in _flat((*args, *kwargs.values()))):
        return None  # parameters and constants only: not on the input's path
    op = FUNCTIONS.get(getattr(func, "__name__", "").strip("_"))
    if op is None:
        return "an operation without a rule (a nonlinearity or normalisation, not in ppi_med.saliency.rules.FUNCTIONS)"
    return op.problem(args, kwargs)


def register_rule(layer_type: type[nn.Module], rule: Rule) -> None:
    """Teach WBP a new layer type (or override the rule of a known one).

    Args:
        layer_type: the module class.
        rule: a :class:`Rule` instance, e.g. ``Secant()`` for a new element-wise activation.
    """
    if not isinstance(rule, Rule):
        raise TypeError(f"rule must be a Rule instance, got {type(rule).__name__}")
    RULES[layer_type] = rule


def rule_for(module: nn.Module, rules: dict[type[nn.Module], Rule] | None = None) -> Rule | None:
    """The rule for ``module``: exact type first, then the nearest registered base class."""
    table = RULES if rules is None else rules
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def is_leaf(module: nn.Module) -> bool:
    """True for a module without children (where the rules apply)."""
    return next(module.children(), None) is None


def layer_rules(
    model: nn.Module, rules: dict[type[nn.Module], Rule] | None = None, method: str = "WBP"
) -> dict[str, Rule]:
    """Map every layer of ``model`` that a method must handle to its rule.

    Args:
        model: any classifier.
        rules: a registry to use instead of :data:`RULES`.
        method: the method's name, for the error message.

    Returns:
        ``{qualified layer name: rule}`` for the leaf layers and the containers with parameters of their own.

    Raises:
        UnsupportedLayerError: such a layer has no rule.
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
                f"{method} has no rule for layer '{name or type(module).__name__}' ({type(module).__name__}); "
                "register one with ppi_med.saliency.register_rule(layer_type, rule)"
            )
        found[name] = rule
    return found
