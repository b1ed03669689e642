"""Tests of ppi_med.ppi: the causal masks on maps with known answers and the PPI objective's terms.

The objective is checked from the outside: a forward pre-hook records what the model is fed (so the
intervened inputs x* and x' can be compared with the masks the returned saliency implies), every loss
term is recomputed independently, and the gradients of both modes are compared with hand-built losses.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppi_med.ppi import (
    MASKS,
    PPIConfig,
    PPIObjective,
    adaptive_sigma,
    adversarial_partners,
    box_mask,
    contrast_loss,
    dilate,
    hard_point_mask,
    make_mask,
    normalize,
    soft_mask,
    topk_mask,
)
from ppi_med.saliency import wbp

# ---------------------------------------------------------------------------------------------------------
# masks


def test_normalize_scales_each_sample_by_its_largest_magnitude() -> None:
    s = torch.tensor([[1.0, -4.0, 2.0], [0.5, 0.25, 0.0], [0.0, 0.0, 0.0]]).reshape(3, 1, 3)
    n = normalize(s)
    expected = torch.tensor([[0.25, -1.0, 0.5], [1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]).reshape(3, 1, 3)
    torch.testing.assert_close(n, expected)
    assert torch.isfinite(n).all()


@pytest.mark.parametrize("shape", [(2, 1, 6, 7), (2, 3, 4, 5, 6)], ids=["2d", "3d"])
def test_soft_mask_is_half_at_sigma_and_saturates_away_from_it(shape) -> None:
    sigma = 0.25
    at = torch.full(shape, sigma)
    torch.testing.assert_close(soft_mask(at, 100.0, sigma), torch.full(shape, 0.5))
    assert soft_mask(at + 0.1, 100.0, sigma).min() > 1 - 1e-4
    assert soft_mask(at - 0.1, 100.0, sigma).max() < 1e-4
    # a per-sample threshold broadcasts: sample 0 at its sigma, sample 1 far below its own
    sig = torch.tensor([0.25, 0.9]).reshape(2, *([1] * (len(shape) - 1)))
    m = soft_mask(at, 100.0, sig)
    torch.testing.assert_close(m[0], torch.full(shape[1:], 0.5))
    assert m[1].max() < 1e-4
    # differentiable (it sits inside the trainable objective)
    s = at.clone().requires_grad_(True)
    soft_mask(s).sum().backward()
    torch.testing.assert_close(s.grad, torch.full(shape, 100.0 * 0.25))  # omega * T (1 - T) at T = 0.5


def test_adaptive_sigma_is_mean_plus_k_std_per_sample() -> None:
    s = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0]]).reshape(3, 1, 2, 2)
    # mean / population std: (0.5, 0.5), (1, 0), (1, sqrt(3))
    torch.testing.assert_close(adaptive_sigma(s, 1.0).flatten(), torch.tensor([1.0, 1.0, 1 + math.sqrt(3)]))
    torch.testing.assert_close(adaptive_sigma(s, 2.0).flatten(), torch.tensor([1.5, 1.0, 1 + 2 * math.sqrt(3)]))
    assert adaptive_sigma(s).shape == (3, 1, 1, 1)
    s3 = torch.zeros(2, 1, 2, 2, 2)
    s3[0, 0, 0, 0, 0] = 8.0  # mean 1, std sqrt(7)
    torch.testing.assert_close(adaptive_sigma(s3, 1.0).flatten(), torch.tensor([1 + math.sqrt(7), 0.0]))
    # soft_adaptive through make_mask: only values above the sample's own sigma are masked
    m = make_mask("soft_adaptive", s, adaptive_k=1.0)
    assert m[2, 0, 1, 1] > 0.99 and m[2].sum() < 1.01
    torch.testing.assert_close(m[0], soft_mask(s[0], 100.0, 1.0))


@pytest.mark.parametrize("spatial", [(10, 10), (5, 4, 5)], ids=["2d", "3d"])
def test_hard_point_mask_keeps_exactly_the_points_above_k_std(spatial) -> None:
    # 100 points: one at 1, one at 0.5, one at -1 (negative evidence is not kept), the rest 0
    s = torch.zeros(2, 1, *spatial)
    flat = s.view(2, -1)
    flat[0, 17], flat[0, 42], flat[0, 90] = 1.0, 0.5, -1.0
    flat[1, 3] = 1.0
    std0 = torch.tensor([1.0, 0.5, -1.0] + [0.0] * 97).std(unbiased=False)  # 0.1499
    assert 3 * std0 < 0.5 < 6 * std0 < 1.0
    m7 = hard_point_mask(s, 6.0).view(2, -1)
    m3 = hard_point_mask(s, 3.0).view(2, -1)
    assert m7[0].nonzero().flatten().tolist() == [17]
    assert m3[0].nonzero().flatten().tolist() == [17, 42]
    assert m7[1].nonzero().flatten().tolist() == [3]
    assert set(m7.unique().tolist()) <= {0.0, 1.0}
    assert make_mask("hard", s, k_std=3.0).view(2, -1)[0].nonzero().flatten().tolist() == [17, 42]


@pytest.mark.parametrize("sd", [2, 3])
def test_box_mask_of_a_solid_block_is_that_block(sd: int) -> None:
    side = 10 if sd == 2 else 8
    s = torch.zeros(2, 2, *([side] * sd))
    block = (slice(2, 5), slice(5, 8), slice(1, 4))[:sd]
    s[(0, 0, *block)] = 1.0  # channel 0 only: the box covers every channel
    s[(1, 1, *(slice(b.start + 1, b.stop + 1) for b in block))] = 1.0
    m = box_mask(s, k=2.0)
    expected = torch.zeros_like(s)
    expected[(0, slice(None), *block)] = 1.0
    expected[(1, slice(None), *(slice(b.start + 1, b.stop + 1) for b in block))] = 1.0
    torch.testing.assert_close(m, expected)


def test_box_mask_of_a_sample_without_points_is_empty() -> None:
    s = torch.zeros(2, 1, 6, 6)
    s[1, 0, 2, 2] = 1.0
    m = box_mask(s, k=2.0)
    assert m[0].sum() == 0 and m[1, 0, 2, 2] == 1


def _cloud(kind: str, spatial: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A 0/1 point cloud of a given character."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in spatial], indexing="ij"))
    centre = torch.tensor([n * (0.3 + 0.4 * torch.rand(1, generator=gen).item()) for n in spatial])
    c = centre.reshape(-1, *([1] * len(spatial)))
    if kind == "gaussian":
        scale = torch.tensor([n / 8 for n in spatial]).reshape(-1, *([1] * len(spatial)))
        p = torch.exp(-0.5 * (((grid - c) / scale) ** 2).sum(0))
    elif kind == "elongated":
        scale = torch.tensor([n / (3 if i == 0 else 14) for i, n in enumerate(spatial)])
        p = torch.exp(-0.5 * (((grid - c) / scale.reshape(-1, *([1] * len(spatial)))) ** 2).sum(0))
    elif kind == "two_blobs":
        shift = torch.tensor([n / 4 for n in spatial]).reshape(-1, *([1] * len(spatial)))
        scale = torch.tensor([n / 14 for n in spatial]).reshape(-1, *([1] * len(spatial)))
        a = torch.exp(-0.5 * (((grid - c + shift) / scale) ** 2).sum(0))
        b = torch.exp(-0.5 * (((grid - c - shift) / scale) ** 2).sum(0))
        p = torch.maximum(a, b)
    else:  # uniform scatter with a heavy tail of outliers
        p = torch.full(spatial, 0.1)
    return (torch.rand(spatial, generator=gen) < 0.5 * p).float()


@pytest.mark.parametrize("spatial", [(40, 36), (16, 14, 18)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", ["gaussian", "elongated", "two_blobs", "scatter"])
def test_box_mask_is_centred_on_the_points_and_holds_90_percent(spatial, kind: str) -> None:
    gen = torch.Generator().manual_seed(10 * len(spatial) + len(kind))
    s = torch.stack([_cloud(kind, spatial, gen) for _ in range(3)]).unsqueeze(1)
    for i in range(3):
        frac = s[i].mean().item()
        assert 0 < frac < 0.2 and 2 * math.sqrt(frac - frac**2) < 1  # k = 2 keeps exactly the cloud
    m = box_mask(s, k=2.0)
    for i in range(3):
        pts = s[i, 0].nonzero().float()
        box = m[i, 0].nonzero()
        lo, hi = box.amin(0), box.amax(0)
        # the mask is a solid box
        assert box.shape[0] == int(torch.prod(hi - lo + 1))
        # at least 90 % of the kept points inside it
        inside = ((pts >= lo) & (pts <= hi)).all(1).float().mean()
        assert inside >= 0.9, (kind, i, float(inside))
        # centred on the centre of mass (to within rounding) where the image border does not clip it
        com = pts.mean(0)
        for axis, n in enumerate(spatial):
            if lo[axis] > 0 and hi[axis] < n - 1:
                assert abs((lo[axis] + hi[axis]).item() / 2 - com[axis].item()) <= 0.5
            # never smaller than the method's 1.2 std half-size
            half = 1.2 * pts[:, axis].std(unbiased=False).item()
            assert lo[axis] <= max(0, math.ceil(com[axis].item() - half))
            assert hi[axis] >= min(n - 1, math.floor(com[axis].item() + half))


@pytest.mark.parametrize("shape", [(3, 1, 9, 9), (2, 2, 4, 5, 6)], ids=["2d", "3d"])
def test_topk_mask_keeps_the_k_largest_per_sample(shape) -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(shape, generator=gen)
    for k in (1, 7, 40):
        m = topk_mask(s, k)
        assert m.shape == s.shape
        counts = m.reshape(shape[0], -1).sum(1)
        torch.testing.assert_close(counts, torch.full((shape[0],), float(k)))
        for i in range(shape[0]):
            kept, dropped = s[i][m[i] == 1], s[i][m[i] == 0]
            assert kept.min() > dropped.max()
    torch.testing.assert_close(topk_mask(s, 10**6), torch.ones_like(s))  # k beyond the map: everything
    torch.testing.assert_close(make_mask("topk", s, topk=7), topk_mask(s, 7))


def test_make_mask_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown PPI mask 'circle'"):
        make_mask("circle", torch.zeros(1, 1, 2, 2))


# ---------------------------------------------------------------------------------------------------------
# contrast losses


def test_contrast_loss_flip_is_cross_entropy_against_the_other_class() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    flip = contrast_loss(logits, y, "flip")
    torch.testing.assert_close(flip, F.cross_entropy(logits, 1 - y))
    torch.testing.assert_close(flip, torch.tensor((math.log1p(math.e**2) + math.log1p(math.e)) / 2))
    negate = contrast_loss(logits, y, "negate")
    torch.testing.assert_close(negate, -F.cross_entropy(logits, y))
    # multi-class flip: -log(1 - p_y); uniform over 3 classes gives -log(2/3)
    three = contrast_loss(torch.zeros(2, 3), torch.tensor([0, 2]), "flip")
    torch.testing.assert_close(three, torch.tensor(-math.log(2 / 3)))
    # bounded below by 0, while negate runs off to minus infinity on confidently wrong logits
    wrong = torch.tensor([[-50.0, 50.0]])
    assert contrast_loss(wrong, torch.tensor([0]), "flip") >= 0
    assert contrast_loss(wrong, torch.tensor([0]), "negate") < -99


# ---------------------------------------------------------------------------------------------------------
# the objective


#: the method's own formulation (section 2.3.1): partner = batch rolled by one, x* loses the whole salient region
METHOD_FORM = {"guide": "partner", "partner": "roll", "exclusive": False, "fill": "zero"}


def _net(classes: int = 2, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, classes),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def _data(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 1 has a bright square; noise everywhere (never exactly zero)."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 2
    x[y == 1, :, 2:5, 2:5] += 1.5
    return x, y


class _Recorder:
    """Forward pre-hook that keeps a copy of every input the model sees."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach().clone()))


