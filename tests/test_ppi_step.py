"""The PPI step at its floor: the same loss, terms, gradients and batch-norm statistics as the step's full form.

:func:`_reference_step` below is the objective written out the long way, as it stood before the work that
trims the step (every mask built, every contrast intervened on every sample before any is dropped, the
negative contrast's classes chosen by indexing afterwards). :class:`ppi_med.ppi.PPIObjective` must give the
same numbers on a fixed MVCNN batch in float64, in both modes, for the partner form and the study guide with
outlines, with and without ``contrast_classes``. Dropout is on, so the random draws must also come in the
same order (the clean forward first, then the contrasts in one forward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ppi_med.networks import MVCNN
from ppi_med.ppi import PPIConfig, PPIObjective, adversarial_partners, contrast_loss, dilate, make_mask, normalize
from ppi_med.ppi.guides import annotation_regions
from ppi_med.ppi.interventions import fill_values, intervene
from ppi_med.saliency import WBPTracer, frozen_buffers

FORMS = {
    "partner": {"guide": "partner"},
    "partner_roll_zero": {"guide": "partner", "partner": "roll", "exclusive": False, "fill": "zero"},
    "study": {"guide": "study"},
    "study_positive": {"guide": "study", "contrast_classes": [1]},
}


def _weighted(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def _reference_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: PPIConfig,
    annotation: torch.Tensor | None,
    annotated: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The PPI loss of one batch (soft mask, WBP, ``contrast_norm="batch"``), every term built in full."""
    w = cfg.weights(None)
    differentiable = cfg.mode == "differentiable"
    xg = x.detach().requires_grad_(True)
    with WBPTracer(model) as tracer:
        logits = model(xg)
    loss_cls = F.cross_entropy(logits, y)
    s = tracer.saliency(logits, xg, y, create_graph=differentiable, retain_graph=True)
    s_n = normalize(s)
    mask = dilate(make_mask("soft", s_n, omega=cfg.omega, sigma=cfg.sigma), cfg.dilate)
    n = x.shape[0]
    fill = None if cfg.fill == "zero" else fill_values(x, cfg.fill, y=y)
    ad_fill = None if cfg.fill in ("zero", "other_class") else fill
    if cfg.guide == "partner":
        i, j = adversarial_partners(y, cfg.partner)
        neg_mask = mask.index_put((i,), mask[i] * (1 - mask[j])) if cfg.exclusive else mask
        x_neg = intervene(x, neg_mask, fill)
        x_adv = intervene(x[i], mask[j], None if ad_fill is None else ad_fill[i])
        y_adv, con_w, ad_w = y[i], torch.ones(n, dtype=x.dtype), torch.ones(i.numel(), dtype=x.dtype)
    else:  # the study guide with outlines
        has = annotated.reshape(n, *([1] * (x.ndim - 1)))
        outline = dilate(annotation.to(x.dtype), cfg.annotation_dilate).clamp(0, 1)
        a_ev, a_nu = annotation_regions(mask, outline)
        evidence = torch.where(has, a_ev, torch.zeros_like(mask))
        nuisance = torch.where(has, a_nu, torch.zeros_like(mask))
        con_w = (evidence.detach().reshape(n, -1).sum(dim=1) >= 1).to(x.dtype)
        ad_w = (nuisance.detach().reshape(n, -1).sum(dim=1) >= 1).to(x.dtype)
        x_neg, x_adv, y_adv = intervene(x, evidence, fill), intervene(x, nuisance, ad_fill), y
    y_neg = y
    if cfg.contrast_classes is not None:
        keep = (y[:, None] == torch.tensor(cfg.contrast_classes)[None]).any(dim=1)
        x_neg, y_neg, con_w = x_neg[keep], y[keep], con_w[keep]
    with frozen_buffers(model):
        out = model(torch.cat([x_neg, x_adv]))
    out_neg, out_adv = out[: x_neg.shape[0]], out[x_neg.shape[0] :]
    loss_con = contrast_loss(out_neg, y_neg, cfg.contrast_loss, con_w)
    loss_ad = _weighted(F.cross_entropy(out_adv, y_adv, reduction="none"), ad_w)
    loss_reg = s_n.abs().reshape(n, -1).mean(dim=1).mean()
    total = loss_cls + w["con"] * loss_con + w["reg"] * loss_reg + w["ad"] * loss_ad
    return {"loss": total, "loss_cls": loss_cls, "loss_con": loss_con, "loss_reg": loss_reg, "loss_ad": loss_ad}


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 3, 16, 16, generator=gen, dtype=torch.float64) + 0.2
    y = torch.tensor([1, 0, 1, 0, 1, 1])
    outline = torch.zeros(6, 1, 3, 16, 16, dtype=torch.float64)
    outline[0, :, :, 4:9, 4:9] = 1
    outline[2, :, 1:, 2:6, 8:12] = 1
    outline[5, :, :2, 10:14, 3:7] = 1
    annotated = torch.tensor([True, True, True, False, False, True])  # record 1: annotated, nothing found
    return x, y, outline, annotated


