"""The saliency maps against independent implementations: Captum (gradient, input x gradient, LRP) and MONAI
(Grad-CAM), on two networks built here: a small 2D CNN with batch norm and a small 3D residual CNN.

WBP's Captum counterpart is input x gradient: on ReLU networks with eval-mode batch norm the two are equal
(docs/DESIGN.md section 3). LRP is compared with Captum's LRP under the same rules: z-plus
(``Alpha1_Beta0_Rule`` without bias) on every convolution with its batch norm folded in beforehand (for Captum;
ours merges it itself), epsilon on the dense layers, with inputs that are non-negative, where Captum's
z-plus (which drops the ``a-`` term) and ours agree. The residual network adds its branches through Captum's
``Addition_Module`` for Captum (a plain ``+`` for ours): Captum passes relevance through a functional add as it
passes a gradient, copying it to both branches.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

captum_attr = pytest.importorskip("captum.attr")
from captum.attr import LRP, InputXGradient, Saliency  # noqa: E402
from captum.attr._utils.custom_modules import Addition_Module  # noqa: E402
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule  # noqa: E402
from monai.visualize import GradCAM  # noqa: E402
from monai.visualize.class_activation_maps import default_normalizer  # noqa: E402

from ppi_med.saliency import compute, lrp, wbp  # noqa: E402

EPS = 1e-9  # Captum's stabiliser of z-plus (fixed) and of the epsilon rule we give it
TINY = 1e-30  # Captum's stabiliser where ours has none


class Cnn2d(nn.Module):
    """conv-BN-ReLU-maxpool, conv-BN-ReLU, conv-BN-ReLU, global average pool, dense-ReLU-dense."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3, self.act3 = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act4, self.fc2 = nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, classes)

    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))
        return self.fc2(self.act4(self.fc1(torch.flatten(self.gap(x), 1))))


class Block3d(nn.Module):
    """A basic residual block; ``captum_add`` adds through Captum's ``Addition_Module``."""

    def __init__(self, cin: int, cout: int, stride: int, captum_add: bool) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = (
            nn.Conv3d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(),
        )
        self.conv2, self.bn2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))
        self.add = Addition_Module() if captum_add else None
        self.act2 = nn.ReLU()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        identity = x if self.short is None else self.short(x)
        return self.act2(self.add(out, identity) if self.add is not None else out + identity)


class Res3d(nn.Module):
    """Stem conv-BN-ReLU, two residual blocks (the second downsamples), global average pool, dense head."""

    def __init__(self, classes: int = 3, captum_add: bool = False) -> None:
        super().__init__()
        self.stem, self.bn, self.act = nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU()
        self.block1 = Block3d(4, 4, 1, captum_add)
        self.block2 = Block3d(4, 8, 2, captum_add)
        self.gap = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.act(self.bn(self.stem(x)))))
        return self.fc(self.gap(x).flatten(1))


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters, some scales negative (folding flips signs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                sign = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0)
                m.weight.copy_(sign * (0.5 + torch.rand(n, generator=gen)))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model.double().eval()


def cnn2d() -> nn.Module:
    torch.manual_seed(0)
    return _randomize(Cnn2d(), 1)


def res3d(captum_add: bool = False) -> nn.Module:
    torch.manual_seed(2)
    return _randomize(Res3d(captum_add=captum_add), 3)


NETWORKS = {"cnn2d": (cnn2d, (2, 1, 16, 16)), "res3d": (res3d, (2, 1, 10, 10, 10))}


