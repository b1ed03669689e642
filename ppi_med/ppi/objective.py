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

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..saliency import frozen_buffers, make_tracer, plain
from .masks import MASKS, dilate, make_mask, normalize

__all__ = ["PPIConfig", "PPIOutput", "PPIObjective", "adversarial_partners", "contrast_loss"]

MODES = ("differentiable", "detached")
CONTRAST_LOSSES = ("flip", "negate")
PARTNERS = ("roll", "same_class")


def _as_bool(value: Any, name: str) -> bool:
    # command-line overrides arrive as strings ("--ppi#enabled false")
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"PPI {name} must be true or false, got '{value}'")
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"PPI {name} must be true or false, got {value!r}")


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
        exclusive: the negative contrast ``x*`` removes only what is salient in ``x`` and not in its partner.
        dilate: grow the mask by this many voxels along each spatial axis (0: the mask as made).
        w_con, w_reg, w_ad: weights of the contrast, regulariser and adversarial terms.
        contrast_loss: ``flip`` (bounded, default) or ``negate`` (``-l(x*, y)``).
        partner: whose saliency masks a sample in the adversarial positive ``x'``: ``roll`` (the batch rolled
            by one, the method's ``j != i``) or ``same_class`` (another sample of the same label).
        warmup_epochs: epochs of plain cross-entropy before the PPI terms start.
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
    dilate: int = 0
    w_con: float = 1.0
    w_reg: float = 0.1
    w_ad: float = 1.0
    contrast_loss: str = "flip"
    partner: str = "same_class"
    warmup_epochs: int = 1
    con_boost: float = 1.0
    con_boost_epoch: int | None = None
    saliency_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.enabled = _as_bool(self.enabled, "enabled")
        self.absolute = _as_bool(self.absolute, "absolute")
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
        if self.dilate < 0 or self.warmup_epochs < 0:
            raise ValueError(f"PPI dilate and warmup_epochs must be >= 0, got {self.dilate}, {self.warmup_epochs}")
        if self.contrast_classes is not None and not all(isinstance(c, int) for c in self.contrast_classes):
            raise ValueError(f"PPI contrast_classes must be a list of class indices, got {self.contrast_classes!r}")

    def weights(self, epoch: int | None) -> dict[str, float]:
        """Weights of the PPI terms at ``epoch`` (1-based, as MONAI engines count; ``None``: no schedule)."""
        if epoch is not None and epoch <= self.warmup_epochs:
            return {"con": 0.0, "reg": 0.0, "ad": 0.0}
        boost = self.con_boost if self.con_boost_epoch is not None and (epoch or 0) >= self.con_boost_epoch else 1.0
        return {"con": self.w_con * boost, "reg": self.w_reg, "ad": self.w_ad}

    @property
    def method(self) -> str:
        """The method's name, as runs are tagged and site CV spells it: ``baseline``, ``ppi_<saliency>``, or
        ``ppi_<saliency>_<mask>`` when the mask is not the default soft one (``ppi_wbp_box``)."""
        if not self.enabled:
            return "baseline"
        return f"ppi_{self.saliency}" + ("" if self.mask == "soft" else f"_{self.mask}")

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


def contrast_loss(logits: torch.Tensor, y: torch.Tensor, kind: str = "flip") -> torch.Tensor:
    """Loss that pushes ``logits`` away from class ``y``.

    Args:
        logits: ``(N, M)``.
        y: ``(N,)`` class indices.
        kind: ``flip``: ``-log(1 - p_y)``, bounded below by 0; ``negate``: ``log p_y`` = ``-CE``.
    """
    log_p = F.log_softmax(logits, dim=1)
    if kind == "negate":
        return log_p.gather(1, y[:, None]).mean()
    others = log_p.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return -torch.logsumexp(others, dim=1).mean()


def _member(y: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return (y[:, None] == torch.as_tensor(classes, device=y.device)[None]).any(dim=1)


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
    """

    def __init__(self, config: PPIConfig | dict[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, PPIConfig) else PPIConfig(**(config or {}))
        self._warned_no_partner = False

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        epoch: int | None = None,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> PPIOutput:
        """Loss for one batch.

        Args:
            model: the classifier (in the mode the caller wants; typically training).
            x: inputs ``(N, C, *spatial)``.
            y: integer labels ``(N,)`` (a ``(N, 1)`` tensor is flattened).
            epoch: the current epoch for the warm-up schedule.
            loss_function: ``L_cls(logits, y)`` (a MONAI trainer's ``loss_function``); default cross-entropy.
                The contrast and adversarial terms are the method's own and keep theirs.
        """
        cfg = self.config
        y = y.reshape(-1).long()
        cls_loss = F.cross_entropy if loss_function is None else (lambda z, t: loss_function(z, t).mean())
        if not cfg.enabled:
            logits = model(x)
            loss = cls_loss(logits, y)
            return PPIOutput(loss, {"loss": loss.detach(), "loss_cls": loss.detach()}, logits)

        w = cfg.weights(epoch)
        active = any(v > 0 for v in w.values())
        if active:  # pairs from the labels before work is queued on the device, where reading them costs nothing
            i, j = adversarial_partners(y, cfg.partner)
        tracer = make_tracer(cfg.saliency, model, **cfg.saliency_kwargs)
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

        s = tracer.saliency(logits, xg, y, create_graph=differentiable, retain_graph=True)
        s_n = normalize(s.abs() if cfg.absolute else s)
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
        n = x.shape[0]
        if not i.numel() and not self._warned_no_partner:
            self._warned_no_partner = True
            warnings.warn(
                f"PPI: a batch of {n} sample(s) with labels {sorted(set(y.tolist()))} has no adversarial partner "
                f"(partner={cfg.partner!r} needs two samples{' of one class' if cfg.partner == 'same_class' else ''}); "
                "L_ad is 0 for it. Use a larger batch (or drop_last) so every step has pairs.",
                stacklevel=2,
            )
        neg_mask = mask
        if cfg.exclusive and i.numel():
            # what the partner finds salient too is not this sample's own evidence (a marker at a fixed place)
            neg_mask = mask.index_put((i,), mask[i] * (1 - mask[j]))
        x_neg, y_neg = x - neg_mask * x, y
        if cfg.contrast_classes is not None:  # boolean indexing waits for the device: only when classes are chosen
            con = _member(y, cfg.contrast_classes)
            x_neg, y_neg = x_neg[con], y[con]
        # the contrasts must not move batch-norm running statistics: they are not the data distribution
        contrasts = torch.cat([x_neg, x[i] - mask[j] * x[i]])
        with frozen_buffers(model):
            out = model(contrasts) if contrasts.shape[0] else logits[:0]
        out_neg, out_adv = out[: x_neg.shape[0]], out[x_neg.shape[0] :]
        loss_con = contrast_loss(out_neg, y_neg, cfg.contrast_loss) if x_neg.shape[0] else loss_cls.new_zeros(())
        loss_ad = F.cross_entropy(out_adv, y[i]) if i.numel() else loss_cls.new_zeros(())
        loss_reg = s_n.abs().reshape(n, -1).mean(dim=1).mean()
        total = loss_cls + w["con"] * loss_con + w["reg"] * loss_reg + w["ad"] * loss_ad
        parts = {"loss": total, "loss_cls": loss_cls, "loss_con": loss_con, "loss_reg": loss_reg, "loss_ad": loss_ad}
        parts = {k: v.detach() for k, v in parts.items()}
        return PPIOutput(total, parts, logits, s.detach())