def test_interventions_remove_exactly_the_masked_region() -> None:
    model = _net().eval()
    x, y = _data()
    cfg = PPIConfig(mask="hard", k_std=2.0, **METHOD_FORM)
    rec = _Recorder(model)
    out = PPIObjective(cfg)(model, x, y)
    rec.handle.remove()

    assert len(rec.inputs) == 2  # one traced forward of x, one of both contrasts together
    torch.testing.assert_close(rec.inputs[0], x)
    mask = hard_point_mask(normalize(out.saliency), 2.0).bool()
    assert 0 < mask.sum() < mask.numel() / 4 and bool(mask.reshape(6, -1).any(1).all())
    n = x.shape[0]
    x_neg, x_adv = rec.inputs[1][:n], rec.inputs[1][n:]
    # x*: zero on its own salient points, unchanged elsewhere
    assert torch.equal(x_neg[mask], torch.zeros(int(mask.sum())))
    assert torch.equal(x_neg[~mask], x[~mask])
    # x': the mask of the previous sample in the batch (rolled by one), a different region
    rolled = mask.roll(1, dims=0)
    assert not torch.equal(rolled, mask)
    assert torch.equal(x_adv[rolled], torch.zeros(int(rolled.sum())))
    assert torch.equal(x_adv[~rolled], x[~rolled])
    # the saliency is WBP of each sample's own label
    torch.testing.assert_close(out.saliency, wbp(model, x, y))