def _model(checkpoint: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return MVCNN(width=4, dropout=0.2, checkpoint=checkpoint).double().train()


@pytest.mark.parametrize("mode", ["detached", "differentiable"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_step_equals_its_full_form(mode: str, form: str) -> None:
    x, y, outline, annotated = _batch()
    cfg = PPIConfig(mode=mode, warmup_epochs=0, **FORMS[form])
    model, twin = _model(), _model()
    torch.manual_seed(7)  # dropout draws: the same order in both
    out = PPIObjective(cfg)(model, x, y, epoch=1, annotation=outline, annotated=annotated)
    torch.manual_seed(7)
    ref = _reference_step(twin, x, y, cfg, outline, annotated)
    assert ref["loss_con"] > 0 and ref["loss_ad"] > 0  # both contrasts take part
    for key, value in ref.items():
        torch.testing.assert_close(out.terms[key], value.detach(), rtol=1e-10, atol=1e-12, msg=key)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    expected = torch.autograd.grad(ref["loss"], list(twin.parameters()))
    for (name, _), g, h in zip(model.named_parameters(), grads, expected):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10, msg=name)
    # one plain training forward's worth of running statistics, in both
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(b, c), name


def test_a_step_without_contrasts_builds_no_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    # the study guide on a batch without outlines forms no contrast: only L_reg needs the saliency
    import ppi_med.ppi.objective as objective

    calls: list[str] = []
    monkeypatch.setattr(objective, "make_mask", lambda kind, *a, **k: calls.append(kind) or make_mask(kind, *a, **k))
    x, y, _, _ = _batch()
    out = PPIObjective(PPIConfig(warmup_epochs=0))(_model(), x, y, epoch=1)
    assert calls == [] and out.terms["loss_reg"] > 0 and float(out.terms["loss_con"]) == 0.0
    PPIObjective(PPIConfig(warmup_epochs=0, guide="partner"))(_model(), x, y, epoch=1)
    assert calls == ["soft"]


@pytest.mark.parametrize("mode", ["detached", "differentiable"])
@pytest.mark.parametrize("form,norm", [("partner", "batch"), ("partner", "running"), ("study_positive", "batch")])
def test_activation_checkpointing_changes_nothing_in_a_step(mode: str, form: str, norm: str) -> None:
    x, y, outline, annotated = _batch()
    cfg = PPIConfig(mode=mode, warmup_epochs=0, contrast_norm=norm, **FORMS[form])
    results = []
    for model in (_model(), _model(checkpoint=True)):
        torch.manual_seed(7)
        out = PPIObjective(cfg)(model, x, y, epoch=1, annotation=outline, annotated=annotated)
        # the backward recomputes every segment (twice for the clean batch): the statistics must not move again
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results.append((out, grads, [b.clone() for b in model.buffers()]))
    (out, grads, buffers), (ck_out, ck_grads, ck_buffers) = results
    for key, value in out.terms.items():
        torch.testing.assert_close(ck_out.terms[key], value, rtol=1e-10, atol=1e-12, msg=key)
    torch.testing.assert_close(ck_out.saliency, out.saliency, rtol=1e-10, atol=1e-12)
    for g, h in zip(ck_grads, grads):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10)
    assert all(torch.equal(b, c) for b, c in zip(ck_buffers, buffers))
    assert any(not torch.equal(b, c) for b, c in zip(buffers, _model().buffers()))  # the statistics did move once


def _unoptimised(monkeypatch: pytest.MonkeyPatch) -> None:
    """WBP as it ran before its fast paths: autograd's own convolution backward (and double backward), the
    batch-norm variance recomputed from the input, a copy at every rerouting node, the input gradient of the
    first convolution computed by every backward, the contrasts' stem backward left to autograd."""
    import contextlib
    import sys

    import ppi_med.ppi.objective as objective
    from ppi_med.saliency import rules
    from ppi_med.saliency.core import Reroute

    wbp_module = sys.modules["ppi_med.saliency.wbp"]
    monkeypatch.setattr(wbp_module, "conv_geometry", lambda module: None)
    monkeypatch.setattr(wbp_module, "RerouteInPlace", Reroute)
    monkeypatch.setattr(rules, "forward_invstd", lambda v, y: None)
    monkeypatch.setattr(objective, "single_channel_input_gradient", lambda model: contextlib.nullcontext())


@pytest.mark.parametrize("mode", ["detached", "differentiable"])
@pytest.mark.parametrize("form", ["partner", "study_positive"])
def test_the_fast_paths_give_the_loss_and_gradients_of_the_unoptimised_step(
    mode: str, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y, outline, annotated = _batch()
    cfg = PPIConfig(mode=mode, warmup_epochs=0, **FORMS[form])
    results = []
    for slow in (False, True):
        if slow:
            _unoptimised(monkeypatch)
        model = _model()
        torch.manual_seed(7)
        out = PPIObjective(cfg)(model, x, y, epoch=1, annotation=outline, annotated=annotated)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results.append((out, grads, [b.clone() for b in model.buffers()]))
    (fast, fast_grads, fast_buffers), (slow, slow_grads, slow_buffers) = results
    for key, value in slow.terms.items():
        torch.testing.assert_close(fast.terms[key], value, rtol=1e-10, atol=1e-12, msg=key)
    torch.testing.assert_close(fast.saliency, slow.saliency, rtol=1e-10, atol=1e-12)
    for (name, _), g, h in zip(_model().named_parameters(), fast_grads, slow_grads):
        torch.testing.assert_close(g, h, rtol=1e-8, atol=1e-10, msg=name)
    assert all(torch.equal(b, c) for b, c in zip(fast_buffers, slow_buffers))


@pytest.mark.parametrize("mode", ["detached", "differentiable"])
def test_under_bfloat16_autocast_the_fast_paths_give_the_unoptimised_step(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32 network stepped under CPU bfloat16 autocast, as the engine's ``amp`` runs it: the convolution
    routing computes in bfloat16 like autograd's own backward, so loss, map and gradients are finite and those
    of the unoptimised step under the same autocast, to bfloat16 rounding. (Against float32 this untrained
    width-4 MVCNN's map already moves by about half its maximum in bfloat16, with or without the fast paths:
    the comparison with float32 is made on a better-conditioned network in test_saliency.py.)"""
    x, y, _, _ = _batch()
    cfg = PPIConfig(mode=mode, warmup_epochs=0, **FORMS["partner"])
    results = []
    for slow in (False, True):
        if slow:
            _unoptimised(monkeypatch)
        model = _model().float()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = PPIObjective(cfg)(model, x.float(), y, epoch=1)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
        results.append((out, grads))
    (fast, fast_grads), (slow, slow_grads) = results
    assert fast.terms["loss_con"] > 0 and fast.terms["loss_ad"] > 0
    for key, value in slow.terms.items():
        torch.testing.assert_close(fast.terms[key], value, rtol=1e-2, atol=1e-3, msg=key)
    torch.testing.assert_close(fast.saliency, slow.saliency, rtol=0, atol=1e-2 * float(slow.saliency.abs().max()))
    scale = max(float(g.abs().max()) for g in slow_grads)
    for (name, _), g, h in zip(_model().named_parameters(), fast_grads, slow_grads):
        torch.testing.assert_close(g, h, rtol=0, atol=2e-2 * scale, msg=name)
