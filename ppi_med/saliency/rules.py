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
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "Rule",
    "Linear",
    "Secant",
    "NormScale",
    "UnsupportedLayerError",
    "RULES",
    "register_rule",
    "rule_for",
    "is_leaf",
]


class UnsupportedLayerError(TypeError):
    """Raised when a saliency method meets a layer it has no rule for."""


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


class Secant(Rule):
    """Element-wise activation ``g``: ``W~l = h(v) * W~{l+1}`` with ``h(v) = g(v) / v``."""

    def __init__(self, delta: float = 1e-3) -> None:
        self.delta = delta

    def derivative_at_zero(self, module: nn.Module, like: torch.Tensor) -> torch.Tensor:
        """``g'(0)`` by a central difference of the module itself."""
        with torch.no_grad():
            pts = torch.tensor([-self.delta, self.delta], dtype=like.dtype, device=like.device)
            g = module(pts)
        return (g[1] - g[0]) / (2 * self.delta)

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
        ctx.dims = dims
        ctx.save_for_backward(v)
        mean = v.mean(dim=dims, keepdim=True)
        return (v - mean).square_().mean(dim=dims, keepdim=True)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
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
            dims = [0, *range(2, v.ndim)]
            var = population_var(v, dims)
            scale = torch.rsqrt(var + module.eps)
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