@pytest.mark.parametrize("kind", ["flip", "negate"])
def test_each_loss_term_has_its_independent_value(kind: str) -> None:
    model = _net().eval()
    x, y = _data()
    cfg = PPIConfig(mask="soft", w_con=0.7, w_reg=0.3, w_ad=1.9, contrast_loss=kind, **METHOD_FORM)
    out = PPIObjective(cfg)(model, x, y.reshape(-1, 1))  # (N, 1) labels are flattened
    c = out.components

    s = wbp(model, x, y)
    mask = soft_mask(normalize(s), 100.0, 0.25)
    with torch.no_grad():
        logits = model(x)
        neg = model(x - mask * x)
        adv = model(x - mask.roll(1, dims=0) * x)
    torch.testing.assert_close(out.logits, logits)
    assert c["loss_cls"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    expected_con = F.cross_entropy(neg, 1 - y) if kind == "flip" else -F.cross_entropy(neg, y)
    assert c["loss_con"] == pytest.approx(expected_con.item(), rel=1e-5)
    assert c["loss_ad"] == pytest.approx(F.cross_entropy(adv, y).item(), rel=1e-5)
    assert c["loss_reg"] == pytest.approx(normalize(s).abs().mean().item(), rel=1e-5)
    total = c["loss_cls"] + 0.7 * c["loss_con"] + 0.3 * c["loss_reg"] + 1.9 * c["loss_ad"]
    assert c["loss"] == pytest.approx(total, rel=1e-6)
    assert out.loss.item() == pytest.approx(total, rel=1e-6)


def test_weights_schedule_warm_up_and_contrast_boost() -> None:
    cfg = PPIConfig(w_con=2.0, w_reg=0.1, w_ad=0.5, warmup_epochs=2, con_boost=100.0, con_boost_epoch=5)
    assert cfg.weights(1) == {"con": 0.0, "reg": 0.0, "ad": 0.0}
    assert cfg.weights(2) == {"con": 0.0, "reg": 0.0, "ad": 0.0}
    assert cfg.weights(3) == {"con": 2.0, "reg": 0.1, "ad": 0.5}
    assert cfg.weights(4)["con"] == 2.0
    assert cfg.weights(5)["con"] == 200.0 and cfg.weights(9)["con"] == 200.0
    assert cfg.weights(None) == {"con": 2.0, "reg": 0.1, "ad": 0.5}

    model = _net().eval()
    x, y = _data()
    obj = PPIObjective(cfg)
    warm = obj(model, x, y, epoch=2)
    plain = F.cross_entropy(model(x), y)
    assert torch.equal(warm.loss, plain)
    assert warm.saliency is None and warm.components["loss_con"] == 0.0
    boosted = obj(model, x, y, epoch=5).components
    total = boosted["loss_cls"] + 200.0 * boosted["loss_con"] + 0.1 * boosted["loss_reg"] + 0.5 * boosted["loss_ad"]
    assert boosted["loss"] == pytest.approx(total, rel=1e-6)
    # a dict config works the same
    assert PPIObjective({"w_con": 2.0}).config.w_con == 2.0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="mode"):
        PPIConfig(mode="sometimes")
    with pytest.raises(ValueError, match="mask"):
        PPIConfig(mask="circle")
    with pytest.raises(ValueError, match="contrast_loss"):
        PPIConfig(contrast_loss="hinge")
    with pytest.raises(ValueError, match="w_reg must be >= 0"):
        PPIConfig(w_reg=-1.0)
    with pytest.raises(ValueError, match="omega .* must be > 0, got 0"):
        PPIConfig(omega=0.0)
    for sigma in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sigma must lie in"):
            PPIConfig(sigma=sigma)
    with pytest.raises(ValueError, match="enabled must be true or false, got 2"):
        PPIConfig(enabled=2)
    with pytest.raises(ValueError, match="partner"):
        PPIConfig(partner="anyone")
    with pytest.raises(ValueError, match="contrast_classes"):
        PPIConfig(contrast_classes=["GA"])
    assert PPIConfig(enabled=0).enabled is False and PPIConfig(enabled="yes").enabled is True


