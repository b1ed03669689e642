"""Tests of ppi_med.saliency: WBP's rules and identities, the baselines, and what they leave untouched.

WBP is checked against its own definition (docs/DESIGN.md section 3): an explicit layer-by-layer recursion of
Table 2.1 written here without autograd hooks, input x gradient where the two must agree, completeness
where the network is positively homogeneous, and finite differences for the trainable (create_graph)
version. Grad-CAM is checked against MONAI's post-hoc implementation, LRP against hand-computed relevance.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet, ResNet
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import default_normalizer
from torch import nn
from torch.func import functional_call

from ppi_med.saliency import (
    METHODS,
    RULES,
    Secant,
    SecantSlopeWarning,
    UnsupportedLayerError,
    UnsupportedOperationError,
    WBPTracer,
    compute,
    lrp,
    make_tracer,
    register_rule,
    wbp,
)
from ppi_med.saliency.rules import population_var

SPATIAL = {2: 12, 3: 8}


def _conv(sd: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[sd]


def _bn(sd: int) -> type[nn.Module]:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[sd]


def _maxpool(sd: int) -> type[nn.Module]:
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[sd]


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give every batch norm non-trivial statistics and affine parameters (fresh ones are the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


def vgg(sd: int, classes: int = 3, act: type[nn.Module] = nn.ReLU, bias: bool = True, bn: bool = True) -> nn.Sequential:
    """A small VGG-style classifier for inputs of side ``SPATIAL[sd]``."""
    conv, norm, pool = _conv(sd), _bn(sd), _maxpool(sd)
    side = SPATIAL[sd] // 4
    layers: list[nn.Module] = [conv(1, 4, 3, padding=1, bias=bias)]
    layers += [norm(4)] if bn else []
    layers += [act(), pool(2), conv(4, 6, 3, padding=1, bias=bias)]
    layers += [norm(6)] if bn else []
    layers += [act(), pool(2), nn.Flatten(), nn.Linear(6 * side**sd, 10, bias=bias), act(), nn.Dropout(0.3)]
    layers += [nn.Linear(10, classes, bias=bias)]
    return nn.Sequential(*layers)


def small_resnet(sd: int) -> nn.Module:
    return ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[8, 16, 32, 64],
        spatial_dims=sd,
        n_input_channels=1,
        num_classes=3,
    )


def small_densenet(sd: int) -> nn.Module:
    return DenseNet(sd, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2))


def _input(sd: int, n: int = 2, side: int | None = None, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, *([side or SPATIAL[sd]] * sd), generator=gen, dtype=dtype)


def _seeded_rich_2d(side: int, dtype=torch.float64) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The rich 2D network in training mode with non-trivial batch norms, three inputs and a target each."""
    torch.manual_seed(31)
    model = rich_sequential(2).to(dtype).train()
    _randomize_bn(model, torch.Generator().manual_seed(32))
    return model, _input(2, n=3, side=side, dtype=dtype), torch.tensor([0, 1, 2])


def _input_x_gradient(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """Reference input x gradient straight from autograd (no ppi_med code)."""
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    t = torch.as_tensor(target).expand(x.shape[0]) if torch.as_tensor(target).ndim == 0 else target
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xg)
    return g * x


# ---------------------------------------------------------------------------------------------------------
# an explicit WBP recursion (Table 2.1), written without autograd, to check the hook implementation against