def _input(shape: tuple[int, ...], seed: int = 4, nonnegative: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.abs() if nonnegative else x


def _folded_for_captum(model: nn.Module) -> nn.Module:
    """A copy with every batch norm folded into the convolution before it (and replaced by an identity), and
    Captum's rules set: z-plus without bias on convolutions, epsilon on dense layers and pooling."""
    folded = copy.deepcopy(model)
    named = dict(folded.named_modules())
    for name, conv in list(named.items()):
        if not isinstance(conv, nn.Conv3d | nn.Conv2d):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = named[parent_name]
        # the batch norm that follows: bnN after convN, bn after stem, short.1 after short.0
        bn_name = {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3", "stem": "bn", "0": "1"}[leaf]
        bn = getattr(parent, bn_name)
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        setattr(parent, bn_name, nn.Dropout(0.0))  # an identity Captum passes relevance through
        conv.rule = Alpha1_Beta0_Rule(set_bias_to_zero=True)
    for m in folded.modules():
        if isinstance(m, nn.Linear):
            m.rule = EpsilonRule(epsilon=EPS)
        elif isinstance(m, nn.AdaptiveAvgPool3d | nn.AdaptiveAvgPool2d | nn.MaxPool2d | Addition_Module):
            m.rule = EpsilonRule(epsilon=TINY)  # ours passes these as the gradient does: no stabiliser
    return folded


@pytest.mark.parametrize("net", NETWORKS)
def test_gradient_and_input_x_gradient_equal_captum(net: str) -> None:
    factory, shape = NETWORKS[net]
    model, x, target = factory(), _input(shape), torch.tensor([2, 0])
    expected = Saliency(model).attribute(x, target=target, abs=False)
    torch.testing.assert_close(compute("gradient", model, x, target), expected, rtol=1e-10, atol=1e-12)
    expected = InputXGradient(model).attribute(x, target=target)
    torch.testing.assert_close(compute("input_x_gradient", model, x, target), expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 0


@pytest.mark.parametrize("net", NETWORKS)
def test_wbp_equals_captum_input_x_gradient_on_relu_networks(net: str) -> None:
    factory, shape = NETWORKS[net]
    model, x, target = factory(), _input(shape), torch.tensor([1, 2])
    expected = InputXGradient(model).attribute(x, target=target)
    torch.testing.assert_close(wbp(model, x, target), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", NETWORKS)
def test_lrp_equals_captum_under_the_same_rules(net: str) -> None:
    factory, shape = NETWORKS[net]
    model = factory()
    reference = _folded_for_captum(factory(captum_add=True) if net == "res3d" else factory())
    x, target = _input(shape, nonnegative=True), torch.tensor([0, 2])
    torch.testing.assert_close(reference(x), model(x))  # the folding is right
    expected = LRP(reference).attribute(x, target=target)
    ours = lrp(model, x, target, epsilon=EPS)
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-10)
    # not a trivial agreement: the rules differ from the gradient's
    assert (ours - InputXGradient(model).attribute(x, target=target)).abs().max() > 1e-3 * ours.abs().max()


def test_captum_copies_relevance_into_both_branches_of_a_functional_add() -> None:
    """Why the residual network adds through Addition_Module for Captum: through a plain ``+`` Captum's
    relevance is not conserved (it is copied to both branches), ours splits it in proportion to the branches."""
    model, x, target = res3d(), _input(NETWORKS["res3d"][1], nonnegative=True), torch.tensor([0, 2])
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    captum_sum = LRP(_folded_for_captum(res3d())).attribute(x, target=target).sum(dim=(1, 2, 3, 4))
    ours_sum = lrp(model, x, target, epsilon=EPS).sum(dim=(1, 2, 3, 4))
    reference_sum = LRP(_folded_for_captum(res3d(captum_add=True))).attribute(x, target=target).sum(dim=(1, 2, 3, 4))
    torch.testing.assert_close(ours_sum, reference_sum, rtol=1e-7, atol=1e-10)
    assert not torch.allclose(captum_sum, ours_sum, rtol=1e-3)
    assert logits.abs().min() > 0


def test_lrp_on_a_bias_free_tanh_network_equals_captum_and_conserves_relevance() -> None:
    """Relevance passes an element-wise activation unchanged (Captum's rule for nn.Tanh), it is not multiplied
    by the derivative: on a bias-free network the relevance sums to the logit."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(6, 16, bias=False), nn.Tanh(), nn.Linear(16, 16, bias=False), nn.Tanh(), nn.Linear(16, 3, bias=False)
    ).double()
    x, target = _input((4, 6), seed=6), torch.tensor([0, 1, 2, 1])
    reference = copy.deepcopy(model)
    for m in reference:
        if isinstance(m, nn.Linear):
            m.rule = EpsilonRule(epsilon=EPS)
    r = lrp(model, x, target, epsilon=EPS)
    torch.testing.assert_close(r, LRP(reference).attribute(x, target=target), rtol=1e-7, atol=1e-10)
    logits = model(x).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(r.sum(dim=1), logits, rtol=1e-3, atol=0)
    torch.testing.assert_close(r.sum(dim=1), logits, rtol=1e-7, atol=1e-9)  # and in fact up to epsilon


@pytest.mark.parametrize("net", NETWORKS)
def test_gradcam_equals_monai(net: str) -> None:
    factory, shape = NETWORKS[net]
    model, x = factory(), _input(shape)
    layer = "conv3" if net == "cnn2d" else "block1"
    ours = compute("gradcam", model, x, 1, layer=layer)
    reference = GradCAM(model, target_layers=layer)(x, class_idx=1)
    assert ours.shape == x.shape and bool((ours.reshape(2, -1).amax(dim=1) > 0).all())
    # MONAI rescales each map to [0, 1] with its maximum at 0 (default_normalizer); so do we here
    torch.testing.assert_close(default_normalizer(ours[:, :1]), reference, rtol=1e-6, atol=1e-6)