def test_disabled_objective_is_exactly_cross_entropy() -> None:
    model = _net().train()
    twin = _net().train()
    x, y = _data()
    out = PPIObjective(PPIConfig(enabled=False))(model, x, y)
    ref = F.cross_entropy(twin(x), y)
    assert torch.equal(out.loss, ref)
    assert out.components == {"loss": ref.item(), "loss_cls": ref.item()}
    out.loss.backward()
    ref.backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)


def _grads(model: nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_detached_mode_uses_the_saliency_as_a_constant() -> None:
    x, y = _data()
    model = _net().eval()
    cfg = PPIConfig(mode="detached", mask="soft", w_con=1.0, w_reg=0.5, w_ad=1.0, **METHOD_FORM)
    out = PPIObjective(cfg)(model, x, y)
    assert out.saliency.grad_fn is None and not out.saliency.requires_grad

    mask = soft_mask(normalize(wbp(model, x, y)), 100.0, 0.25)  # a constant
    ref = (
        F.cross_entropy(model(x), y)
        + contrast_loss(model(x - mask * x), y)
        + F.cross_entropy(model(x - mask.roll(1, dims=0) * x), y)
    )
    for g, h in zip(_grads(model, out.loss), _grads(model, ref)):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)

    # only a regulariser: it is reported, but carries no gradient, so the step is plain cross-entropy
    reg_only = PPIObjective(PPIConfig(mode="detached", w_con=0.0, w_reg=1.0, w_ad=0.0))(model, x, y)
    assert reg_only.components["loss_reg"] > 0
    assert reg_only.loss.item() == pytest.approx(
        reg_only.components["loss_cls"] + reg_only.components["loss_reg"], rel=1e-6
    )
    for g, h in zip(_grads(model, reg_only.loss), _grads(model, F.cross_entropy(model(x), y))):
        torch.testing.assert_close(g, h)