def reference_wbp(seq: nn.Sequential, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``W~0 * x`` by the update rules of Table 2.1 applied layer by layer from ``W~L = e_target``."""
    inputs = []
    h = x
    with torch.no_grad():
        for layer in seq:
            inputs.append(h)
            h = layer(h)
        w = F.one_hot(target, h.shape[1]).to(x.dtype)
        for layer, v in reversed(list(zip(seq, inputs))):
            if isinstance(layer, nn.Linear):
                w = w @ layer.weight
            elif isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                sd = v.ndim - 2
                k, s, p = layer.kernel_size, layer.stride, layer.padding
                extra = [v.shape[2 + i] - ((w.shape[2 + i] - 1) * s[i] - 2 * p[i] + k[i]) for i in range(sd)]
                transposed = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[sd]
                w = transposed(w, layer.weight, None, s, p, extra)
            elif isinstance(layer, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
                sd = v.ndim - 2
                pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[sd]
                unpool = {1: F.max_unpool1d, 2: F.max_unpool2d, 3: F.max_unpool3d}[sd]
                _, idx = pool(v, layer.kernel_size, layer.stride, return_indices=True)
                w = unpool(w, idx, layer.kernel_size, layer.stride, output_size=v.shape[2:])
            elif isinstance(layer, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
                assert layer.output_size in (1, (1,) * (v.ndim - 2))
                w = w.expand_as(v) / v[0, 0].numel()
            elif isinstance(layer, nn.Flatten):
                w = w.reshape(v.shape)
            elif isinstance(layer, (nn.Dropout, nn.Identity)):
                assert not layer.training or not isinstance(layer, nn.Dropout) or layer.p == 0
            elif isinstance(layer, nn.GroupNorm):
                n, c = v.shape[:2]
                var = v.reshape(n, layer.num_groups, -1).var(dim=-1, unbiased=False)
                var = var.repeat_interleave(c // layer.num_groups, dim=1)
                scale = layer.weight / torch.sqrt(var + layer.eps)
                w = w * scale.reshape(n, c, *([1] * (v.ndim - 2)))
            elif isinstance(layer, nn.modules.instancenorm._InstanceNorm):
                if layer.training or not layer.track_running_stats:
                    var = v.var(dim=tuple(range(2, v.ndim)), unbiased=False)
                else:
                    var = layer.running_var.expand(v.shape[0], -1)
                scale = 1 / torch.sqrt(var + layer.eps)
                if layer.affine:
                    scale = scale * layer.weight
                w = w * scale.reshape(*v.shape[:2], *([1] * (v.ndim - 2)))
            elif isinstance(layer, nn.LayerNorm):
                dims = tuple(range(v.ndim - len(layer.normalized_shape), v.ndim))
                var = v.var(dim=dims, unbiased=False, keepdim=True)
                w = w * layer.weight / torch.sqrt(var + layer.eps)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                dims = [0, *range(2, v.ndim)]
                var = v.var(dim=dims, unbiased=False) if layer.training else layer.running_var
                scale = layer.weight / torch.sqrt(var + layer.eps)
                w = w * scale.reshape(1, -1, *([1] * (v.ndim - 2)))
            else:  # element-wise activation: the secant slope g(v) / v
                assert bool((v != 0).all())
                w = w * layer(v) / v
    return w * x


def rich_sequential(sd: int = 2) -> nn.Sequential:
    conv, norm, pool = _conv(sd), _bn(sd), _maxpool(sd)
    avg = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[sd]
    return nn.Sequential(
        conv(1, 3, 3, padding=1),
        norm(3),
        nn.Tanh(),
        pool(2),
        conv(3, 5, 3, stride=2, padding=1),
        norm(5),
        nn.ELU(),
        avg(1),
        nn.Flatten(),
        nn.Linear(5, 6),
        nn.SiLU(),
        nn.Linear(6, 3),
    )


@pytest.mark.parametrize("sd", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_wbp_matches_explicit_recursion_of_table_2_1(sd: int, training: bool) -> None:
    torch.manual_seed(1)
    model = rich_sequential(sd).double()
    _randomize_bn(model, torch.Generator().manual_seed(2))
    model.train(training)
    x = _input(sd, n=3, side=8, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    expected = reference_wbp(model, x, target)
    torch.testing.assert_close(wbp(model, x, target), expected, rtol=1e-10, atol=1e-12)


def _randomize_affine(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)):
                if m.weight is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
                if getattr(m, "running_var", None) is not None:
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("tracked", [False, True])
def test_wbp_keeps_only_the_scale_of_group_instance_and_layer_norm(training: bool, tracked: bool) -> None:
    torch.manual_seed(27)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.InstanceNorm2d(4, affine=True, track_running_stats=tracked),
        nn.ELU(),
        nn.Flatten(),
        nn.LayerNorm(4 * 6 * 6),
        nn.Linear(4 * 6 * 6, 3),
    ).double()
    _randomize_affine(model, torch.Generator().manual_seed(28))
    model.train(training)
    x = _input(2, n=3, side=6, dtype=torch.float64, seed=29)
    target = torch.tensor([2, 1, 0])
    s = wbp(model, x, target)
    torch.testing.assert_close(s, reference_wbp(model, x, target), rtol=1e-10, atol=1e-12)
    # data-dependent statistics make the exact gradient different
    assert (s - _input_x_gradient(model, x, target)).abs().max() > 1e-3 * s.abs().max()


def test_in_place_activations_give_the_same_map_and_second_order_gradients() -> None:
    def net(inplace: bool) -> nn.Sequential:
        torch.manual_seed(30)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ELU(inplace=inplace),
            nn.Conv2d(3, 3, 3, padding=1),
            nn.SiLU(inplace=inplace),
            nn.Hardtanh(-0.5, 0.5, inplace=inplace),
            nn.Flatten(),
            nn.Linear(3 * 36, 2),
        ).double()

    a, b = net(False), net(True)
    x = _input(2, n=2, side=6, dtype=torch.float64)
    sa, sb = wbp(a, x, 1, create_graph=True), wbp(b, x, 1, create_graph=True)
    torch.testing.assert_close(sa, sb, rtol=1e-12, atol=1e-15)
    ga = torch.autograd.grad(sa.pow(2).sum(), list(a.parameters())[:-1])
    gb = torch.autograd.grad(sb.pow(2).sum(), list(b.parameters())[:-1])
    for g, h in zip(ga, gb):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-15)


def test_a_traced_forward_still_backpropagates_the_exact_gradient() -> None:
    """Under WBPTracer, an ordinary backward (the training loss) must see the true Jacobian."""
    model, x, target = _seeded_rich_2d(8)
    params = list(model.parameters())

    xg = x.clone().requires_grad_(True)
    with WBPTracer(model) as tracer:
        logits = model(xg)
    s = tracer.saliency(logits, xg, target, create_graph=True, retain_graph=True)
    traced = torch.autograd.grad(F.cross_entropy(logits, target), [xg, *params])

    xr = x.clone().requires_grad_(True)
    plain = torch.autograd.grad(F.cross_entropy(model(xr), target), [xr, *params])
    for g, h in zip(traced, plain):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)
    # and the saliency taken from that same forward is WBP
    torch.testing.assert_close(s, reference_wbp(model, x, target), rtol=1e-10, atol=1e-12)


def test_without_input_gradient_the_exact_backward_stops_at_the_first_convolution() -> None:
    """``input_gradient = False`` (the PPI step's input): the saliency and the parameters' gradients (the
    loss's and the map's, second order) are unchanged; only the input's gradient from the loss is dropped."""
    model, x, target = _seeded_rich_2d(8)
    params = list(model.parameters())
    results = []
    for input_gradient in (True, False):
        xg = x.clone().requires_grad_(True)
        tracer = WBPTracer(model)
        tracer.input_gradient = input_gradient
        with tracer:
            logits = model(xg)
        s = tracer.saliency(logits, xg, target, create_graph=True, retain_graph=True)
        loss = F.cross_entropy(logits, target) + s.square().sum()
        grads = torch.autograd.grad(loss, [xg, *params], allow_unused=True, retain_graph=True)
        direct = torch.autograd.grad(F.cross_entropy(logits, target), [xg], allow_unused=True)[0]
        results.append((s, grads, direct))
    (s, grads, direct), (s_off, grads_off, direct_off) = results
    torch.testing.assert_close(s_off, s, rtol=1e-12, atol=1e-14)
    for g, h in zip(grads_off[1:], grads[1:]):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)
    assert direct is not None and direct.abs().max() > 0 and direct_off is None


def test_neither_backward_carries_zeros_through_the_batch_norm_slopes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The slope of a training batch norm's rerouting node gets a gradient only where a loss on a
    differentiable map is backpropagated; the saliency's own backward and a training loss's send it none (a
    tensor of zeros there would be computed and carried back through the whole network)."""
    from ppi_med.saliency import rules

    received: list[bool] = []
    backward = rules._SavedInvStd.backward

    def counting(ctx, grad):
        received.append(grad is not None)
        return backward(ctx, grad)

    monkeypatch.setattr(rules._SavedInvStd, "backward", staticmethod(counting))
    torch.manual_seed(31)
    model = rich_sequential(2).double().train()
    x = _input(2, n=3, side=8, dtype=torch.float64).requires_grad_(True)
    target = torch.tensor([0, 1, 2])
    with WBPTracer(model) as tracer:
        logits = model(x)
    s = tracer.saliency(logits, x, target, create_graph=True, retain_graph=True)
    F.cross_entropy(logits, target).backward(retain_graph=True)
    assert not any(received)
    s.square().sum().backward()
    assert sum(received) == 2  # the two batch norms, once each


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_single_channel_stem_gives_autograd_s_gradients_through_its_own_kernel(dtype: torch.dtype) -> None:
    from ppi_med.saliency.conv_input import single_channel_input_gradient

    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 8, 7, padding=3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    model = model.to(dtype)
    x = torch.randn(3, 1, 12, 12, dtype=dtype)
    probe = torch.randn(3, 4, 5, 5, dtype=dtype)
    results = []
    for native in (False, True):
        xg = x.clone().requires_grad_(True)
        with single_channel_input_gradient(model) if native else contextlib.nullcontext():
            out = model(xg)
        results.append(torch.autograd.grad((out * probe).sum(), [xg, *model.parameters()]))
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for g, h in zip(*results):
        torch.testing.assert_close(h, g, **tol)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# Autocast: torch.autocast casts a convolution's input and weight to bfloat16 (CPU) and leaves float64 alone;
# the routing nodes must compute in the dtype the convolution ran in


@pytest.mark.parametrize("node", ["route", "input_route"])
def test_the_routing_nodes_under_bfloat16_autocast_give_autograd_s_first_and_second_order_gradients(
    node: str,
) -> None:
    """A float32 convolution under autocast: the node's input gradient (and, differentiated again, the
    weight's and the output gradient's) are those of autograd's own bfloat16 convolution backward."""
    from ppi_med.saliency.conv_input import ConvInputRoute, ConvRoute, conv_geometry
    from ppi_med.saliency.core import Switch

    torch.manual_seed(3)
    conv = nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(2, 2, 8, 8, requires_grad=True)
    probe = torch.randn(2, 4, 8, 8, requires_grad=True)  # the output's gradient, itself differentiated
    probe2 = torch.randn(2, 2, 8, 8)
    results = []
    for routed in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if not routed:
                y = conv(x)
            elif node == "route":
                y = ConvRoute.apply(conv(x), x, conv.weight, conv_geometry(conv), Switch(on=True))
            else:
                y = ConvInputRoute.apply(conv(x.detach()), x, conv.weight, conv_geometry(conv))
            assert y.dtype == torch.bfloat16
            (g_x,) = torch.autograd.grad(y, x, probe, create_graph=True)
            second = torch.autograd.grad((g_x * probe2).sum(), [conv.weight, probe])
        assert g_x.dtype == torch.float32 and all(g.dtype == torch.float32 for g in second)
        results.append((g_x, *second))
    for routed, plain in zip(*reversed(results)):
        assert torch.isfinite(routed).all()
        torch.testing.assert_close(routed, plain, rtol=2e-2, atol=2e-2 * float(plain.detach().abs().max()))


