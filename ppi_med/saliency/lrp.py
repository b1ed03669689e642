"""Layer-wise relevance propagation, epsilon-plus composite with batch-norm merging.

Rules (Montavon et al.'s "LRP-epsilon / z-plus" composite):

* convolutions: z-plus, ``R_i = sum_j (w+_ij a+_i + w-_ij a-_i) / z+_j R_j``; where the input is non-negative
  (after a ReLU: checked once per layer and call) the ``a-`` term is zero and is not computed, elsewhere both
  terms are one convolution of ``[a+, a-]`` (channels side by side) with ``[w+, w-]``;
* dense layers: epsilon, ``R_i = sum_j a_i w_ij / (z_j + eps sign z_j) R_j``;
* a batch norm that directly follows a convolution or dense layer is merged into it first (the canonical
  form: ``W' = s W``, ``b' = s b + t``), then the rule applies to the merged layer; any other batch norm (eval
  mode) passes relevance by the epsilon rule without stabiliser, as its gradient does;
* element-wise activations (``nn.Tanh``, ``nn.ELU``, ...: the secant rules of ``rules.py``) pass relevance
  through unchanged, ``R_v = R_y``; ReLU-family activations, pooling, additions, concatenations and reshapes
  pass it on as the gradient does (for them the two agree);
* other normalisations (group, instance, layer norm) have no LRP rule and are refused, and so is any operation
  in a ``forward`` outside :data:`ppi_med.saliency.rules.FUNCTIONS` (the guard WBP runs under, too).

Each rule is written as a "gradient trick": the layer's forward value is kept, and the backward carries
``R / a``, so relevance at the input is ``x * grad``. One forward and one backward per call: the pairs of
(convolution or dense layer, batch norm) come from a dry forward run once per model and cached, as are the
merged and sign-split weights (recomputed when a parameter or running statistic changes). LRP is post-hoc:
the map is detached, the model runs in eval mode for it and is put back as it was.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .conv_input import ConvInputRoute, compute_dtype, conv_geometry, native_input_gradient
from .core import Reroute, Switch, Tracer, as_target, frozen_buffers, plain, score_gradient
from .guard import ForwardGuard
from .rules import RULES, Linear, NormScale, Secant, UnsupportedLayerError, layer_rules

__all__ = ["LRPTracer", "lrp"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DENSE = (*_CONV, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
_ALWAYS = Switch(on=True)


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps sign(z)`` with ``sign(0) = 1``."""
    return torch.where(z >= 0, z + eps, z - eps)


class _Relay(torch.autograd.Function):
    """Forward: the layer's output ``y``; backward: ``grad * y / stab(z)`` into ``z``, the rule's own
    pre-activation (``z+`` for z-plus, the output itself for epsilon), whose graph carries the rule's weights."""

    @staticmethod
    def forward(ctx, y, z, eps):  # noqa: D102
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y / _stab(z, eps))
        return y.clone()  # not a view: models add residuals in place on this output

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if grad is None:
            return None, None, None
        (ratio,) = ctx.saved_tensors
        return None, grad * ratio, None


def _versions(tensors: list[torch.Tensor | None]) -> tuple:
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


class _Plan:
    """What LRP knows about one model between calls: its batch-norm pairs and merged, sign-split weights.

    Args:
        model: the model.
        structure: the ids of its modules, in order; a different tuple means a different model.
        pairs: dense layer or convolution -> the batch norm its output goes straight into.
    """

    def __init__(self, model: nn.Module, structure: tuple[int, ...], pairs: dict[nn.Module, _BN]) -> None:
        self.structure = structure
        self.pairs = pairs
        self.merged_bn = set(pairs.values())
        self._weights: dict[nn.Module, tuple[tuple, dict[str, torch.Tensor]]] = {}

    def weights(self, conv: nn.Module, sign: str) -> torch.Tensor:
        """The convolution's weight with its batch norm merged, clamped to ``sign`` ("pos" or "neg"), or both
        side by side along the input channels ("both": ``[w+, w-]``, for the input ``[a+, a-]``)."""
        bn = self.pairs.get(conv)
        stats = [bn.weight, bn.running_var] if bn is not None else []
        key = (*_versions([conv.weight, *stats]), bn.eps if bn is not None else None)
        cached = self._weights.get(conv)
        if cached is None or cached[0] != key:
            cached = (key, {})
            self._weights[conv] = cached
        parts = cached[1]
        if sign == "both":
            if sign not in parts:
                parts[sign] = torch.cat([self.weights(conv, "pos"), self.weights(conv, "neg")], dim=1)
            return parts[sign]
        if sign not in parts:
            with torch.no_grad():
                w = conv.weight.detach()
                if bn is not None:
                    scale = torch.rsqrt(bn.running_var + bn.eps)
                    if bn.weight is not None:
                        scale = scale * bn.weight
                    w = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
                parts[sign] = w.clamp(min=0) if sign == "pos" else w.clamp(max=0)
        return parts[sign]


# one plan per model, dropped with the model
_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _find_pairs(model: nn.Module, x: torch.Tensor) -> dict[nn.Module, _BN]:
    """Dense layers and convolutions whose output goes straight into a batch norm, found by a dry forward."""
    last: dict[str, object] = {}
    pairs: dict[nn.Module, _BN] = {}

    def hook(module, inputs, output):
        if isinstance(module, _BN) and last and inputs[0] is last["out"]:
            pairs[last["module"]] = module
        if isinstance(module, _DENSE):
            last.update(module=module, out=output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*_DENSE, _BN))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return pairs


def _plan(model: nn.Module, x: torch.Tensor) -> _Plan:
    """The cached plan of ``model``, made anew (one dry forward) when its modules have changed."""
    structure = tuple(map(id, model.modules()))
    plan = _PLANS.get(model)
    if plan is None or plan.structure != structure:
        plan = _Plan(model, structure, _find_pairs(model, x))
        _PLANS[model] = plan
    return plan


