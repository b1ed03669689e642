"""The PPI objective ``L = L_cls + w1 L_con + w2 L_reg + w3 L_ad`` (section 2.3.1 of the method).

One :class:`PPIObjective` call does a whole step's loss for a batch:

1. one forward of ``x`` under the saliency tracer gives the logits for ``L_cls`` *and* the saliency
   ``s_y(x)`` of each sample's own label (WBP by default);
2. ``s`` is normalised per sample and turned into a mask ``T(s)``;
3. one forward of the two contrasts together: the negative ``x* = x - T(s(x)) x`` that should lose the
   label, and the adversarial positive ``x' = x - T(s(x_j)) x`` that should keep it. The partner ``j`` is
   another sample of the same label by default (``partner="same_class"``; the method rolls the batch by
   one, ``"roll"``), and by default ``x*`` removes only what is salient in ``x`` and not in its partner
   (``exclusive``): a marker at a fixed place is salient in both, so ``x*`` keeps it and must still lose
   the label, which is what makes a shortcut count less (docs/DESIGN.md section 4.1);
4. ``L_reg`` is the mean absolute normalised saliency.

``differentiable`` mode keeps ``s`` in the graph (double backward, as in the method); ``detached`` mode
uses it as a constant mask, which is cheaper, and then ``L_reg`` carries no gradient (it is still reported).

The contrast loss ``l(x*, not y)`` defaults to the bounded form ``-log(1 - p_y(x*))`` (cross-entropy
against "any class but y"; for two classes exactly ``CE(x*, 1 - y)``). The method's text also writes it
as ``-l(x*, y) = log p_y(x*)``, which has no lower bound: a model can drive it to minus infinity by
making every intervened input confidently wrong, swamping the other terms. It is available as
``contrast_loss="negate"``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..flags import as_bool
from ..saliency import frozen_buffers, make_tracer, plain
from ..saliency.conv_input import single_channel_input_gradient
from .guides import SitePrototypes, annotation_regions, site_regions
from .interventions import FILLS, fill_values, intervene, random_erase, relocate
from .masks import MASKS, dilate, make_mask, normalize

__all__ = [
    "GUIDES",
    "PPIConfig",
    "PPIOutput",
    "PPIObjective",
    "adversarial_partners",
    "contrast_loss",
    "no_harm_loss",
]

MODES = ("differentiable", "detached")
CONTRAST_LOSSES = ("flip", "negate")
PARTNERS = ("roll", "same_class")
#: where the removed regions come from (docs/DESIGN.md section 4.3)
GUIDES = ("study", "annotation", "site", "own", "partner")
CONTROLS = ("none", "random_mask")
#: the fill a method name leaves unsaid (docs/DESIGN.md section 4.7 says why it is the default)
DEFAULT_FILL = "other_class"


def _as_bool(value: Any, name: str) -> bool:
    return as_bool(value, f"PPI {name}")


@dataclass
class PPIConfig:
    """Everything that defines the PPI objective.

    Attributes:
        enabled: ``False`` gives plain cross-entropy training (the baseline).
        saliency: a method of :func:`ppi_med.saliency.compute` (``wbp``, ``gradient``, ``gradcam`` ...).
        mode: ``differentiable`` or ``detached``.
        mask: ``soft``, ``soft_adaptive``, ``hard``, ``box`` or ``topk``.
        omega, sigma: the soft mask's sharpness and threshold.
        adaptive_k: ``soft_adaptive`` threshold, mean + k std.
        k_std: hard/box point threshold in standard deviations.
        box_std: box half-size in standard deviations.
        topk: points kept by the ``topk`` mask.
        absolute: mask on the saliency's magnitude, so strong evidence against the label is removed too
            (``False``: only evidence for the label, as the method's signed maps do).
        contrast_classes: the labels whose samples get the negative contrast (``None``: every label). For a
            presence/absence task (lesion vs none) only the positive class has evidence whose removal should
            flip the label; "no lesion" minus its salient region is not a lesion.
        adversarial_classes: the labels whose samples get the adversarial positive ``x'`` (``None``: every
            label). Where the finding is itself a loss of tissue (GA: the retinal pigment epithelium fades), a
            healthy eye with a region removed looks like the finding, and ``x'`` would ask it to stay healthy
            against ``L_cls`` (docs/DESIGN.md section 4.6).
        exclusive: the negative contrast ``x*`` removes only what is salient in ``x`` and not in its partner.
        dilate: grow the mask by this many voxels along each spatial axis (0: the mask as made).
        w_con, w_reg, w_ad: weights of the contrast, regulariser and adversarial terms.
        contrast_loss: ``flip`` (bounded, default) or ``negate`` (``-l(x*, y)``).
        partner: with ``guide="partner"``, whose saliency masks a sample in the adversarial positive ``x'``:
            ``roll`` (the batch rolled by one, the method's ``j != i``) or ``same_class`` (another sample of the
            same label).
        guide: where the removed regions come from (docs/DESIGN.md section 4.3). ``partner``: the method's
            pairing (``x*`` removes the sample's salient region, ``exclusive`` of its partner's; ``x'`` removes
            the partner's); ``own``: ``x*`` removes the sample's salient region, no ``x'``; ``annotation``: a
            record with an outline loses the outline in ``x*`` and its salient region outside the outline in
            ``x'`` (others as ``own``); ``site``: the salient region's site-specific part (salient at the
            sample's site, not at other sites, for the same class) is removed in ``x'``, the rest in ``x*``;
            ``study``: ``annotation`` for the records with an outline, no contrast for the others.
        fill: what a removed region becomes: ``zero``, ``mean``, ``blur``, ``noise`` or ``other_class``
            (:func:`ppi_med.ppi.interventions.fill_values`).
        adversarial_fill: what a region removed in ``x'`` becomes; ``None``: as ``fill``, except that
            ``other_class`` gives ``zero`` there. ``x'`` must keep its label, and another class's content put
            in its place could carry that class's evidence into it (measured on the fixed-evidence set of
            ``tests/test_ppi_fixed_evidence.py``: -0.05 cue-free AUC with ``other_class`` in ``x'`` too).
        blur_sigma: the ``blur`` fill's Gaussian, in voxels.
        annotation_dilate: voxels an outline is grown by before it is removed (a lesion's rim is evidence too).
        site_momentum: momentum of the per-(site, class) saliency means of the ``site`` guide.
        control: ``none`` or ``random_mask``: every removed region moved to a random place (same shape and
            area), the control "PPI without saliency".
        random_erasing: with ``enabled`` false, the probability of random erasing of each training sample (the
            augmentation control); must be 0 with PPI on.
        warmup_epochs: epochs of plain cross-entropy before the PPI terms start.
        ramp_epochs: after the warm-up, the PPI weights rise linearly to their full value over this many
            epochs (0: full at once).
        contrast_norm: how batch norm sees the contrasts: ``batch`` (their own batch statistics, as any
            training-mode forward) or ``running`` (the running statistics of the data, as at evaluation: the
            network is then not trained on contrasts normalised unlike any real batch).
        no_harm: remove from each step's PPI gradient the part that opposes the classification gradient
            (:func:`no_harm_loss`), so that to first order a PPI step never raises ``L_cls`` on its batch.
        con_boost, con_boost_epoch: from that epoch on, ``w_con`` is multiplied by ``con_boost``.
        saliency_kwargs: options for the saliency method (e.g. ``{"layer": "..."}`` for gradcam).
    """

    enabled: bool = True
    saliency: str = "wbp"
    mode: str = "differentiable"
    mask: str = "soft"
    omega: float = 100.0
    sigma: float = 0.25
    adaptive_k: float = 1.0
    k_std: float = 7.0
    box_std: float = 1.2
    topk: int = 1000
    absolute: bool = False
    exclusive: bool = True
    contrast_classes: list[int] | None = None
    adversarial_classes: list[int] | None = None
    dilate: int = 0
    w_con: float = 1.0
    w_reg: float = 0.1
    w_ad: float = 1.0
    contrast_loss: str = "flip"
    partner: str = "same_class"
    guide: str = "study"
    fill: str = DEFAULT_FILL
    adversarial_fill: str | None = None
    blur_sigma: float = 2.0
    annotation_dilate: int = 1
    site_momentum: float = 0.9
    control: str = "none"
    random_erasing: float = 0.0
    warmup_epochs: int = 1
    ramp_epochs: int = 0
    no_harm: bool = False
    contrast_norm: str = "batch"
    con_boost: float = 1.0
    con_boost_epoch: int | None = None
    saliency_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.enabled = _as_bool(self.enabled, "enabled")
        self.absolute = _as_bool(self.absolute, "absolute")
        self.no_harm = _as_bool(self.no_harm, "no_harm")
        self.exclusive = _as_bool(self.exclusive, "exclusive")
        if self.mode not in MODES:
            raise ValueError(f"PPI mode must be one of {MODES}, got '{self.mode}'")
        if self.mask not in MASKS:
            raise ValueError(f"PPI mask must be one of {MASKS}, got '{self.mask}'")
        if self.partner not in PARTNERS:
            raise ValueError(f"PPI partner must be one of {PARTNERS}, got '{self.partner}'")
        if self.contrast_loss not in CONTRAST_LOSSES:
            raise ValueError(f"PPI contrast_loss must be one of {CONTRAST_LOSSES}, got '{self.contrast_loss}'")
        for name in ("w_con", "w_reg", "w_ad"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPI {name} must be >= 0, got {getattr(self, name)}")
        if self.omega <= 0:
            raise ValueError(f"PPI omega (the soft mask's sharpness) must be > 0, got {self.omega}")
        if not 0.0 <= self.sigma <= 1.0:
            raise ValueError(f"PPI sigma must lie in [0, 1] (the saliency is normalised to [-1, 1]), got {self.sigma}")
        if self.guide not in GUIDES:
            raise ValueError(f"PPI guide must be one of {GUIDES}, got '{self.guide}'")
        if self.fill not in FILLS:
            raise ValueError(f"PPI fill must be one of {FILLS}, got '{self.fill}'")
        if self.adversarial_fill is not None and self.adversarial_fill not in FILLS:
            raise ValueError(f"PPI adversarial_fill must be one of {FILLS} or null, got '{self.adversarial_fill}'")
        if self.contrast_norm not in ("batch", "running"):
            raise ValueError(f"PPI contrast_norm must be 'batch' or 'running', got '{self.contrast_norm}'")
        if self.control not in CONTROLS:
            raise ValueError(f"PPI control must be one of {CONTROLS}, got '{self.control}'")
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ValueError(f"PPI random_erasing is a probability in [0, 1], got {self.random_erasing}")
        if self.enabled and self.random_erasing:
            raise ValueError("PPI random_erasing is the baseline's augmentation control; set enabled to false")
        if not 0.0 <= self.site_momentum < 1.0:
            raise ValueError(f"PPI site_momentum must lie in [0, 1), got {self.site_momentum}")
        if self.blur_sigma <= 0:
            raise ValueError(f"PPI blur_sigma must be > 0, got {self.blur_sigma}")
        for name in ("dilate", "warmup_epochs", "ramp_epochs", "annotation_dilate"):
            if getattr(self, name) < 0:
                raise ValueError(f"PPI {name} must be >= 0, got {getattr(self, name)}")
        for name in ("contrast_classes", "adversarial_classes"):
            classes = getattr(self, name)
            if classes is not None and not all(isinstance(c, int) for c in classes):
                raise ValueError(f"PPI {name} must be a list of class indices, got {classes!r}")

    def weights(self, epoch: int | None) -> dict[str, float]:
        """Weights of the PPI terms at ``epoch`` (1-based, as MONAI engines count; ``None``: no schedule)."""
        if epoch is not None and epoch <= self.warmup_epochs:
            return {"con": 0.0, "reg": 0.0, "ad": 0.0}
        ramp = 1.0
        if epoch is not None and self.ramp_epochs:
            ramp = min(1.0, (epoch - self.warmup_epochs) / self.ramp_epochs)
        boost = self.con_boost if self.con_boost_epoch is not None and (epoch or 0) >= self.con_boost_epoch else 1.0
        return {"con": ramp * self.w_con * boost, "reg": ramp * self.w_reg, "ad": ramp * self.w_ad}

    @property
    def method(self) -> str:
        """The variant's label, as runs are tagged: :func:`ppi_med.ppi.variants.recipe_label`.

        The fields that differ from the defaults, in the grammar of :mod:`ppi_med.ppi.variants` (``baseline``,
        ``random_erasing``, ``random_mask``, ``ppi_wbp``, ``ppi_wbp_box``, ``ppi_wbp_partner_zero:mode=detached``),
        with the recipe's own warm-up, ramp and contrast classes left out (the GA bundle's default is ``ppi_wbp``).
        """
        from .variants import recipe_label  # the grammar reads PPIConfig, so it is imported when used

        return recipe_label(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PPIOutput:
    """The total loss (with graph), its named parts, the logits of ``x`` and the saliency used.

    ``terms`` holds the parts as detached 0-d tensors on the loss's device, so a training step never waits
    for the device to read them; ``components`` reads them as floats (one synchronisation).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor
    saliency: torch.Tensor | None = None

    @property
    def components(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.terms.items()}


def contrast_loss(
    logits: torch.Tensor, y: torch.Tensor, kind: str = "flip", weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss that pushes ``logits`` away from class ``y``.

    Args:
        logits: ``(N, M)``.
        y: ``(N,)`` class indices.
        kind: ``flip``: ``-log(1 - p_y)``, bounded below by 0; ``negate``: ``log p_y`` = ``-CE``.
        weight: per-sample weights ``(N,)``; the result is their weighted mean (0 when they sum to 0).
    """
    log_p = F.log_softmax(logits, dim=1)
    if kind == "negate":
        per = log_p.gather(1, y[:, None])[:, 0]
    else:
        others = log_p.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        per = -torch.logsumexp(others, dim=1)
    return per.mean() if weight is None else _weighted_mean(per, weight)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # the sum of weights is clamped, not tested: no host-device synchronisation inside a step
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


@contextlib.contextmanager
def _norm_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """With ``running``, every batch-norm layer in evaluation mode (running statistics) for the block."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if mode == "running":
        for m in norms:
            m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def no_harm_loss(
    loss_cls: torch.Tensor, loss_ppi: torch.Tensor, params: Sequence[torch.Tensor], eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 + c) L_cls + L_ppi``: its gradient is ``g_cls + g_ppi`` less the part of ``g_ppi`` along ``-g_cls``.

    With ``c = max(0, -<g_ppi, g_cls> / |g_cls|^2)`` the total gradient ``g_cls + g_ppi + c g_cls`` has no
    component that raises ``L_cls`` beyond what ``g_cls`` alone lowers (gradient surgery in the manner of
    PCGrad, Yu et al. 2020, one-sided: only the PPI part is projected). Expressed as a reweighted loss, one
    ordinary backward yields it, so data-parallel training reduces it like any other loss (each rank's ``c``
    is its own batch's).

    Args:
        loss_cls: the classification loss, with graph.
        loss_ppi: the weighted sum of the PPI terms, with graph.
        params: the parameters the step updates.

    Returns:
        The loss to backpropagate and ``c`` (detached; 0 when the two gradients do not conflict).
    """
    if not loss_ppi.requires_grad:
        return loss_cls + loss_ppi, loss_cls.new_zeros(())
    g_cls = torch.autograd.grad(loss_cls, params, retain_graph=True, allow_unused=True)
    g_ppi = torch.autograd.grad(loss_ppi, params, retain_graph=True, allow_unused=True)
    pairs = [(a, b) for a, b in zip(g_cls, g_ppi) if a is not None and b is not None]
    dot = sum(((a * b).sum() for a, b in pairs), loss_cls.new_zeros(()))
    norm = sum(((a * a).sum() for a in g_cls if a is not None), loss_cls.new_zeros(()))
    c = (-dot / norm.clamp_min(eps)).clamp_min(0).detach()
    return (1 + c) * loss_cls + loss_ppi, c


def _member(y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return (y[:, None] == torch.as_tensor(classes, device=y.device)[None]).any(dim=1)


def _rows(keep: torch.Tensor | None, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The rows ``keep`` selects of each tensor (``None`` stays ``None``; ``keep`` ``None``: all rows)."""
    return [t if keep is None or t is None else t[keep] for t in tensors]


def adversarial_partners(y: torch.Tensor, kind: str = "roll") -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs ``(i, j)``, ``j != i``, for the adversarial positives ``x'_i = x_i - T(s(x_j)) x_i``.

    Args:
        y: labels ``(N,)``.
        kind: ``roll``: every ``i`` with ``j = i - 1`` (mod N); ``same_class``: ``j`` is the previous sample
            of the same label, and a sample alone in its class gets no partner.

    Returns:
        Index tensors ``i`` and ``j`` of equal length (empty when no sample has a partner).
    """
    n = y.shape[0]
    idx = torch.arange(n, device=y.device)
    if n < 2:
        return idx[:0], idx[:0]
    if kind == "roll":
        return idx, idx.roll(1)
    groups = [idx[y == c] for c in torch.unique(y)]
    groups = [g for g in groups if g.numel() > 1]
    if not groups:
        return idx[:0], idx[:0]
    return torch.cat(groups), torch.cat([g.roll(1) for g in groups])


class PPIObjective:
    """``(model, x, y) -> PPIOutput``: the loss a MONAI trainer iteration backpropagates.

    Args:
        config: a :class:`PPIConfig` (or a dict of its fields).
        generator: the random source of the ``noise`` fill, the ``random_mask`` control and random erasing.
    """

    def __init__(
        self, config: PPIConfig | dict[str, Any] | None = None, generator: torch.Generator | None = None
    ) -> None:
        self.config = config if isinstance(config, PPIConfig) else PPIConfig(**(config or {}))
        self.generator = generator
        self.prototypes = SitePrototypes(self.config.site_momentum)
        self._warned_no_partner = False

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int | None = None,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        sites: Sequence[str] | None = None,
        annotation: torch.Tensor | None = None,
        annotated: torch.Tensor | None = None,
    ) -> PPIOutput:
        """Loss for one batch.

        Args:
            model: the classifier (in the mode the caller wants; typically training).
            x: inputs ``(N, C, *spatial)``.
            y: integer labels ``(N,)`` (a ``(N, 1)`` tensor is flattened).
            epoch: the current epoch for the warm-up schedule.
            loss_function: ``L_cls(logits, y)`` (a MONAI trainer's ``loss_function``); default cross-entropy.
                The contrast and adversarial terms are the method's own and keep theirs.
            sites: each sample's site (the ``site`` guide).
            annotation: outlines ``(N, 1, *spatial)`` in ``[0, 1]`` (the ``annotation`` and ``study`` guides).
            annotated: ``(N,)``, true where the record has an outline (an all-zero outline of a record without
                one is not "no finding").

        Raises:
            ValueError: the ``site`` guide without sites, or the ``annotation`` guide without outlines.
        """
        cfg = self.config
        y = y.reshape(-1).long()
        cls_loss = F.cross_entropy if loss_function is None else (lambda z, t: loss_function(z, t).mean())
        if not cfg.enabled:
            if cfg.random_erasing:
                x = random_erase(plain(x), cfg.random_erasing, generator=self.generator)
            logits = model(x)
            loss = cls_loss(logits, y)
            return PPIOutput(loss, {"loss": loss.detach(), "loss_cls": loss.detach()}, logits)
        if cfg.guide == "site" and sites is None:
            raise ValueError("PPI guide 'site' needs each sample's site; the batch names none (use guide 'study')")
        if cfg.guide == "annotation" and annotation is None:
            raise ValueError("PPI guide 'annotation' needs the records' outlines; the batch has none")

        w = cfg.weights(epoch)
        active = any(v > 0 for v in w.values())
        if active and cfg.guide == "partner":  # pairs from the labels before work is queued on the device
            i, j = adversarial_partners(y, cfg.partner)
        tracer = make_tracer(cfg.saliency, model, **cfg.saliency_kwargs)
        tracer.input_gradient = False  # xg is made for the saliency: no loss reads its gradient
        differentiable = cfg.mode == "differentiable" and tracer.differentiable
        x = plain(x).detach()
        xg = x.detach().requires_grad_(active)
        with tracer:
            logits = model(xg)
        loss_cls = cls_loss(logits, y)
        if not active:
            zero = loss_cls.new_zeros(())
            parts = {"loss": loss_cls.detach(), "loss_cls": loss_cls.detach(), "loss_con": zero, "loss_reg": zero}
            return PPIOutput(loss_cls, {**parts, "loss_ad": zero}, logits)

        # the graph of the saliency is built only where a loss is trained through it
        s = tracer.saliency(logits, xg, y, create_graph=differentiable, retain_graph=True)
        s_n = normalize(s.abs() if cfg.absolute else s)
        if cfg.guide == "study" and annotation is None:  # nothing known about any record: no contrast, no mask
            x_neg, x_adv, y_neg, y_adv = x[:0], x[:0], y[:0], y[:0]
            con_w = ad_w = s_n.new_zeros(0).detach()
        else:
            # the negative contrast's samples, chosen before any is intervened on (boolean indexing waits for
            # the device: only when classes are chosen)
            keep = None if cfg.contrast_classes is None else _member(y, cfg.contrast_classes)
            mask = make_mask(
                cfg.mask,
                s_n,
                omega=cfg.omega,
                sigma=cfg.sigma,
                adaptive_k=cfg.adaptive_k,
                k_std=cfg.k_std,
                box_std=cfg.box_std,
                topk=cfg.topk,
            )
            mask = dilate(mask, cfg.dilate)
            if cfg.guide == "partner":
                x_neg, x_adv, y_adv, con_w, ad_w = self._partner_contrasts(x, y, mask, i, j, keep)
            else:
                x_neg, x_adv, y_adv, con_w, ad_w = self._guided_contrasts(
                    x, y, mask, sites, annotation, annotated, keep
                )
            y_neg = y if keep is None else y[keep]
            if cfg.adversarial_classes is not None and x_adv.shape[0]:
                x_adv, y_adv, ad_w = _rows(_member(y_adv, cfg.adversarial_classes), x_adv, y_adv, ad_w)
        # the contrasts must not move batch-norm running statistics: they are not the data distribution
        contrasts = torch.cat([x_neg, x_adv])
        # DDP pairs every rank's forwards and collectives: a rank whose batch forms no contrast (no GA eye, with
        # contrast_classes and adversarial_classes [1]) still runs one, on a clean sample weighted 0
        placeholder = not contrasts.shape[0] and isinstance(model, nn.parallel.DistributedDataParallel)
        if placeholder:
            contrasts = x[:1]
        with frozen_buffers(model), _norm_mode(model, cfg.contrast_norm), single_channel_input_gradient(model):
            out = model(contrasts) if contrasts.shape[0] else logits[:0]
        zero = out.sum() * 0.0 if placeholder else loss_cls.new_zeros(())
        out = out[:0] if placeholder else out
        out_neg, out_adv = out[: x_neg.shape[0]], out[x_neg.shape[0] :]
        loss_con = contrast_loss(out_neg, y_neg, cfg.contrast_loss, con_w) if x_neg.shape[0] else zero
        if x_adv.shape[0]:
            loss_ad = _weighted_mean(F.cross_entropy(out_adv, y_adv, reduction="none"), ad_w)
        else:
            loss_ad = zero
        n = x.shape[0]
        loss_reg = s_n.abs().reshape(n, -1).mean(dim=1).mean()
        ppi = w["con"] * loss_con + w["reg"] * loss_reg + w["ad"] * loss_ad
        total = loss_cls + ppi
        parts = {"loss": total, "loss_cls": loss_cls, "loss_con": loss_con, "loss_reg": loss_reg, "loss_ad": loss_ad}
        parts = {k: v.detach() for k, v in parts.items()}
        if cfg.no_harm:
            total, extra = no_harm_loss(loss_cls, ppi, [p for p in model.parameters() if p.requires_grad])
            parts["loss_conflict"] = extra
        return PPIOutput(total, parts, logits, s.detach())

    def _fills(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What ``x*`` and ``x'`` fill their removed regions with (``None``: zeros)."""
        cfg = self.config

        def values(kind: str) -> torch.Tensor | None:
            return (
                None
                if kind == "zero"
                else fill_values(x, kind, y=y, blur_sigma=cfg.blur_sigma, generator=self.generator)
            )

        fill = values(cfg.fill)
        ad_kind = cfg.adversarial_fill or ("zero" if cfg.fill == "other_class" else cfg.fill)
        return fill, (fill if ad_kind == cfg.fill else values(ad_kind))

    def _random(self, region: torch.Tensor) -> torch.Tensor:
        return relocate(region, self.generator) if self.config.control == "random_mask" else region

    def _partner_contrasts(self, x, y, mask, i, j, keep=None):
        """The method's pairing: ``x*`` loses the salient region (``exclusive`` of the partner's), ``x'_i`` its
        partner's salient region; ``x*`` only for the samples ``keep`` selects (``None``: all)."""
        cfg = self.config
        n = x.shape[0]
        if not i.numel() and not self._warned_no_partner:
            self._warned_no_partner = True
            warnings.warn(
                f"PPI: a batch of {n} sample(s) with labels {sorted(set(y.tolist()))} has no adversarial partner "
                f"(partner={cfg.partner!r} needs two samples{' of one class' if cfg.partner == 'same_class' else ''}); "
                "L_ad is 0 for it. Use a larger batch (or drop_last) so every step has pairs.",
                stacklevel=3,
            )
        neg_mask = mask
        if cfg.exclusive and i.numel():
            # what the partner finds salient too is not this sample's own evidence (a marker at a fixed place)
            neg_mask = mask.index_put((i,), mask[i] * (1 - mask[j]))
        fill, ad_fill = self._fills(x, y)
        neg_mask = self._random(neg_mask)  # drawn for every sample, as the adversarial masks after it
        x_neg = intervene(*_rows(keep, x, neg_mask, fill))
        x_adv = intervene(x[i], self._random(mask[j]), None if ad_fill is None else ad_fill[i])
        ones = torch.ones(n, device=x.device)
        return x_neg, x_adv, y[i], ones if keep is None else ones[keep], ones[: i.numel()]

    def _guided_contrasts(self, x, y, mask, sites, annotation, annotated, keep=None):
        """Per sample: evidence removed in ``x*`` (for the samples ``keep`` selects, ``None``: all), nuisance
        removed in ``x'`` (docs/DESIGN.md section 4.3)."""
        cfg = self.config
        n = x.shape[0]
        # the study guide intervenes only where the record says what its evidence is (docs/DESIGN.md 4.3)
        evidence, nuisance = (torch.zeros_like(mask) if cfg.guide == "study" else mask), None
        if cfg.guide == "site" and sites is not None:
            self.prototypes.update(mask, list(sites), y)
            evidence, nuisance = site_regions(mask, list(sites), y, self.prototypes)
        if cfg.guide in ("annotation", "study") and annotation is not None:
            has = torch.ones(n, dtype=torch.bool) if annotated is None else annotated.reshape(-1).bool()
            has = has.to(x.device).reshape(n, *([1] * (x.ndim - 1)))
            outline = dilate(annotation.to(x.device, x.dtype), cfg.annotation_dilate).clamp(0, 1)
            a_ev, a_nu = annotation_regions(mask, outline)
            evidence = torch.where(has, a_ev, evidence)
            nuisance = torch.where(has, a_nu, torch.zeros_like(mask) if nuisance is None else nuisance)
        # a sample takes part in a contrast only if its region removes at least one voxel's worth
        evidence = self._random(evidence)
        con_w = (evidence.detach().reshape(n, -1).sum(dim=1) >= 1).to(x.dtype)
        fill, ad_fill = self._fills(x, y)
        x_neg = intervene(*_rows(keep, x, evidence, fill))
        con_w = con_w if keep is None else con_w[keep]
        if nuisance is None:  # the study knows nothing that marks a region as not evidence: no x'
            return x_neg, x[:0], y[:0], con_w, con_w[:0]
        nuisance = self._random(nuisance)
        ad_w = (nuisance.detach().reshape(n, -1).sum(dim=1) >= 1).to(x.dtype)
        return x_neg, intervene(x, nuisance, ad_fill), y, con_w, ad_w
