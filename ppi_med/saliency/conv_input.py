"""A convolution's input gradient as WBP's own node, so that a differentiable map is trained through fast kernels.

A convolution's rule is its own backward (:class:`~ppi_med.saliency.rules.Linear`), so WBP could leave it to
autograd. With ``create_graph=True``, though, the loss on the map then differentiates autograd's convolution
backward a second time, and PyTorch's generic double backward computes the weight gradient of that step as a
convolution over the batch axis, which on CPU costs up to twice the native weight-gradient kernel. Here the
tracer wraps each plain convolution's output in :class:`ConvRoute`: its backward is the exact one (the
convolution's own node) for a training loss, and while the saliency runs it sends the gradient to the input
through :class:`ConvInputGrad`, whose own backward is the forward convolution and the native weight-gradient
kernel. The values are those of autograd's backward (the same kernels, summed in another order for the
weight).

Under ``torch.autocast`` a convolution computes in the autocast dtype: autocast casts its input and weight
(bfloat16 on CPU) while the parameter and the layer's input keep theirs. The routing nodes record the dtype
the convolution's output came in, compute the input gradient in it from input and weight cast the same way
(the weight's cast is recorded, so a differentiable map's gradient reaches the float32 parameter through it),
and hand the gradient back in the input's own dtype, as autograd does at autocast's casts.

The tracer can also take the input gradient of the first convolutions (those whose input depends on the
traced input alone, through parameter-free operations) only for the saliency: the convolution then runs on
the detached input, and the exact backward of a training loss stops there instead of computing an input
gradient nobody reads (on a full-resolution stem with one input channel the costliest convolution backward
of the network). :attr:`ppi_med.saliency.core.Tracer.input_gradient` switches this on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "compute_dtype",
    "native_input_gradient",
    "ConvInputGrad",
    "ConvRoute",
    "ConvInputRoute",
    "conv_geometry",
    "depends_on_input_only",
    "single_channel_input_gradient",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_geometry(module: nn.Module) -> tuple | None:
    """``(stride, padding, dilation, groups)`` of a plain convolution, or ``None`` for any other layer.

    Plain: ``nn.Conv1d/2d/3d`` with zero padding given as numbers (not ``"same"``, not reflect or circular
    padding, which run a padding operation before the convolution).
    """
    if type(module) not in _CONV or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    return list(module.stride), list(module.padding), list(module.dilation), module.groups


_MEASURED = (torch.float32, torch.float64)  # the dtypes the kernel choice below was measured for


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a convolution with this weight computes in here: where autocast is on for the weight's device,
    its dtype (autocast casts a convolution's input and weight to it, float64 excepted), the weight's otherwise.

    Args:
        weight: the convolution's weight as the module holds it.

    Returns:
        The dtype of the convolution's output when it runs now.
    """
    device = weight.device.type
    if weight.is_floating_point() and weight.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def native_input_gradient(weight: torch.Tensor, groups: int, dtype: torch.dtype | None = None) -> bool:
    """Whether ATen's kernel beats oneDNN's for this convolution's input gradient on CPU: one or two input
    channels (measured, one thread, 64 output channels: 2D 7 x 7 on 64^2, 131-134 ms against 19-48 ms for one to
    three channels; 3D 7^3 on 32^3, 358 against 117 ms for one channel, 361 against 230 for two, even for three).

    Args:
        weight: the convolution's weight.
        groups: its groups.
        dtype: the dtype it computes in (:func:`compute_dtype`); the weight's when not given. Only float32 and
            float64 were measured: any other (bfloat16 under autocast) keeps oneDNN.

    Returns:
        True where ATen's kernel is the faster one.
    """
    dtype = weight.dtype if dtype is None else dtype
    return weight.device.type == "cpu" and dtype in _MEASURED and groups == 1 and weight.shape[1] <= 2


def _single_channel(weight: torch.Tensor, groups: int, dtype: torch.dtype) -> bool:
    return native_input_gradient(weight, groups, dtype) and weight.shape[1] == 1


def _native_weight_gradient(weight: torch.Tensor, groups: int) -> bool:
    # ATen's weight gradient is faster for a one-channel 1D/2D convolution, four times slower in 3D
    return _single_channel(weight, groups, weight.dtype) and weight.ndim <= 4


@contextlib.contextmanager
def _native_kernels(on: bool) -> Iterator[None]:
    """Within (when ``on``): CPU convolutions use ATen's own kernels instead of oneDNN's.

    For a convolution with one input channel (the stem of a network on grey-level images) oneDNN's input
    gradient is several times slower than ATen's (a 7 x 7 stem, 64 channels, 32 images of 64^2, one thread:
    132 ms against 19 ms) and its weight gradient slower too (29 against 22 ms); elsewhere oneDNN is faster.
    """
    if not on:
        yield
        return
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)