class LRPTracer(Tracer):
    """Epsilon-plus LRP; it runs its own eval-mode forward inside :meth:`saliency`.

    Args:
        model: the classifier (ReLU-family activations expected, as for any LRP rule set; element-wise
            activations pass relevance unchanged).
        epsilon: stabiliser of the epsilon and z-plus denominators.

    Raises:
        UnsupportedLayerError: a layer without an LRP rule (attention, group/instance/layer norm).
    """

    differentiable = False

    def __init__(self, model: nn.Module, epsilon: float = 1e-6) -> None:
        super().__init__(model)
        self.epsilon = epsilon
        modules = dict(model.named_modules())
        self.ruled = layer_rules(model, RULES, "LRP")
        self.rules = {}
        for name, rule in self.ruled.items():
            module = modules[name]
            if isinstance(module, _BN) and module.running_var is None:
                raise UnsupportedLayerError(
                    f"LRP has no rule for layer '{name}' ({type(module).__name__}) without running statistics: "
                    "it normalises by batch statistics even in eval mode"
                )
            if isinstance(module, (*_DENSE, _BN)):
                continue
            own = next(module.parameters(recurse=False), None) is not None
            if isinstance(rule, NormScale) or (own and not isinstance(rule, (Linear, Secant))):
                raise UnsupportedLayerError(
                    f"LRP has no rule for layer '{name}' ({type(module).__name__}): of the normalisations only "
                    "batch norm (merged into the layer before it, or passed by the epsilon rule) has one"
                )
            self.rules[name] = rule

    def _attach(self, plan: _Plan) -> None:
        eps = self.epsilon
        pending: dict[nn.Module, torch.Tensor] = {}  # z+ of a convolution, for the batch norm merged into it

        def z_plus(module, a, w):
            geometry = conv_geometry(module)
            if geometry is None or not native_input_gradient(w, module.groups, compute_dtype(w)):
                return module._conv_forward(a, w, None)
            # a stem on one or two channels: its input gradient from ATen's kernel (conv_input.py)
            return ConvInputRoute.apply(module._conv_forward(a.detach(), w, None), a, w, geometry)

        def conv_hook(module, inputs, z):
            a = inputs[0]
            if bool(a.min() >= 0):  # after a ReLU: the a- term is zero
                zp = z_plus(module, a, plan.weights(module, "pos"))
            elif module.groups == 1:
                # both terms in one convolution over [a+, a-] with [w+, w-]: the large output is written and
                # its gradient read once, not twice (the first layer of a network on signed images)
                both = torch.cat([a.clamp(min=0), a.clamp(max=0)], dim=1)
                zp = z_plus(module, both, plan.weights(module, "both"))
            else:
                zp = module._conv_forward(a.clamp(min=0), plan.weights(module, "pos"), None)
                zp = zp + module._conv_forward(a.clamp(max=0), plan.weights(module, "neg"), None)
            bn = plan.pairs.get(module)
            if bn is None:
                return _Relay.apply(z, zp, eps)
            pending[bn] = zp
            return None  # the merged batch norm relays, its output being the merged layer's

        def dense_hook(module, inputs, z):
            # epsilon: the layer's own backward carries W^T; only the ratio z / stab(z) is added
            return None if module in plan.pairs else _Relay.apply(z, z, eps)

        def merged_bn_hook(module, inputs, y):
            zp = pending.pop(module, None)
            # after a convolution: relay to its z+; after a dense layer: epsilon on y, through BN's scale and W^T
            return _Relay.apply(y, y if zp is None else zp, eps)

        def keep_input(module, inputs):
            module._lrp_input = inputs[0].clone()  # an in-place activation overwrites its input

        def activation_hook(rule: Secant):
            def hook(module, inputs, y):
                v = module.__dict__.pop("_lrp_input", None)
                v = inputs[0] if v is None else v
                # the secant slope y / v passes relevance unchanged: R_v = v * (y / v) * R_y / y = R_y
                return Reroute.apply(y, v, rule.slope(module, v, y), _ALWAYS)

            return hook

        for name, m in self.model.named_modules():
            if isinstance(m, _CONV):
                self._handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(dense_hook))
            elif m in plan.merged_bn:
                self._handles.append(m.register_forward_hook(merged_bn_hook))
            elif isinstance(self.rules.get(name), Secant):
                if getattr(m, "inplace", False):
                    self._handles.append(m.register_forward_pre_hook(keep_input))
                self._handles.append(m.register_forward_hook(activation_hook(self.rules[name])))

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
        """Run the eval-mode LRP forward and backward; returns the detached relevance map.

        Raises:
            UnsupportedOperationError: the forward calls an operation without a rule (e.g. ``h * h``).
        """
        modes = {m: m.training for m in self.model.modules()}
        x_leaf = plain(x).detach().requires_grad_(True)
        try:
            self.model.eval()
            with torch.enable_grad(), frozen_buffers(self.model):
                plan = _plan(self.model, x_leaf)
                self._attach(plan)
                # registered after the rule hooks, so that a layer's rule runs while the guard counts it as inside
                guard = ForwardGuard(self.model, set(self.ruled), "LRP")
                try:
                    with guard:
                        out = self.model(x_leaf)
                finally:
                    guard.remove()
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
        UnsupportedLayerError: a layer outside the rule set (e.g. attention, layer norm), or an operation in a
            forward outside :data:`ppi_med.saliency.rules.FUNCTIONS` (``UnsupportedOperationError``).
        ValueError: a target out of range.
    """
    return LRPTracer(model, epsilon=epsilon).explain(x, target)