def _map_and_second_order_gradients(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, amp: bool, input_gradient: bool = True
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A differentiable WBP map and the parameters' gradients of a loss on the logits and on the map."""
    xg = x.clone().requires_grad_(True)
    tracer = WBPTracer(model)
    tracer.input_gradient = input_gradient
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        with tracer:
            logits = model(xg)
        s = tracer.saliency(logits, xg, target, create_graph=True, retain_graph=True)
        loss = F.cross_entropy(logits.to(x.dtype), target) + s.to(x.dtype).square().sum()
    return s.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("input_gradient", [True, False])
def test_wbp_under_bfloat16_autocast_is_the_float32_map_and_gradients_to_bfloat16_precision(
    input_gradient: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32 network with a single-channel stem, in training mode, traced under CPU bfloat16 autocast:
    map and second-order gradients are finite, within bfloat16 precision of float32's, and those of autograd's
    own convolution backward in bfloat16 (the routing switched off)."""
    import sys

    model, x, target = _seeded_rich_2d(16, torch.float32)
    s32, g32 = _map_and_second_order_gradients(model, x, target, amp=False, input_gradient=input_gradient)
    s16, g16 = _map_and_second_order_gradients(model, x, target, amp=True, input_gradient=input_gradient)
    monkeypatch.setattr(sys.modules["ppi_med.saliency.wbp"], "conv_geometry", lambda module: None)
    s_ref, g_ref = _map_and_second_order_gradients(model, x, target, amp=True)
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()
    assert all(torch.isfinite(g).all() for g in g16)
    torch.testing.assert_close(s16, s32, rtol=0, atol=0.03 * float(s32.abs().max()))
    scale = max(float(g.abs().max()) for g in g32)
    for (name, _), g, h, r in zip(model.named_parameters(), g16, g32, g_ref):
        torch.testing.assert_close(g, h, rtol=0, atol=0.1 * scale, msg=name)
        torch.testing.assert_close(g, r, rtol=0, atol=0.01 * scale, msg=name)


def test_autocast_leaves_a_float64_network_s_map_and_gradients_in_float64() -> None:
    model, x, target = _seeded_rich_2d(16)
    s, grads = _map_and_second_order_gradients(model, x, target, amp=False)
    s_amp, grads_amp = _map_and_second_order_gradients(model, x, target, amp=True)
    assert s_amp.dtype == torch.float64
    torch.testing.assert_close(s_amp, s, rtol=1e-12, atol=1e-14)
    for g, h in zip(grads_amp, grads):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lrp_under_bfloat16_autocast_keeps_aten_s_stem_kernel_to_the_dtypes_it_was_measured_for(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LRP's first convolution on [a+, a-] (two channels): ATen's input gradient in float64 even under
    autocast (which leaves float64 alone), oneDNN's for the bfloat16 that autocast makes of float32; the map
    is the one without autocast, exactly in float64 and to bfloat16 precision in float32."""
    import sys

    lrp_module = sys.modules["ppi_med.saliency.lrp"]
    chosen: list[bool] = []
    choose = lrp_module.native_input_gradient

    def spy(*args):
        chosen.append(choose(*args))
        return chosen[-1]

    monkeypatch.setattr(lrp_module, "native_input_gradient", spy)
    torch.manual_seed(0)
    model = vgg(2).to(dtype).eval()
    _randomize_bn(model, torch.Generator().manual_seed(1))
    x = _input(2, dtype=dtype)  # signed: the stem runs on [a+, a-]
    target = torch.tensor([2, 0])
    plain = lrp(model, x, target)
    assert chosen == [True, False]  # the stem; the second convolution, on four channels, keeps oneDNN
    chosen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = lrp(model, x, target)
    assert amp.dtype == dtype and torch.isfinite(amp).all()
    if dtype == torch.float64:
        assert chosen == [True, False]
        torch.testing.assert_close(amp, plain, rtol=1e-12, atol=1e-14)
    else:
        assert chosen == [False, False]
        torch.testing.assert_close(amp, plain, rtol=0, atol=0.03 * float(plain.abs().max()))


# ---------------------------------------------------------------------------------------------------------
# WBP == input x gradient for ReLU / BN / pooling networks


@pytest.mark.parametrize("sd", [2, 3])
@pytest.mark.parametrize("factory", [small_resnet, small_densenet, vgg], ids=["resnet", "densenet", "vgg"])
def test_wbp_equals_input_x_gradient_on_relu_networks(sd: int, factory) -> None:
    torch.manual_seed(0)
    model = factory(sd)
    _randomize_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    side = 16 if factory is not vgg else None
    x = _input(sd, n=2, side=side)
    target = torch.tensor([2, 0])
    s = wbp(model, x, target)
    expected = _input_x_gradient(model, x, target)
    assert s.shape == x.shape
    assert s.abs().max() > 0
    torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compute("wbp", model, x, target), s)
    torch.testing.assert_close(compute("input_x_gradient", model, x, target), expected, rtol=1e-5, atol=1e-7)


def test_gradient_method_is_the_plain_input_gradient() -> None:
    torch.manual_seed(0)
    model = vgg(2).eval()
    x = _input(2)
    g = compute("gradient", model, x, 1)
    torch.testing.assert_close(g * x, _input_x_gradient(model, x, 1))


# ---------------------------------------------------------------------------------------------------------
# completeness on bias-free networks, and where WBP parts from the gradient


@pytest.mark.parametrize("sd", [2, 3])
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.ELU, nn.SiLU, nn.Sigmoid, nn.GELU])
def test_wbp_completeness_on_bias_free_networks(sd: int, act: type[nn.Module]) -> None:
    torch.manual_seed(3)
    model = vgg(sd, act=act, bias=False, bn=False).double().eval()
    x = _input(sd, n=3, dtype=torch.float64, seed=4)
    target = torch.tensor([0, 1, 2])
    if act is nn.Sigmoid:  # g(0) = 1/2: the secant slopes explode near 0, and WBP says so
        with pytest.warns(SecantSlopeWarning, match=r"layer '1' \(Sigmoid\) reach \d"):
            s = wbp(model, x, target)
    else:
        s = wbp(model, x, target)
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(s.reshape(3, -1).sum(dim=1), logits, rtol=1e-9, atol=1e-12)
    ixg = _input_x_gradient(model, x, target)
    if act is nn.ReLU:
        torch.testing.assert_close(s, ixg)
    else:  # the secant slope is not the derivative
        assert (s - ixg).abs().max() > 1e-3 * s.abs().max()