def _input_grad(grad: torch.Tensor, like: torch.Tensor, weight: torch.Tensor, geometry: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    zeros = [0] * len(stride)
    with _native_kernels(native_input_gradient(weight, groups)):
        return torch.ops.aten.convolution_backward(
            grad, like, weight, None, stride, padding, dilation, False, zeros, groups, [True, False, False]
        )[0]


class ConvInputGrad(torch.autograd.Function):
    """``dL/dv = conv^T(grad, W)``, differentiable in ``grad`` and ``W`` by the native kernels.

    Its backward, for an upstream ``gg`` shaped like the input: ``conv(gg, W)`` for ``grad`` and the weight
    gradient of a convolution of ``gg`` seen from ``grad`` for ``W`` (the adjoint identity
    ``<gg, conv^T(grad, W)> = <conv(gg, W), grad>``).
    """

    @staticmethod
    def forward(ctx, grad, weight, like, geometry):  # noqa: D102
        ctx.set_materialize_grads(False)  # a part of the loss that does not reach the map sends nothing here
        ctx.geometry = geometry
        ctx.save_for_backward(grad, weight)
        return _input_grad(grad, like, weight, geometry)

    @staticmethod
    def backward(ctx, gg):  # noqa: D102
        if gg is None:
            return None, None, None, None
        grad, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        g_grad = g_weight = None
        if ctx.needs_input_grad[0]:
            conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[weight.ndim - 3]
            g_grad = conv(gg, weight, None, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            zeros = [0] * len(stride)
            with _native_kernels(_native_weight_gradient(weight, groups)):
                g_weight = torch.ops.aten.convolution_backward(
                    grad, gg, weight, None, stride, padding, dilation, False, zeros, groups, [False, True, False]
                )[1]
        return g_grad, g_weight, None, None


def _routed_input_gradient(
    grad: torch.Tensor, weight: torch.Tensor, v: torch.Tensor, geometry: tuple, dtype: torch.dtype
) -> torch.Tensor:
    """``v``'s gradient from the gradient of a convolution's output that was computed in ``dtype``: input and
    weight cast as autocast cast them for the forward, the result in ``v``'s dtype (differentiable casts)."""
    g_v = ConvInputGrad.apply(grad.to(dtype), weight.to(dtype), v.detach().to(dtype), geometry)
    return g_v.to(v.dtype)


class ConvRoute(torch.autograd.Function):
    """Identity on a convolution's output ``y``; backward exact, or (switch on) :class:`ConvInputGrad` to ``v``.

    ``y`` is taken in place (the convolution's own node keeps its input and weight, not its output), so no
    copy is made. Where the convolution ran on the detached input (``v`` is then not in ``y``'s graph) the
    exact backward stops at the weight.
    """

    @staticmethod
    def forward(ctx, y, v, weight, geometry, switch):  # noqa: D102
        ctx.set_materialize_grads(False)
        ctx.geometry, ctx.switch, ctx.dtype = geometry, switch, y.dtype
        ctx.save_for_backward(v, weight)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if grad is None or not ctx.switch.on:
            return grad, None, None, None, None
        v, weight = ctx.saved_tensors
        return None, _routed_input_gradient(grad, weight, v, ctx.geometry, ctx.dtype), None, None, None


def depends_on_input_only(v: torch.Tensor, traced: torch.Tensor | None, budget: int = 16) -> bool:
    """True when ``v`` is ``traced`` or made from it by a few operations that involve no other leaf.

    The walk over ``v``'s graph stops after ``budget`` nodes (a deep layer's input is never taken for the
    network's input).
    """
    if traced is None or not v.requires_grad:
        return False
    if v is traced:
        return True
    if v.grad_fn is None:
        return False
    seen: set[int] = set()
    stack = [v.grad_fn]
    reached = False
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > budget:
            return False
        variable = getattr(node, "variable", None)
        if variable is not None:  # an AccumulateGrad: a leaf
            if variable is not traced:
                return False
            reached = True
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return reached


class ConvInputRoute(torch.autograd.Function):
    """Identity on the output ``y`` of a convolution run on the detached input ``v``: the backward sends the
    gradient both to ``y`` (the convolution's own node, which then computes the weight gradient only) and to
    ``v`` through :class:`ConvInputGrad` (ATen's kernel for a single input channel)."""

    @staticmethod
    def forward(ctx, y, v, weight, geometry):  # noqa: D102
        ctx.set_materialize_grads(False)
        ctx.geometry, ctx.dtype = geometry, y.dtype
        ctx.save_for_backward(v, weight)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if grad is None:
            return None, None, None, None
        v, weight = ctx.saved_tensors
        g_v = None
        if ctx.needs_input_grad[1]:
            g_v = _routed_input_gradient(grad, weight, v, ctx.geometry, ctx.dtype)
        return grad if ctx.needs_input_grad[0] else None, g_v, None, None


@contextlib.contextmanager
def single_channel_input_gradient(model: nn.Module) -> Iterator[None]:
    """Within: a CPU convolution with one input channel whose input requires grad computes that gradient with
    ATen's kernel instead of oneDNN's (see :func:`_native_kernels`); values as autograd's, to rounding.

    Args:
        model: the network whose forward runs in the block (for the PPI step: the contrasts', whose input
            gradient trains the mask in ``differentiable`` mode).
    """
    handles = []

    def detach(module, inputs):
        v = inputs[0]
        if not (torch.is_grad_enabled() and isinstance(v, torch.Tensor) and v.requires_grad):
            return None
        if not _single_channel(module.weight, module.groups, compute_dtype(module.weight)):
            return None  # under autocast: a dtype the kernel choice was not measured for
        module._native_entry = v
        return (v.detach(), *inputs[1:])

    def route(geometry: tuple):
        def hook(module, inputs, output):
            v = module.__dict__.pop("_native_entry", None)
            return None if v is None else ConvInputRoute.apply(output, v, module.weight, geometry)

        return hook

    for module in model.modules():
        geometry = conv_geometry(module)
        if geometry is None or not _single_channel(module.weight, module.groups, module.weight.dtype):
            continue
        handles.append(module.register_forward_pre_hook(detach))
        handles.append(module.register_forward_hook(route(geometry)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