def test_differentiable_mode_trains_through_the_saliency() -> None:
    x, y = _data()
    x = x.double()  # the sharp soft mask (omega = 100) amplifies float32 rounding in the comparison
    model = _net().double().train()
    cfg = PPIConfig(mode="differentiable", mask="soft", w_con=1.0, w_reg=0.5, w_ad=1.0, **METHOD_FORM)
    out = PPIObjective(cfg)(model, x, y)
    got = _grads(model, out.loss)

    # BN running statistics move once, as in one plain training forward of x (not for the contrasts)
    twin = _net().double().train()
    twin(x)
    for b, c in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, c)

    # the same loss built by hand from a trainable WBP map (training-mode BN: the running statistics
    # that these extra forwards move do not enter the outputs)
    s = wbp(model, x, y, create_graph=True)
    s_n = normalize(s)
    mask = soft_mask(s_n, 100.0, 0.25)
    contrasts = model(torch.cat([x - mask * x, x - mask.roll(1, dims=0) * x]))
    ref = (
        F.cross_entropy(model(x), y)
        + contrast_loss(contrasts[:6], y)
        + 0.5 * s_n.abs().mean()
        + F.cross_entropy(contrasts[6:], y)
    )
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, h in zip(got, _grads(model, ref)):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)

    # and it is not the detached gradient
    detached = PPIObjective(PPIConfig(mode="detached", mask="soft", w_con=1.0, w_reg=0.5, w_ad=1.0, **METHOD_FORM))
    other = _grads(model, detached(model, x, y).loss)
    assert any(not torch.allclose(g, h, rtol=1e-3, atol=1e-5) for g, h in zip(got, other))