def test_wbp_completeness_with_batch_norm_as_a_pure_scale() -> None:
    """Eval-mode BN with zero mean and zero bias is a per-channel scale: completeness still holds."""
    torch.manual_seed(5)
    model = vgg(2, act=nn.Tanh, bias=False, bn=True).double().eval()
    _randomize_bn(model, torch.Generator().manual_seed(6))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
    x = _input(2, n=2, dtype=torch.float64)
    s = wbp(model, x, 1)
    torch.testing.assert_close(s.reshape(2, -1).sum(dim=1), model(x)[:, 1], rtol=1e-9, atol=1e-12)


def test_secant_slope_takes_the_derivative_at_exact_zeros() -> None:
    """A pre-activation of exactly 0 uses g'(0): tanh'(0) = 1, so W~0 = 3 [1, 1] + 5 tanh(2)/2 [2, 0]."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Tanh(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[3.0, 5.0]]))
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # first hidden unit: exactly 0
    s = wbp(model, x, 0)
    t2 = torch.tanh(torch.tensor(2.0, dtype=torch.float64))
    expected = torch.stack([3 + 5 * t2, torch.tensor(-3.0, dtype=torch.float64)])[None]
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(s).all()


# ---------------------------------------------------------------------------------------------------------
# targets


def test_per_sample_targets_give_each_sample_its_own_class_map() -> None:
    torch.manual_seed(7)
    model = vgg(2, act=nn.ELU)
    _randomize_bn(model, torch.Generator().manual_seed(8))
    model.eval()
    x = _input(2, n=3)
    target = torch.tensor([2, 0, 1])
    for method in ("wbp", "gradient", "input_x_gradient", "gradcam", "lrp"):
        batch = compute(method, model, x, target)
        for i in range(3):
            single = compute(method, model, x[i : i + 1], int(target[i]))
            torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-4, atol=1e-6, msg=method)
        # a different class really gives a different map
        other = compute(method, model, x, (target + 1) % 3)
        assert not torch.allclose(batch, other), method


# ---------------------------------------------------------------------------------------------------------
# trainable WBP (create_graph=True)


class _WithParams(nn.Module):
    """Runs ``model`` with substituted parameters, so gradcheck can treat them as inputs."""

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.params = params  # a plain dict: not registered, the wrapper itself owns nothing

    def forward(self, x):
        return functional_call(self.model, self.params, (x,))


def _tiny_trainable() -> nn.Sequential:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).double()
    _randomize_bn(model, torch.Generator().manual_seed(10))
    return model.train()


def test_create_graph_second_order_gradients_pass_gradcheck() -> None:
    model = _tiny_trainable()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    x = _input(2, n=3, side=3, dtype=torch.float64, seed=11).requires_grad_(True)
    target = torch.tensor([0, 2, 1])
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)

    def f(xx, *ps):
        wrapped = _WithParams(model, dict(zip(names, ps)))
        s = wbp(wrapped, xx, target, create_graph=True)
        return (s * probe).sum() + (s**2).sum()

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    # the gradient w.r.t. the parameters is really there (not all zeros); the last bias cannot matter
    grads = torch.autograd.grad(f(x, *params), params, allow_unused=True)
    assert all(g.abs().max() > 0 for g in grads[:-1])
    assert names[-1] == "4.bias" and grads[-1] is None


def test_create_graph_trains_the_model_and_matches_a_finite_difference() -> None:
    model = _tiny_trainable()
    x = _input(2, n=3, side=3, dtype=torch.float64, seed=13)
    s = wbp(model, x, 1, create_graph=True)
    assert s.requires_grad
    loss = s.abs().sum()
    loss.backward()
    w = model[0].weight
    assert w.grad is not None and w.grad.abs().max() > 0
    # directional finite difference along the gradient of the first conv weight
    direction = w.grad / w.grad.norm()
    h = 1e-6
    with torch.no_grad():
        w.add_(h * direction)
        up = wbp(model, x, 1).abs().sum()
        w.sub_(2 * h * direction)
        down = wbp(model, x, 1).abs().sum()
        w.add_(h * direction)
    torch.testing.assert_close((up - down) / (2 * h), (w.grad * direction).sum(), rtol=1e-5, atol=1e-8)


def test_without_create_graph_the_map_is_detached() -> None:
    model = _tiny_trainable()
    x = _input(2, n=2, side=3, dtype=torch.float64)
    for method in METHODS:
        s = compute(method, model, x, 0)
        assert not s.requires_grad and s.grad_fn is None, method


# ---------------------------------------------------------------------------------------------------------
# training-mode batch norm


def test_training_mode_batch_norm_uses_batch_statistics_as_constants() -> None:
    torch.manual_seed(14)
    conv, bn, lin = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(2 * 5 * 5, 2)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), lin).double().train()
    _randomize_bn(model, torch.Generator().manual_seed(15))
    x = _input(2, n=4, side=5, dtype=torch.float64, seed=16)
    target = torch.tensor([1, 0, 1, 1])

    with torch.no_grad():
        z = conv(x)
        y = bn(z)
        w = lin.weight[target].reshape(4, 2, 5, 5) * (y > 0)
        var = z.var(dim=(0, 2, 3), unbiased=False)
        w = w * (bn.weight / torch.sqrt(var + bn.eps)).reshape(1, 2, 1, 1)
        expected = F.conv_transpose2d(w, conv.weight, padding=1) * x
    torch.testing.assert_close(wbp(model, x, target), expected, rtol=1e-10, atol=1e-12)
    # the exact gradient also differentiates the batch statistics, so it is different
    assert (expected - _input_x_gradient(model, x, target)).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("dims", [[0, 2, 3], [2, 3], [-1], [1, 2, 3]])
def test_population_variance_matches_torch_and_differentiates_twice(dims: list[int]) -> None:
    v = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    v.requires_grad_(True)
    torch.testing.assert_close(population_var(v, dims), v.var(dim=dims, unbiased=False, keepdim=True))
    assert torch.autograd.gradcheck(lambda t: population_var(t, dims), (v,))
    assert torch.autograd.gradgradcheck(lambda t: population_var(t, dims), (v,))


# ---------------------------------------------------------------------------------------------------------
# the model is left exactly as it was


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_model_state_is_untouched(method: str, training: bool) -> None:
    torch.manual_seed(17)
    model = vgg(2, act=nn.SiLU)
    _randomize_bn(model, torch.Generator().manual_seed(18))
    x = _input(2, n=3)
    # give the model gradients of its own, as in the middle of a training step
    F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    model.train(training)
    model[4].eval()  # a mixed-mode model: one layer differs from the rest
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    kwargs = {"create_graph": True} if method != "lrp" else {}

    s = compute(method, model, x, torch.tensor([1, 1, 0]), **kwargs)

    assert s.shape == x.shape and torch.isfinite(s).all()
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    if method != "wbp":
        return
    s2 = wbp(model, x, 0, create_graph=False)
    assert s2.shape == x.shape
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---------------------------------------------------------------------------------------------------------
# Grad-CAM


@pytest.mark.parametrize("sd", [2, 3])
@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_gradcam_matches_monai(sd: int, layer: str) -> None:
    torch.manual_seed(21)
    model = small_resnet(sd)
    _randomize_bn(model, torch.Generator().manual_seed(20))
    model.eval()
    x = _input(sd, n=2, side=16)
    ours = compute("gradcam", model, x, 1, layer=layer)
    reference = GradCAM(model, target_layers=layer)(x, class_idx=1)
    assert ours.shape == x.shape
    assert ours.min() >= 0 and bool((ours.reshape(2, -1).amax(dim=1) > 0).all())  # non-trivial maps
    torch.testing.assert_close(default_normalizer(ours[:, :1]), reference, rtol=1e-5, atol=1e-5)


def test_gradcam_picks_the_last_spatial_layer_by_default() -> None:
    torch.manual_seed(21)
    model = small_resnet(2).eval()
    big = _input(2, n=2, side=64)  # layer4's output is 2 x 2: the default
    torch.testing.assert_close(compute("gradcam", model, big, 1), compute("gradcam", model, big, 1, layer="layer4"))
    small = _input(2, n=2, side=16)  # layer4's output is 1 x 1, not spatial: layer3 is the default
    torch.testing.assert_close(compute("gradcam", model, small, 1), compute("gradcam", model, small, 1, layer="layer3"))


def test_gradcam_is_differentiable() -> None:
    torch.manual_seed(22)
    model = small_resnet(2).train()
    x = _input(2, n=3, side=32)
    cam = compute("gradcam", model, x, torch.tensor([0, 1, 2]), create_graph=True)
    assert cam.requires_grad
    cam.mean().backward()
    # parameters before the feature layer (through the activations) and after it (through the class weights)
    assert model.conv1.weight.grad.abs().max() > 0
    assert model.fc.weight.grad.abs().max() > 0


class TinyMultiView(nn.Module):
    """A 2D backbone on every view of ``(N, 1, V, H, W)``, max-pooled over the views, then a linear head."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        n, c, v, h, w = x.shape
        f = self.backbone(x.transpose(1, 2).reshape(n * v, c, h, w))
        f = f.amax(dim=(2, 3)).reshape(n, v, -1).amax(dim=1)
        return self.head(f)


def test_gradcam_regroups_multi_view_maps_per_volume() -> None:
    torch.manual_seed(23)
    model = TinyMultiView().eval()
    n, views = 2, 3
    x = torch.randn(n, 1, views, 8, 8)
    cam = compute("gradcam", model, x, 1)
    assert cam.shape == x.shape

    # reference: the 2D Grad-CAM of every view image, from the backbone's own output
    feats = model.backbone(x.transpose(1, 2).reshape(n * views, 1, 8, 8))
    logits = model.head(feats.amax(dim=(2, 3)).reshape(n, views, -1).amax(dim=1))
    (grad,) = torch.autograd.grad(logits[:, 1].sum(), feats)
    maps = F.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(dim=1, keepdim=True))
    maps = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
    assert maps.abs().max() > 0
    for i in range(n):
        for v in range(views):
            torch.testing.assert_close(cam[i, 0, v], maps[i * views + v, 0])


# ---------------------------------------------------------------------------------------------------------
# LRP


def test_lrp_hand_computed_example() -> None:
    """x = [2, 1, -1], conv kernel [1, -0.5], ReLU, dense [2, 1]: z-plus then epsilon gives [3, 1, 0.5]."""
    model = nn.Sequential(nn.Conv1d(1, 1, 2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[1.0, -0.5]]]))
        model[3].weight.copy_(torch.tensor([[2.0, 1.0]]))
    x = torch.tensor([[[2.0, 1.0, -1.0]]], dtype=torch.float64)
    r = lrp(model, x, 0)
    torch.testing.assert_close(r, torch.tensor([[[3.0, 1.0, 0.5]]], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compute("lrp", model, x, 0), r)
    # z-plus differs from the gradient rule (input x gradient gives [2, 0.5, -1 + ...])
    assert not torch.allclose(r, _input_x_gradient(model, x, 0))


@pytest.mark.parametrize("sd", [2, 3])
def test_lrp_conserves_relevance_on_bias_free_relu_networks(sd: int) -> None:
    torch.manual_seed(24)
    model = vgg(sd, bias=False, bn=False).double().eval()
    x = _input(sd, n=3, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    # the stabiliser epsilon absorbs a share of the relevance of order epsilon
    r = compute("lrp", model, x, target, epsilon=1e-12)
    torch.testing.assert_close(r.reshape(3, -1).sum(dim=1), logits, rtol=1e-9, atol=1e-10)
    r = compute("lrp", model, x, target)
    torch.testing.assert_close(r.reshape(3, -1).sum(dim=1), logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(r, _input_x_gradient(model, x, target))


@pytest.mark.parametrize("sd", [2, 3])
def test_lrp_merges_batch_norm_into_the_preceding_layer(sd: int) -> None:
    torch.manual_seed(25)
    model = vgg(sd, bias=True, bn=True).double()
    _randomize_bn(model, torch.Generator().manual_seed(26))
    model.train()  # LRP must use the running statistics (eval mode) whatever the model's mode
    folded = vgg(sd, bias=True, bn=False).double().eval()
    pairs = [(0, 1), (4, 5)]  # (conv, bn) indices in the model with BN
    with torch.no_grad():
        for (ci, bi), fi in zip(pairs, (0, 3)):
            conv, bn, dst = model[ci], model[bi], folded[fi]
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            dst.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
            dst.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        for src, dst in ((model[9], folded[7]), (model[12], folded[10])):
            dst.load_state_dict(src.state_dict())
    x = _input(sd, n=2, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(model(x), folded(x))  # the folding is right
    model.train()
    r = lrp(model, x, torch.tensor([1, 2]))
    assert model.training
    torch.testing.assert_close(r, lrp(folded, x, torch.tensor([1, 2])), rtol=1e-8, atol=1e-10)
    # without merging (BN's own gradient) the relevance would differ
    assert not torch.allclose(r, _input_x_gradient(model.eval(), x, torch.tensor([1, 2])))


@pytest.mark.parametrize("act", [nn.Tanh, nn.ELU, nn.SiLU, nn.Softplus])
def test_lrp_passes_relevance_through_element_wise_activations_unchanged(act: type[nn.Module]) -> None:
    """Not multiplied by the derivative: a bias-free network conserves relevance whatever its activation."""
    torch.manual_seed(36)
    model = vgg(2, act=act, bias=False, bn=False).double().eval()
    x = _input(2, n=3, dtype=torch.float64, seed=37)
    target = torch.tensor([0, 1, 2])
    r = lrp(model, x, target, epsilon=1e-12)
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(r.reshape(3, -1).sum(dim=1), logits, rtol=1e-6, atol=1e-9)


def test_lrp_in_place_activation_equals_the_out_of_place_one() -> None:
    def net(inplace: bool) -> nn.Sequential:
        torch.manual_seed(38)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ELU(inplace=inplace), nn.Flatten(), nn.Linear(3 * 36, 2)
        ).double()  # fmt: skip

    x = _input(2, n=2, side=6, dtype=torch.float64)
    torch.testing.assert_close(lrp(net(True), x, 1), lrp(net(False), x, 1), rtol=1e-12, atol=1e-15)


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, i: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_lrp_finds_batch_norm_pairs_once_per_model_and_again_when_it_changes() -> None:
    torch.manual_seed(39)
    model = vgg(2).double()
    _randomize_bn(model, torch.Generator().manual_seed(40))
    model.eval()
    x = _input(2, n=2, dtype=torch.float64)
    calls = _count_forwards(model)
    first = lrp(model, x, 1)
    assert calls[0] == 2  # the dry forward that finds the pairs, then LRP's own
    torch.testing.assert_close(lrp(model, x, 1), first, rtol=0, atol=0)
    assert calls[0] == 3  # cached: one forward per call
    # merged weights follow the parameters and statistics they come from
    with torch.no_grad():
        model[1].running_var.mul_(2.0)
        model[0].weight.mul_(-1.0)
    changed = lrp(model, x, 1)
    assert calls[0] == 4 and not torch.allclose(changed, first)
    fresh = copy.deepcopy(model)
    fresh._forward_pre_hooks.clear()
    torch.testing.assert_close(changed, lrp(fresh, x, 1), rtol=1e-12, atol=1e-15)
    # a new layer: the pairs are found again
    model[5] = nn.BatchNorm2d(6).double().eval()
    lrp(model, x, 1)
    assert calls[0] == 6


def test_lrp_skips_the_negative_input_convolution_where_the_input_is_non_negative() -> None:
    torch.manual_seed(41)
    model = vgg(2, bn=False).double().eval()
    first, second = model[0], model[3]
    counts = {first: 0, second: 0}
    for conv in counts:
        forward = conv._conv_forward

        def counted(*args, conv=conv, forward=forward):
            counts[conv] += 1
            return forward(*args)

        conv._conv_forward = counted
    x = _input(2, n=2, dtype=torch.float64)
    lrp(model, x, 1)  # the first call also runs the dry forward that looks for batch norms
    counts.update(dict.fromkeys(counts, 0))
    signed = lrp(model, x, 1)
    # the layer's own convolution, then z+ from a+ and w+ (and, where the input has negatives, from a- and w-,
    # in the same convolution over the two halves side by side)
    assert counts == {first: 2, second: 2}
    non_negative = lrp(model, x.abs(), 1)
    assert counts == {first: 4, second: 4}
    assert torch.isfinite(signed).all() and torch.isfinite(non_negative).all()


@pytest.mark.parametrize(
    ("norm", "kind"),
    [
        (nn.GroupNorm(2, 4), "GroupNorm"),
        (nn.InstanceNorm2d(4), "InstanceNorm2d"),
        (nn.BatchNorm2d(4, track_running_stats=False), "BatchNorm2d"),
    ],
)
def test_lrp_refuses_normalisations_without_an_lrp_rule(norm: nn.Module, kind: str) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(UnsupportedLayerError, match=rf"LRP has no rule for layer '1' \({kind}\)"):
        compute("lrp", model, torch.randn(2, 1, 8, 8), 0)


def test_sigmoid_slopes_warn_once_per_layer_naming_it_and_the_largest_slope() -> None:
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(4, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    x = torch.randn(8, 4)
    with pytest.warns(SecantSlopeWarning) as caught:
        s = wbp(model, x, 1)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "layer '1' (Sigmoid)" in messages[0] and "g(0) = 0.5" in messages[0]
    largest = float(re.search(r"reach (\S+):", messages[0]).group(1))
    v = model[0](x)
    torch.testing.assert_close(largest, float((torch.sigmoid(v) / v).abs().max()), rtol=5e-3, atol=0)
    # the map it warns about is far from input x gradient
    assert (s - _input_x_gradient(model, x, 1)).abs().max() > 10 * _input_x_gradient(model, x, 1).abs().max()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wbp(model, x, 1)  # once per layer: a training loop is not flooded
        wbp(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), x, 1)  # g(0) = 0: never


def test_lrp_merges_batch_norm_into_a_dense_layer() -> None:
    torch.manual_seed(43)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()
    _randomize_bn(model, torch.Generator().manual_seed(44))
    model.eval()
    folded = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    with torch.no_grad():
        bn = model[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded[0].weight.copy_(model[0].weight * scale[:, None])
        folded[0].bias.copy_((model[0].bias - bn.running_mean) * scale + bn.bias)
        folded[2].load_state_dict(model[3].state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), folded(x))
    torch.testing.assert_close(lrp(model, x, 2), lrp(folded, x, 2), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# errors


def test_unknown_method_is_rejected() -> None:
    model = vgg(2).eval()
    with pytest.raises(ValueError, match="unknown saliency method 'smoothgrad'"):
        compute("smoothgrad", model, _input(2), 0)


@pytest.mark.parametrize("method", METHODS)
def test_target_out_of_range_names_the_class_and_the_count(method: str) -> None:
    model = vgg(2, classes=3).eval()
    with pytest.raises(ValueError, match="target class 3 is out of range for a model with 3 outputs"):
        compute(method, model, _input(2), 3)
    with pytest.raises(ValueError, match="target class -1 is out of range"):
        compute(method, model, _input(2, n=2), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="target has 3 entries for a batch of 2"):
        compute(method, model, _input(2, n=2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="integer class"):
        compute(method, model, _input(2, n=2), torch.tensor([0.0, 1.0]))


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        t = self.embed(x)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(dim=1))


@pytest.mark.parametrize("method", ["wbp", "lrp"])
def test_unsupported_layer_is_named(method: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=r"'attn' \(MultiheadAttention\)"):
        compute(method, _WithAttention(), torch.randn(2, 5, 4), 0)


class _Cube(nn.Module):
    def forward(self, x):
        return x**3


def test_register_rule_teaches_wbp_a_new_activation() -> None:
    model = nn.Sequential(nn.Linear(3, 4, bias=False), _Cube(), nn.Linear(4, 2, bias=False)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(_Cube\)"):
        wbp(model, x, 0)
    register_rule(_Cube, Secant())
    try:
        s = wbp(model, x, 0)
    finally:
        RULES.pop(_Cube)
    v = model[0](x)
    expected = ((model[2].weight[0] * v**2) @ model[0].weight) * x  # secant slope of v^3 is v^2
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(s.sum(dim=1), model(x)[:, 0])
    with pytest.raises(TypeError, match="Rule instance"):
        register_rule(_Cube, "secant")  # type: ignore[arg-type]


def test_create_graph_with_lrp_is_rejected() -> None:
    with pytest.raises(ValueError, match="post-hoc"):
        compute("lrp", vgg(2).eval(), _input(2), 0, create_graph=True)


def test_unknown_option_and_unknown_gradcam_layer_are_rejected() -> None:
    model = vgg(2).eval()
    with pytest.raises(ValueError, match="does not take option"):
        compute("gradient", model, _input(2), 0, layer="0")
    with pytest.raises(ValueError, match="Grad-CAM layer 'nope'"):
        compute("gradcam", model, _input(2), 0, layer="nope")


# ----- nonlinearities called as functions inside a forward ------------------------------------------------


class _Block(nn.Module):
    """A conv whose output goes through ``act``, a function called inside this container's forward."""

    def __init__(self, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


class _Functional(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.block = _Block(act)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.max_pool2d(self.block(x), 2).mean(dim=(2, 3)))


FUNCTIONAL_FORMS = [
    (torch.tanh, "torch.tanh"),
    (F.gelu, "torch.nn.functional.gelu"),
    (lambda t: t.sigmoid(), "torch.Tensor.sigmoid"),
    (lambda t: F.silu(t, inplace=True), "torch.nn.functional.silu"),
    (lambda t: t**2, "torch.Tensor.__pow__"),
    (lambda t: t.clamp(-1.0, 1.0), "torch.Tensor.clamp"),
    (lambda t: F.layer_norm(t, t.shape[-2:]), "torch.nn.functional.layer_norm"),
    (lambda t: F.batch_norm(t, None, None, training=True), "torch.nn.functional.batch_norm"),
    # names a list of nonlinearities would miss: the guard is an allow-list
    (torch.special.expit, "torch.special.expit"),
    (torch.atan, "torch.atan"),
    (torch.sinh, "torch.sinh"),
    (lambda t: t.exp().log1p(), "torch.Tensor.exp"),
    (lambda t: F.relu(t) * torch.relu(t), "torch.Tensor.mul"),  # a product of two activations: a gate
    (lambda t: t * t.mean(dim=(2, 3), keepdim=True), "torch.Tensor.mul"),  # squeeze-excitation's product
    (lambda t: t / t.abs().amax(), "torch.Tensor.div"),  # a division by data
    (lambda t: torch.maximum(t, torch.ones(())), "torch.maximum"),  # a clamp away from 0
]


@pytest.mark.parametrize("method", ["wbp", "lrp"])
@pytest.mark.parametrize(("act", "name"), FUNCTIONAL_FORMS)
def test_a_functional_nonlinearity_in_a_forward_is_named_not_differentiated(act, name: str, method: str) -> None:
    model = _Functional(act)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(UnsupportedOperationError, match=rf"{method.upper()}: {re.escape(name)} is called as a "
                       r"function in the forward of 'block' \(_Block\)"):  # fmt: skip
        compute(method, model, x, 1)
    if method == "wbp":  # the same through the tracer a PPI training step uses
        with pytest.raises(UnsupportedLayerError, match=re.escape(name)), WBPTracer(model):
            model(x.requires_grad_(True))
    model(x)  # the guard and its hooks are gone afterwards
    assert not model._forward_hooks and not model.block._forward_pre_hooks and not model.block.conv._forward_hooks


class _TwoBranches(nn.Module):
    """Operations on two data-dependent tensors that are linear (adds, concatenation, stacking, views) and on
    one data-dependent tensor and constants (products, a division, a matrix product)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8))
        self.head = nn.Linear(8 * 16, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = torch.cat([a + b, a - 0.5 * b], dim=1)
        h = torch.stack([h, 2 * h], dim=0).sum(dim=0) / 3.0
        h = F.max_pool2d(h, 2).flatten(2)
        h = (h * self.gain[:, None]).transpose(1, 2) @ torch.ones(8, 8, dtype=h.dtype) / 8
        return self.head(F.relu(h).reshape(len(x), -1))


def test_linear_two_tensor_operations_pass_and_wbp_equals_input_x_gradient() -> None:
    torch.manual_seed(34)
    model = _TwoBranches().eval()
    _randomize_bn(model, torch.Generator().manual_seed(35))
    x, target = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    torch.testing.assert_close(wbp(model, x, target), _input_x_gradient(model, x, target), rtol=1e-5, atol=1e-7)
    r = compute("lrp", model.double(), x.double(), target, epsilon=1e-12)
    assert torch.isfinite(r).all() and r.abs().max() > 0


@pytest.mark.parametrize(
    ("act", "layer"),
    [
        (F.relu, nn.ReLU()),
        (lambda t: t.relu_(), nn.ReLU(inplace=True)),
        (lambda t: F.leaky_relu(t, 0.1), nn.LeakyReLU(0.1)),
        (lambda t: t.clamp(min=0), nn.ReLU()),
        (lambda t: F.threshold(t, 0.0, 0.0), nn.ReLU()),
    ],
)
def test_piecewise_linear_functional_calls_pass_because_their_rule_is_their_derivative(act, layer) -> None:
    torch.manual_seed(0)
    functional = _Functional(act)
    modular = _Functional(layer)
    modular.load_state_dict(functional.state_dict())
    x = torch.randn(3, 1, 8, 8)
    s = wbp(functional, x, 1)
    torch.testing.assert_close(s, wbp(modular, x, 1))  # the layer form, where the rule applies by hook
    torch.testing.assert_close(s, compute("input_x_gradient", functional, x, 1))


def test_eval_batch_norm_called_functionally_passes() -> None:
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
    functional = _Functional(lambda t: F.relu(F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias)))
    modular = _Functional(nn.Sequential(bn, nn.ReLU()))
    modular.block.conv.load_state_dict(functional.block.conv.state_dict())
    modular.head.load_state_dict(functional.head.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(wbp(functional, x, 0), wbp(modular.eval(), x, 0))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_the_same_entry_and_compute_is_it(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    ).train()  # fmt: skip
    x, target = torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tracer = make_tracer(method, model)
    direct = tracer.attribute(x, target)
    assert direct.shape == x.shape and not direct.requires_grad
    torch.testing.assert_close(direct, compute(method, model, x, target))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # buffers untouched
    if tracer.differentiable:
        assert tracer.attribute(x, target, create_graph=True).requires_grad
    else:
        with pytest.raises(ValueError, match="post-hoc"):
            tracer.attribute(x, target, create_graph=True)