@pytest.mark.parametrize("mode", ["detached", "differentiable"])
@pytest.mark.parametrize("mask", MASKS)
def test_a_few_ppi_steps_decrease_the_loss(mode: str, mask: str) -> None:
    x, y = _data(n=8)
    model = _net().train()
    obj = PPIObjective(PPIConfig(mode=mode, mask=mask, k_std=2.0, topk=6, **{**METHOD_FORM, "warmup_epochs": 0}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        out = obj(model, x, y, epoch=1)
        assert torch.isfinite(out.loss)
        assert out.loss.item() > out.components["loss_cls"]  # the PPI terms are on, not a warm-up step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("saliency", ["gradient", "input_x_gradient", "gradcam", "lrp"])
def test_other_saliency_methods_drive_the_objective(saliency: str) -> None:
    x, y = _data()
    model = _net().train()
    out = PPIObjective(PPIConfig(saliency=saliency, mode="differentiable"))(model, x, y)
    assert out.saliency.shape == x.shape
    assert set(out.components) == {"loss", "loss_cls", "loss_con", "loss_reg", "loss_ad"}
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_single_sample_batch_has_no_adversarial_term_and_says_so_once() -> None:
    x, y = _data(n=1)
    objective = PPIObjective(PPIConfig(guide="partner"))
    with pytest.warns(UserWarning, match="no adversarial partner"):
        out = objective(_net().eval(), x, y)
    assert out.components["loss_ad"] == 0.0
    assert torch.isfinite(out.loss)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective(_net().eval(), x, y)  # not again
    # nothing to contrast at all (no partner, and the sample's label gets no negative contrast)
    with pytest.warns(UserWarning, match="no adversarial partner"):
        empty = PPIObjective(PPIConfig(guide="partner", contrast_classes=[5]))(_net().eval(), x, y)
    assert empty.components["loss_con"] == 0.0 and empty.components["loss_ad"] == 0.0
    assert torch.isfinite(empty.loss)


# ---------------------------------------------------------------------------------------------------------
# variants: partners, the exclusive negative contrast, dilation, magnitude masks


def test_roll_partners_are_the_previous_sample() -> None:
    i, j = adversarial_partners(torch.tensor([0, 1, 1, 0]), "roll")
    assert i.tolist() == [0, 1, 2, 3] and j.tolist() == [3, 0, 1, 2]


def test_same_class_partners_never_pair_across_classes_or_with_themselves() -> None:
    y = torch.tensor([1, 0, 1, 1, 0, 2])  # class 2 is alone: no partner for it
    i, j = adversarial_partners(y, "same_class")
    assert sorted(i.tolist()) == [0, 1, 2, 3, 4]
    assert bool((y[i] == y[j]).all()) and bool((i != j).all())
    assert sorted(j.tolist()) == sorted(i.tolist())  # each sample lends its mask exactly once
    empty_i, _ = adversarial_partners(torch.tensor([0, 1]), "same_class")
    assert empty_i.numel() == 0


def _recorded(cfg: PPIConfig, k: float = 2.0, magnitude: bool = False):
    """Run the objective once with a hard mask; return the model, data, output, the mask the returned
    saliency implies, and the batch of contrasts the model was fed."""
    model = _net().eval()
    x, y = _data()
    rec = _Recorder(model)
    out = PPIObjective(cfg)(model, x, y)
    rec.handle.remove()
    s = out.saliency.abs() if magnitude else out.saliency
    return model, x, y, out, hard_point_mask(normalize(s), k).bool(), rec.inputs[1]


def test_same_class_adversarial_uses_a_partner_of_the_same_label() -> None:
    cfg = PPIConfig(mask="hard", k_std=2.0, guide="partner", fill="zero", partner="same_class", exclusive=False)
    model, x, y, out, mask, fed = _recorded(cfg)
    i, j = adversarial_partners(y, "same_class")
    x_adv = fed[x.shape[0] :]
    assert x_adv.shape[0] == i.numel()
    assert torch.equal(x_adv, x[i] * ~mask[j])
    with torch.no_grad():
        expected = F.cross_entropy(model(x[i] * ~mask[j]), y[i])
    assert out.components["loss_ad"] == pytest.approx(expected.item(), rel=1e-5)


def test_exclusive_negative_contrast_keeps_what_the_partner_finds_salient_too() -> None:
    cfg = PPIConfig(mask="hard", k_std=2.0, guide="partner", fill="zero", partner="same_class", exclusive=True)
    _, x, y, _, mask, fed = _recorded(cfg)
    i, j = adversarial_partners(y, "same_class")
    own = mask.clone()
    own[i] = mask[i] & ~mask[j]
    assert torch.equal(fed[: x.shape[0]], x * ~own)
    # the two squares of class 1 overlap, so something salient is kept in x*
    assert bool((mask[i] & mask[j]).any())


def test_dilate_grows_a_point_into_a_cube_and_keeps_gradients() -> None:
    for spatial in [(9,), (9, 9), (9, 9, 9)]:
        m = torch.zeros(1, 1, *spatial)
        m[(0, 0, *(4,) * len(spatial))] = 1.0
        grown = dilate(m, 2)
        assert grown.sum() == 5 ** len(spatial)
        assert torch.equal(dilate(m, 0), m)
    soft = torch.rand(2, 1, 6, 6, requires_grad=True)
    dilate(soft, 1).sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


def test_absolute_masks_remove_strong_evidence_against_the_label() -> None:
    cfg = PPIConfig(mask="hard", k_std=1.0, absolute=True, **METHOD_FORM)
    _, x, _, out, mask, fed = _recorded(cfg, k=1.0, magnitude=True)
    assert bool((mask & (out.saliency < 0)).any())  # negative evidence is masked too
    assert torch.equal(fed[: x.shape[0]], x * ~mask)


def test_contrast_classes_limit_the_negative_contrast_to_those_labels() -> None:
    cfg = PPIConfig(mask="hard", k_std=2.0, contrast_classes=[1], **METHOD_FORM)
    model, x, y, out, mask, fed = _recorded(cfg)
    pos = y == 1
    x_neg = fed[: int(pos.sum())]
    assert torch.equal(x_neg, (x * ~mask)[pos])
    with torch.no_grad():
        expected = contrast_loss(model(x_neg), y[pos])
    assert out.components["loss_con"] == pytest.approx(expected.item(), rel=1e-5)
    none = PPIObjective(PPIConfig(contrast_classes=[5]))(model, x, y)
    assert none.components["loss_con"] == 0.0 and torch.isfinite(none.loss)
