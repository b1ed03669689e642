"""Shortcut benchmark on real images: does PPI move a model off a spurious cue?

The task is "digit >= 5" on scikit-learn's handwritten digits (1,797 real 8 x 8 scans, shipped inside
scikit-learn, upsampled to 16 x 16 and centred on a 20 x 20 canvas so a cue can sit beside the digit).
A controlled spurious cue (:mod:`ppi_med.cues`: ``patch``, ``line``, ``intensity`` or ``texture``) is put
into the training images with a strong correlation to the label (by default in 95 % of positives and 5 %
of negatives). Every method is trained on the same images and scored on three test sets drawn from
held-out digits:

- ``aligned``: the cue correlates with the label as in training;
- ``reversed``: the correlation is reversed (95 % of negatives carry the cue): a model that took the
  shortcut falls below chance here;
- ``free``: no image carries the cue (what the digit alone gives).

Each (method, seed) pair trains a small ReLU CNN with MONAI's ``SupervisedTrainer`` whose iteration is
:class:`ppi_med.engine.PPIIteration` (the very step the bundles use). A seed fixes the data split, the
cue draw, the initial weights and the batch order, so the methods of one seed differ only in the
objective; the table compares each method with the baseline by a paired t-test across seeds.

Methods are those of :mod:`ppi_med.methods`: a PPI variant of :mod:`ppi_med.ppi.variants` (``baseline``, ``ppi``
for the project's default :class:`~ppi_med.ppi.PPIConfig`, ``ppi:<field>=<value>,...`` such as
``ppi:saliency=gradcam`` or ``ppi:mode=detached,partner=roll``, ``ppi_wbp_box``, the controls ``random_mask`` and
``random_erasing``), a comparator (``groupdro``, ``jtt``, ``dfr``) or ``<variant>+<comparator>`` (``ppi+dfr``).
Each is named in the tables, figures and MLflow by its label on ``--ppi-base`` (:func:`method_label`: ``ppi`` ->
``ppi_wbp``, ``ppi:partner=roll,mode=detached`` -> ``ppi_wbp:mode=detached,partner=roll``); two methods with one
label are refused.
``--grid`` picks a prepared list: ``default`` (baseline, PPI and the method's own form), ``ablation``
(one ingredient of the default removed at a time), ``attempts`` (the other variants tried), ``saliency``,
``mode``, ``mask``, ``partner``, or ``full`` (every saliency method, mode, mask and partner).

Outputs in ``--out`` (default ``runs/shortcut/<time>``): ``report.md`` (every cue's table, the command
and the commit), and per cue in ``<cue>/``: ``results.csv`` (one row per method, seed and test set),
``summary.csv`` / ``summary.md`` (mean, sd, paired p-value against the baseline, share of |WBP| on the
cue), ``shortcut_auc.png`` (reversed and cue-free AUC per method, one dot per seed), ``epochs.csv`` and
``epochs.png`` (every epoch's AUC on each test set and its selection score, the chosen epoch marked: whether
the rule chose a model that still reads the cue) and ``examples.png`` (the cue and each method's saliency on
cue-carrying test digits). ``--publish DIR`` copies the report and figures there. MLflow: one parent run per
cue in experiment ``shortcut`` with the tables and figures, and a nested run per (method, seed) with its
metrics and its per-epoch curves (``epoch_<test set>_auc``, step = epoch).

CLI::

    python -m pipelines.shortcut --cue patch --seeds 5
    python -m pipelines.shortcut --cue line --grid full --seeds 5 --epochs 12
    python -m pipelines.shortcut --cue texture --methods baseline ppi ppi:partner=roll
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ppi_med.annotations import choose_outlined
from ppi_med.cues import CUE_KINDS, SpuriousCue, cue_flags
from ppi_med.methods import split_comparator, split_methods
from ppi_med.ppi import PPIConfig, VariantError, variant, variant_label
from ppi_med.ppi.interventions import FILLS
from ppi_med.ppi.masks import MASKS
from ppi_med.ppi.objective import GUIDES, MODES, PARTNERS
from ppi_med.ppi.variants import parse_value, split_fields
from ppi_med.robust import SELECTIONS, RobustConfig
from ppi_med.saliency import METHODS
from ppi_med.tracking import metric_key

from .formatting import p_value
from .portable import portable_text

__all__ = [
    "GRIDS",
    "METHOD_FORM",
    "TEST_SETS",
    "ShortcutConfig",
    "ShortcutData",
    "digit_cnn",
    "grid_methods",
    "make_data",
    "method_config",
    "method_label",
    "parse_fields",
    "plot_epochs",
    "run_benchmark",
    "summarise",
    "train_and_score",
    "main",
]

TEST_SETS = ("aligned", "reversed", "free")


class ShortcutError(ValueError):
    """A benchmark setting that cannot run, named with the offending value."""


@dataclass
class ShortcutConfig:
    """What one benchmark run measures.

    Attributes:
        cue: kind of spurious cue, one of :data:`ppi_med.cues.CUE_KINDS`.
        strength: cue amplitude as a fraction of the image's intensity range.
        train_p_pos, train_p_neg: share of positive / negative training digits that carry the cue.
        methods: method specs (see the module docstring); kept as their labels (:func:`method_label`), the
            baseline first when not listed.
        seeds: seeds 0 .. seeds-1.
        epochs, batch_size, learning_rate: the training recipe (Adam).
        width: channels of the CNN's first layer (then 2x, 4x).
        norm: ``none`` or ``batch`` (batch norm after each convolution).
        ppi_base: fields applied to every PPI method before its own (e.g. a common warm-up).
        outline_share: share of training digits (per class) whose outline, the digit's own strokes, the PPI
            step may use (the ``annotation`` and ``study`` guides); 0: none, as for most real data.
        selection: which epoch's model is scored: ``train`` (best AUC on validation digits with the cue as in
            training), ``worst_site`` (best worst-class accuracy there: no cue labels), ``oracle`` (best AUC on
            validation digits with the cue reversed) or ``last`` (the last epoch). Every method chooses among the
            same epochs, from JTT's restart on (``epochs // 4 + 1``).
    """

    cue: str = "patch"
    strength: float = 1.0
    train_p_pos: float = 0.95
    train_p_neg: float = 0.05
    methods: list[str] = field(default_factory=lambda: list(GRIDS["default"]))
    seeds: int = 5
    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    width: int = 16
    norm: str = "none"
    ppi_base: dict[str, Any] = field(default_factory=dict)
    outline_share: float = 0.0
    selection: str = "train"

    def __post_init__(self) -> None:
        if self.selection not in (*SELECTIONS, "last"):
            raise ShortcutError(f"selection must be one of {', '.join((*SELECTIONS, 'last'))}, got '{self.selection}'")
        if not 0.0 <= self.outline_share <= 1.0:
            raise ShortcutError(f"outline_share must lie in [0, 1], got {self.outline_share}")
        if self.cue not in CUE_KINDS:
            raise ShortcutError(f"unknown cue '{self.cue}'; choose one of {', '.join(CUE_KINDS)}")
        if self.norm not in ("none", "batch"):
            raise ShortcutError(f"norm must be 'none' or 'batch', got '{self.norm}'")
        if self.seeds < 1 or self.epochs < 1:
            raise ShortcutError(f"seeds and epochs must be >= 1, got {self.seeds} and {self.epochs}")
        specs = self.methods if "baseline" in self.methods else ["baseline", *self.methods]
        labels: dict[str, str] = {}
        for spec in specs:  # every spec checked and named before any training
            label = method_label(spec, self.ppi_base)
            if label in labels:
                raise ShortcutError(f"methods '{labels[label]}' and '{spec}' are one configuration ({label})")
            labels[label] = spec
        self.methods = list(labels)

    @property
    def first_selectable(self) -> int:
        """The first epoch whose model may be chosen (JTT's second stage starts after ``epochs // 4``)."""
        return self.epochs // 4 + 1


def grid_methods(name: str) -> list[str]:
    """The method specs of a prepared grid.

    Raises:
        ShortcutError: an unknown grid name.
    """
    if name not in GRIDS:
        raise ShortcutError(f"unknown grid '{name}'; choose one of {', '.join(GRIDS)}")
    return list(GRIDS[name])


def parse_fields(text: str, where: str = "--ppi-base") -> dict[str, Any]:
    """``field=value,...`` as a dict of :class:`PPIConfig` fields, values read by each field's type
    (:func:`ppi_med.ppi.variants.parse_value`).

    Raises:
        ShortcutError: an item that is not ``<field>=<value>`` with a PPIConfig field and a value of its type.
    """
    out: dict[str, Any] = {}
    for item in split_fields(text):
        key, eq, value = item.partition("=")
        if not eq:
            raise ShortcutError(f"{where}: '{item}' is not <field>=<value> with a PPIConfig field")
        try:
            out[key.strip()] = parse_value(key.strip(), value)
        except VariantError as err:
            raise ShortcutError(f"{where}: {err}") from None
    return out


def _split(spec: str) -> tuple[str, str]:
    try:
        return split_comparator(spec)
    except ValueError as err:
        raise ShortcutError(str(err)) from None


def robust_config(spec: str, epochs: int) -> RobustConfig:
    """The comparator a spec names, with JTT's first stage a quarter of the ``epochs`` (as in the GA bundle)."""
    return RobustConfig(method=_split(spec)[1], jtt_epochs=max(1, epochs // 4))


def method_config(spec: str, base: dict[str, Any] | None = None) -> PPIConfig:
    """The :class:`PPIConfig` a method spec stands for (its PPI part; a comparator alone trains as the baseline).

    Args:
        spec: a method of :mod:`ppi_med.methods` (module docstring): ``baseline``, ``ppi``,
            ``ppi:<field>=<value>,...``, a control, a comparator, or a variant followed by ``+<comparator>``.
        base: fields applied to every PPI method before the spec's own (a method without PPI ignores them: its
            PPI fields do nothing).

    Raises:
        ShortcutError: an unknown method, field or value.
    """
    ppi_part = _split(spec)[0]
    try:
        cfg = variant(ppi_part, base)
        return cfg if cfg.enabled else variant(ppi_part)
    except VariantError as err:
        raise ShortcutError(str(err)) from None


def method_label(spec: str, base: dict[str, Any] | None = None) -> str:
    """The name a method spec is reported under: its configuration's label on ``base``
    (:func:`ppi_med.ppi.variant_label`), then its comparator (``ppi`` -> ``ppi_wbp``, ``ppi+dfr`` ->
    ``ppi_wbp+dfr``, ``groupdro`` -> ``groupdro``).

    Raises:
        ShortcutError: an unknown method, field or value.
    """
    try:
        label = variant_label(method_config(spec, base), PPIConfig(**(base or {})))
    except (TypeError, ValueError) as err:
        raise ShortcutError(f"--ppi-base {base}: {err}") from None
    return RobustConfig(method=_split(spec)[1]).method_name(label)


#: the method's own formulation: partner = the batch rolled by one, x* loses the whole salient region, no warm-up
METHOD_FORM = "ppi:guide=partner,partner=roll,exclusive=False,warmup_epochs=0,fill=zero"
#: the project's default before the guides (same-class partner, exclusive negative contrast)
PARTNER_FORM = "ppi:guide=partner,fill=zero"


def _and(spec: str, extra: str) -> str:
    """``spec`` with the fields of ``extra`` (``<field>=<value>,...``), which replace its own of the same name."""
    name, _, rest = spec.partition(":")
    items = dict(item.split("=", 1) for item in split_fields(rest))
    items.update(item.split("=", 1) for item in split_fields(extra))
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in items.items())


def _distinct(specs: Sequence[str]) -> list[str]:
    """Each configuration of ``specs`` once, under its first spec."""
    first: dict[str, str] = {}
    for spec in specs:
        first.setdefault(method_label(spec), spec)
    return list(first.values())


GRIDS: dict[str, list[str]] = {
    "default": ["baseline", "ppi", METHOD_FORM, PARTNER_FORM, "random_mask", "random_erasing"],
    # the established fixes beside PPI (docs/DESIGN.md section 9)
    "comparators": ["baseline", "ppi", "groupdro", "jtt", "dfr", "ppi+dfr", "random_mask", "random_erasing"],
    # one change at a time away from the default
    "ablation": ["baseline", "ppi"]
    + [f"ppi:{c}" for c in ("guide=own", "guide=partner", "fill=mean", "fill=blur", "mode=detached", "ramp_epochs=3")]
    + ["random_mask"],
    # the guides, with outlines on every training digit (--outline-share 1) the annotation guide's effect
    "guide": ["baseline"] + [f"ppi:guide={g}" for g in GUIDES if g != "site"],
    "fill": ["baseline"] + [f"ppi:fill={f}" for f in FILLS],
    "saliency": ["baseline"] + [f"ppi:saliency={m}" for m in METHODS],
    "mode": ["baseline"] + [f"ppi:mode={m}" for m in MODES],
    "mask": ["baseline"] + [f"ppi:mask={m}" for m in MASKS],
    "partner": ["baseline"] + [_and(PARTNER_FORM, f"partner={p}") for p in PARTNERS],
}
# what was tried on the way to the partner form (the default before the guides): one ingredient removed at a time,
# other masks and thresholds, the adversarial term alone, heavier adversarial weight, the regulariser off,
# magnitude masks and wider dilation
GRIDS["attempts"] = (
    ["baseline", METHOD_FORM, PARTNER_FORM]
    + [_and(PARTNER_FORM, c) for c in ("partner=roll", "exclusive=False", "mode=detached", "warmup_epochs=0")]
    + [_and(METHOD_FORM, c) for c in ("w_con=0", "w_con=0,partner=same_class", "mask=soft_adaptive", "sigma=0.1")]
    + [_and(METHOD_FORM, c) for c in ("mask=hard,k_std=2", "w_con=0.25,w_ad=2,partner=same_class")]
    + [_and(PARTNER_FORM, c) for c in ("w_reg=0", "mask=soft_adaptive", "w_ad=2", "absolute=True", "dilate=2")]
)
# every saliency method, mode, mask and partner, each distinct configuration once
GRIDS["full"] = _distinct([m for name in ("default", "saliency", "mode", "mask", "partner") for m in GRIDS[name]])


def digit_cnn(width: int = 16, norm: str = "none", num_classes: int = 2) -> nn.Module:
    """A small ReLU CNN for 20 x 20 single-channel images (every layer one WBP has a rule for)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
        if norm == "batch":
            layers.append(nn.BatchNorm2d(cout))
        return [*layers, nn.ReLU()]

    return nn.Sequential(
        *block(1, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


@dataclass
class ShortcutData:
    """Images ``(N, 1, 20, 20)`` in ``[0, 1]`` and labels of one seed's split, with the cue applied."""

    train: tuple[torch.Tensor, torch.Tensor]
    #: ``val_aligned`` (the training correlation), ``val_reversed``, ``val_free``, ``aligned``, ``reversed``, ``free``
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]]
    cue_masks: dict[str, np.ndarray]
    #: the training digits' strokes ``(N, 1, 20, 20)`` and which of them count as outlined
    train_outline: torch.Tensor | None = None
    train_outlined: torch.Tensor | None = None


class _Records(torch.utils.data.Dataset):
    """The training digits as dict records, the form the PPI step reads outlines from."""

    def __init__(self, data: ShortcutData) -> None:
        self.x, self.y = data.train
        n = self.y.shape[0]
        self.outline = data.train_outline if data.train_outline is not None else torch.zeros_like(self.x)
        self.outlined = data.train_outlined if data.train_outlined is not None else torch.zeros(n, dtype=torch.bool)
        # the comparators' groups: label x cue, both known for the training digits
        self.groups = [f"cue{int(f)}/{int(y)}" for f, y in zip(data.cue_masks["train"], self.y.tolist())]

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": self.x[i],
            "label": self.y[i],
            "annotation": self.outline[i],
            "annotated": self.outlined[i],
            "case": str(i),
            "group": self.groups[i],
        }


class _Plain(torch.utils.data.Dataset):
    """A set of digits as ``image``, ``label``, ``case`` and ``group`` (label x cue) records."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, flags: np.ndarray) -> None:
        self.x, self.y, self.flags = x, y, flags

    def __len__(self) -> int:
        return self.y.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        y = int(self.y[i])
        return {"image": self.x[i], "label": self.y[i], "case": str(i), "group": f"cue{int(self.flags[i])}/{y}"}


@functools.lru_cache(maxsize=1)
def _digit_canvas() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    img = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    img = torch.nn.functional.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)
    canvas = torch.zeros(img.shape[0], 1, 20, 20)
    canvas[:, :, 2:18, 2:18] = img
    return canvas, (digits.target >= 5).astype(np.int64)


def make_data(cfg: ShortcutConfig, seed: int, val_fraction: float = 0.2, test_fraction: float = 0.3) -> ShortcutData:
    """One seed's split of the digits (stratified), with the cue drawn into each set.

    The validation digits give ``val_aligned`` (the training correlation: ``train`` and ``worst_site``
    selection, DFR's held-out set), ``val_reversed`` (``oracle`` selection) and ``val_free``, for choosing
    without looking at the test digits.

    Args:
        cfg: the benchmark settings (cue kind, strength, training correlation).
        seed: fixes the split and which images carry the cue.
        val_fraction, test_fraction: shares of all digits held out for validation and test.
    """
    from sklearn.model_selection import train_test_split

    images, labels = _digit_canvas()
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels))
    idx_train, idx_rest = train_test_split(
        idx, test_size=val_fraction + test_fraction, stratify=labels, random_state=seed
    )
    idx_val, idx_test = train_test_split(
        idx_rest, test_size=test_fraction / (val_fraction + test_fraction), stratify=labels[idx_rest], random_state=seed
    )
    cue = SpuriousCue(cfg.cue, cfg.strength)
    aligned, reversed_, free = (cfg.train_p_pos, cfg.train_p_neg), (cfg.train_p_neg, cfg.train_p_pos), (0.0, 0.0)
    plan = {
        "train": (idx_train, aligned),
        "val_reversed": (idx_val, reversed_),
        "val_free": (idx_val, free),
        "aligned": (idx_test, aligned),
        "reversed": (idx_test, reversed_),
        "free": (idx_test, free),
    }
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    masks: dict[str, np.ndarray] = {}
    for name, (part, (p_pos, p_neg)) in plan.items():
        y = labels[part]
        flags = cue_flags(y, p_pos, p_neg, rng)
        x = images[part].clone()
        for k in np.flatnonzero(flags):
            x[k] = cue(x[k])
        sets[name] = (x, torch.as_tensor(y))
        masks[name] = flags
    # drawn apart, so that the sets above stay those of every earlier benchmark
    val_rng = np.random.default_rng([seed, 2])
    flags = cue_flags(labels[idx_val], cfg.train_p_pos, cfg.train_p_neg, val_rng)
    x = images[idx_val].clone()
    for k in np.flatnonzero(flags):
        x[k] = cue(x[k])
    sets["val_aligned"], masks["val_aligned"] = (x, torch.as_tensor(labels[idx_val])), flags
    train = sets.pop("train")
    # the digit's strokes are its evidence; a seeded share per class counts as outlined
    outline = (images[idx_train] > 0.15).float()
    keep = choose_outlined(labels[idx_train], cfg.outline_share, np.random.default_rng([seed, 1]))
    outlined = torch.as_tensor(keep)
    return ShortcutData(train=train, tests=sets, cue_masks=masks, train_outline=outline, train_outlined=outlined)


def _scores(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[:, 1].numpy()


def _selection_score(model: nn.Module, selection: str, data: ShortcutData) -> float:
    """What a selection rule maximises on the validation digits."""
    from sklearn.metrics import roc_auc_score

    from ppi_med.robust import worst_group_accuracy

    x, y = data.tests["val_reversed" if selection == "oracle" else "val_aligned"]
    p = _scores(model, x)
    if selection == "worst_site":  # no cue labels: the worse of the two classes
        labels = y.numpy().tolist()
        return worst_group_accuracy((p > 0.5).astype(int).tolist(), labels, [str(v) for v in labels])
    return float(roc_auc_score(y.numpy(), p))


class _BestEpoch:
    """Keeps the weights of the epoch the selection rule scores best, from ``first`` on; loads them at the end.

    With ``history`` it also appends one row an epoch: the AUC on every test set and the selection score, so
    the curves show which epochs a rule could choose from and what it gave up (``epochs.csv``).
    """

    def __init__(
        self, model: nn.Module, cfg: ShortcutConfig, data: ShortcutData, history: list[dict] | None = None
    ) -> None:
        self.model, self.cfg, self.data, self.history = model, cfg, data, history
        self._first_row = len(history) if history is not None else 0  # a shared list may hold earlier runs
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if self.cfg.selection != "last" or self.history is not None:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        if self.cfg.selection != "last":
            engine.add_event_handler(Events.COMPLETED, self._load)
        if self.history is not None:
            engine.add_event_handler(Events.COMPLETED, self._mark_chosen)

    def _epoch(self, engine: Any) -> None:
        from sklearn.metrics import roc_auc_score

        epoch = engine.state.epoch
        selectable = self.cfg.selection != "last" and epoch >= self.cfg.first_selectable
        score = _selection_score(self.model, self.cfg.selection, self.data) if selectable else float("nan")
        if self.history is not None:
            row: dict[str, Any] = {"epoch": epoch, "selection_score": score}
            for name, (x, y) in self.data.tests.items():
                row[f"{name}_auc"] = float(roc_auc_score(y.numpy(), _scores(self.model, x)))
            self.history.append(row)
        self.model.train()
        if selectable and (self.best is None or score > self.best[0]):
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best = (score, epoch, state)

    def _load(self, engine: Any) -> None:
        if self.best is not None:
            self.model.load_state_dict(self.best[2])

    def _mark_chosen(self, engine: Any) -> None:
        chosen = self.best[1] if self.best is not None else engine.state.epoch
        for row in self.history[self._first_row :]:
            row["chosen"] = row["epoch"] == chosen


def train_and_score(
    cfg: ShortcutConfig,
    spec: str,
    seed: int,
    data: ShortcutData,
    work_dir: str | Path | None = None,
    history: list[dict] | None = None,
) -> tuple[nn.Module, dict[str, dict[str, float]], float]:
    """Train one method for one seed with MONAI's trainer and score it on every test set.

    The comparators run as in the bundles: GroupDRO and JTT through the iteration's loss (groups: label x cue),
    JTT's restart and DFR's last-layer refit (on ``val_aligned``, balanced over label x cue, after the
    selection) as handlers.

    Args:
        work_dir: where JTT writes its error set (a temporary folder when ``None``).
        history: a list that gets one row an epoch (``epoch``, ``selection_score``, ``<test set>_auc``,
            ``chosen``); the per-epoch scoring is left out when ``None``.

    Returns:
        The trained model, ``{test set: {"auc": ..., "acc": ...}}`` and the training time in seconds.
    """
    import tempfile

    from monai.engines import SupervisedTrainer
    from monai.utils import set_determinism
    from sklearn.metrics import roc_auc_score

    from ppi_med.engine import PPIIteration
    from ppi_med.robust import JTT, DFRHandler, JTTHandler, RobustLoss

    set_determinism(seed=seed)
    model = digit_cnn(cfg.width, cfg.norm)
    records = _Records(data)
    loader = torch.utils.data.DataLoader(
        records, batch_size=cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    robust = robust_config(spec, cfg.epochs)
    jtt = JTT(robust.upweight)
    loss = RobustLoss(robust, [{"group": g} for g in records.groups], jtt)
    with tempfile.TemporaryDirectory() as tmp:
        handlers: list[Any] = []
        if robust.method == "jtt":
            plain = _Plain(*data.train, data.cue_masks["train"])
            handlers.append(
                JTTHandler(
                    jtt,
                    model,
                    optimizer,
                    torch.utils.data.DataLoader(plain, batch_size=256),
                    robust.jtt_epochs,
                    Path(work_dir) if work_dir else tmp,
                )
            )
        handlers.append(_BestEpoch(model, cfg, data, history))
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=cfg.epochs,
            train_data_loader=loader,
            network=model,
            optimizer=optimizer,
            loss_function=nn.CrossEntropyLoss(),
            iteration_update=PPIIteration(method_config(spec, cfg.ppi_base), robust=loss),
            train_handlers=handlers,
            decollate=False,
        )
        start = time.perf_counter()
        trainer.run()
        if robust.method == "dfr":
            held = _Plain(*data.tests["val_aligned"], data.cue_masks["val_aligned"])
            DFRHandler(
                model,
                torch.utils.data.DataLoader(held, batch_size=256),
                None,
                None,
                robust.dfr_c,
                robust.dfr_draws,
                seed,
            )()
        seconds = time.perf_counter() - start
    scores = {}
    for name, (xt, yt) in data.tests.items():
        p = _scores(model, xt)
        scores[name] = {"auc": float(roc_auc_score(yt.numpy(), p)), "acc": float(((p > 0.5) == yt.numpy()).mean())}
    scores["aligned"]["cue_share"] = cue_saliency_share(model, cfg, data)
    return model, scores, seconds


def cue_saliency_share(model: nn.Module, cfg: ShortcutConfig, data: ShortcutData) -> float:
    """Share of the positive class's |WBP| that falls on the cue, over the cue-carrying positive test digits
    of the aligned set (NaN for the global cue kinds, which cover the whole image)."""
    from ppi_med.saliency import wbp

    x, y = data.tests["aligned"]
    region = SpuriousCue(cfg.cue, cfg.strength).region(x.shape[1:])
    pick = torch.as_tensor(data.cue_masks["aligned"]) & (y == 1)
    if region is None or not bool(pick.any()):
        return float("nan")
    model.eval()
    s = wbp(model, x[pick], 1).abs()
    return float((s[:, region].sum(dim=1) / s.flatten(1).sum(dim=1).clamp_min(1e-12)).mean())


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and the paired t-test against the baseline of every method's AUC and accuracy per test set.

    Args:
        results: one row per (method, seed, test) with ``auc`` and ``acc``.

    Returns:
        One row per method: ``<test>_auc_mean``, ``<test>_auc_sd``, ``<test>_acc_mean``,
        ``<test>_auc_delta`` (mean paired difference to the baseline) and ``<test>_auc_p`` (two-sided paired
        t-test across seeds; NaN for the baseline or with fewer than two seeds).
    """
    from scipy.stats import ttest_rel

    rows = []
    wide = results.pivot_table(index=["method", "seed"], columns="test", values=["auc", "acc"])
    base = wide.loc["baseline"]
    for method in dict.fromkeys(results["method"]):
        sub = wide.loc[method]
        row: dict[str, Any] = {"method": method, "seeds": len(sub)}
        row["cue_share_mean"] = results.loc[results["method"] == method, "cue_share"].mean()
        for test in TEST_SETS:
            auc = sub[("auc", test)]
            row[f"{test}_auc_mean"] = auc.mean()
            row[f"{test}_auc_sd"] = auc.std(ddof=1) if len(auc) > 1 else float("nan")
            row[f"{test}_acc_mean"] = sub[("acc", test)].mean()
            paired = base[("auc", test)].reindex(auc.index)
            diff = auc - paired
            row[f"{test}_auc_delta"] = diff.mean()
            if method == "baseline" or len(diff) < 2:
                row[f"{test}_auc_p"] = float("nan")
            elif np.allclose(diff, diff.iloc[0]):
                row[f"{test}_auc_p"] = 0.0 if diff.iloc[0] != 0 else 1.0
            else:
                row[f"{test}_auc_p"] = float(ttest_rel(auc, paired).pvalue)
        rows.append(row)
    return pd.DataFrame(rows)


def _metric_name(spec: str) -> str:
    """A method label as MLflow accepts it in a metric name (``ppi_wbp:contrast_classes=[1]`` has brackets)."""
    return metric_key(spec.replace(":", "_").replace("=", "-").replace(",", "_"))


def summary_markdown(summary: pd.DataFrame, cfg: ShortcutConfig) -> str:
    """The summary as a Markdown table with a header saying what was measured."""
    lines = [
        f"Cue `{cfg.cue}` (strength {cfg.strength}) in {cfg.train_p_pos:.0%} of positive and "
        f"{cfg.train_p_neg:.0%} of negative training digits; {cfg.seeds} seeds, {cfg.epochs} epochs, "
        f"model selection `{cfg.selection}`"
        + (" (an oracle: chosen on validation digits with the cue reversed)" if cfg.selection == "oracle" else "")
        + ". "
        "AUC mean +- sd over seeds; p: paired t-test against the baseline across seeds; WBP share on cue: the "
        "share of the positive class's |WBP| that falls on the cue in cue-carrying positive test digits.",
        "",
        "| method | aligned AUC | reversed AUC | cue-free AUC | reversed acc | cue-free acc "
        "| reversed delta | p (reversed) | cue-free delta | p (cue-free) | WBP share on cue |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for _, r in summary.iterrows():
        cells = [f"`{r['method']}`"]
        for test in TEST_SETS:
            sd = r[f"{test}_auc_sd"]  # none with one seed
            cells.append(f"{r[f'{test}_auc_mean']:.3f}" + ("" if math.isnan(sd) else f" +- {sd:.3f}"))
        cells += [f"{r['reversed_acc_mean']:.3f}", f"{r['free_acc_mean']:.3f}"]
        cells += [f"{r['reversed_auc_delta']:+.3f}", p_value(r["reversed_auc_p"])]
        cells += [f"{r['free_auc_delta']:+.3f}", p_value(r["free_auc_p"])]
        cells.append("-" if math.isnan(r["cue_share_mean"]) else f"{r['cue_share_mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: pd.DataFrame, cfg: ShortcutConfig, path: Path) -> Path:
    """Reversed-cue and cue-free AUC per method, one dot per seed and the mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(results["method"]))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.1 * len(methods) + 3), 4), sharey=True)
    for ax, test in zip(axes, ("reversed", "free")):
        sub = results[results["test"] == test]
        for k, method in enumerate(methods):
            vals = sub[sub["method"] == method]["auc"].to_numpy()
            ax.bar(k, vals.mean(), color="tab:gray" if method == "baseline" else "tab:blue", alpha=0.5)
            ax.scatter(np.full(len(vals), k), vals, color="black", s=12, zorder=3)
        ax.axhline(0.5, color="tab:red", lw=0.8, ls="--")
        ax.set_xticks(range(len(methods)), methods, rotation=40, ha="right", fontsize=8)
        ax.set_title({"reversed": "cue reversed", "free": "cue-free"}[test])
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("AUC")
    fig.suptitle(f"digits >= 5, cue '{cfg.cue}' in training ({cfg.seeds} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_curves(client: Any, run_id: str, history: Sequence[dict]) -> None:
    """Each epoch's test-set AUCs and selection score as MLflow metrics with the epoch as step."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"epoch_{k}", float(v), now, int(row["epoch"]))
        for row in history
        for k, v in row.items()
        if k not in ("epoch", "chosen") and math.isfinite(float(v))
    ]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def plot_epochs(curves: pd.DataFrame, cfg: ShortcutConfig, path: Path) -> Path:
    """Per epoch, mean over seeds: the AUC the selection rule reads and the reversed-cue test AUC, each
    seed's chosen epoch marked; where they part, the rule picks a model that still reads the cue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    read = {"oracle": "val_reversed", "worst_site": "val_aligned"}.get(cfg.selection, "val_aligned")
    panels = [(f"{read}_auc", f"validation ({read.split('_')[1]} cue)"), ("reversed_auc", "test, cue reversed")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for k, method in enumerate(dict.fromkeys(curves["method"])):
        sub = curves[curves["method"] == method]
        colour = "tab:gray" if method == "baseline" else f"C{k % 10}"
        for ax, (column, _) in zip(axes, panels):
            mean = sub.groupby("epoch")[column].mean()
            ax.plot(mean.index, mean.to_numpy(), color=colour, label=method)
            chosen = sub[sub["chosen"].astype(bool)]
            ax.scatter(chosen["epoch"], chosen[column], color=colour, s=18, zorder=3, edgecolor="black", lw=0.5)
    for ax, (_, title) in zip(axes, panels):
        ax.axvline(cfg.first_selectable - 0.5, color="black", lw=0.8, ls=":")
        ax.axhline(0.5, color="tab:red", lw=0.8, ls="--")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("AUC, mean over seeds")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"digits >= 5, cue '{cfg.cue}', selection '{cfg.selection}'; dots: each seed's chosen epoch, "
        "dotted line: the first epoch that may be chosen",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_examples(models: dict[str, nn.Module], data: ShortcutData, path: Path, n: int = 4) -> Path:
    """Cue-carrying positive test digits and each method's WBP saliency of the positive class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppi_med.saliency import compute

    x, y = data.tests["aligned"]
    pick = np.flatnonzero(data.cue_masks["aligned"] & (y.numpy() == 1))[:n]
    fig, axes = plt.subplots(len(pick), 1 + len(models), figsize=(1.6 * (1 + len(models)), 1.6 * len(pick)))
    axes = np.atleast_2d(axes)
    for r, k in enumerate(pick):
        axes[r, 0].imshow(x[k, 0].numpy(), cmap="gray")
        for c, (method, model) in enumerate(models.items(), start=1):
            model.eval()
            s = compute("wbp", model, x[k : k + 1], 1)[0, 0]
            lim = float(s.abs().max()) or 1.0
            axes[r, c].imshow(s.numpy(), cmap="bwr", vmin=-lim, vmax=lim)
            if r == 0:
                axes[r, c].set_title(method.replace(",", ",\n"), fontsize=6)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_benchmark(
    cfg: ShortcutConfig, out_dir: str | Path, tracking_uri: str | None = None, experiment: str = "shortcut"
) -> pd.DataFrame:
    """Train every method for every seed, write the tables and figures, log everything to MLflow.

    Args:
        cfg: what to measure.
        out_dir: a new or empty folder for the outputs.
        tracking_uri: MLflow store (default: ``mlflow.db`` in the working folder).
        experiment: MLflow experiment name.

    Returns:
        The summary table (one row per method).

    Raises:
        ShortcutError: ``out_dir`` already holds results (nothing is overwritten).
    """
    from mlflow import MlflowClient

    from ppi_med.tracking import default_tracking_uri, ensure_experiment, flatten_params, git_commit, log_batch

    out = Path(out_dir)
    if (out / "results.csv").exists():
        raise ShortcutError(f"{out} already holds a benchmark's results; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    # an explicit client: mlflow's fluent API would change the process-wide tracking URI for whatever runs next
    client = MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())
    exp_id = ensure_experiment(client, experiment)
    settings = {k: v for k, v in asdict(cfg).items() if k != "methods"}
    parent = client.create_run(
        exp_id,
        run_name=f"shortcut-{cfg.cue}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"git_commit": git_commit(Path(__file__).parent), "cue": cfg.cue},
    ).info.run_id
    status = "FAILED"
    try:
        log_batch(client, parent, params=flatten_params(settings))
        rows: list[dict[str, Any]] = []
        epochs: list[dict[str, Any]] = []
        example_models: dict[str, nn.Module] = {}
        example_data: ShortcutData | None = None
        bar = tqdm(total=cfg.seeds * len(cfg.methods), desc=f"shortcut[{cfg.cue}]", unit="model")
        for seed in range(cfg.seeds):
            data = make_data(cfg, seed)  # every method of a seed sees the same images
            for spec in cfg.methods:
                history: list[dict] = []
                model, scores, seconds = train_and_score(
                    cfg, spec, seed, data, out / "jtt" / f"{_metric_name(spec)}-s{seed}", history
                )
                epochs += [{"method": spec, "seed": seed, **row} for row in history]
                bar.update()
                if seed == 0:
                    example_models[spec], example_data = model, data
                share = scores["aligned"].pop("cue_share")
                metrics = {f"{test}_{k}": v for test, d in scores.items() for k, v in d.items()}
                if math.isfinite(share):
                    metrics["cue_saliency_share"] = share
                tags = {"mlflow.parentRunId": parent, "method": spec, "seed": str(seed), "cue": cfg.cue}
                child = client.create_run(exp_id, run_name=f"{spec}-s{seed}", tags=tags).info.run_id
                ppi = method_config(spec, cfg.ppi_base).to_dict()
                robust = robust_config(spec, cfg.epochs).to_dict()
                metrics["train_seconds"] = seconds
                params = {"method": spec, "seed": seed, "selection": cfg.selection, "ppi": ppi, "robust": robust}
                log_batch(client, child, flatten_params(params), metrics)
                _log_curves(client, child, history)
                client.set_terminated(child)
                for test, d in scores.items():
                    rows.append(
                        {"method": spec, "seed": seed, "test": test, **d, "cue_share": share, "train_seconds": seconds}
                    )
        bar.close()
        results = pd.DataFrame(rows)
        summary = summarise(results)
        results.to_csv(out / "results.csv", index=False)
        summary.to_csv(out / "summary.csv", index=False)
        (out / "summary.md").write_text(summary_markdown(summary, cfg))
        (out / "settings.json").write_text(json.dumps(asdict(cfg), indent=2))
        plot_results(results, cfg, out / "shortcut_auc.png")
        curves = pd.DataFrame(epochs)
        curves.to_csv(out / "epochs.csv", index=False)
        plot_epochs(curves, cfg, out / "epochs.png")
        if example_data is not None:
            plot_examples(example_models, example_data, out / "examples.png")
        deltas = {
            "reversed_auc_delta." + _metric_name(r["method"]): r["reversed_auc_delta"]
            for _, r in summary[summary["method"] != "baseline"].iterrows()
        }
        log_batch(client, parent, metrics=deltas)
        client.log_artifacts(parent, str(out))
        status = "FINISHED"
    finally:
        client.set_terminated(parent, status=status)
    print(f"MLflow parent run {parent} in experiment '{experiment}'")
    return summary


def write_report(summaries: dict[str, pd.DataFrame], cfgs: dict[str, ShortcutConfig], out: Path, command: str) -> Path:
    """``report.md``: every cue kind's table and figure, the command and the commit that produced them."""
    from ppi_med.tracking import git_commit

    lines = [
        "# Shortcut benchmark",
        "",
        f"Produced by `{portable_text(command, out)}` at commit `{git_commit(Path(__file__).parent)}` "
        f"on {time.strftime('%Y-%m-%d')}. Digits >= 5 vs < 5 (scikit-learn's handwritten digits), "
        "a small ReLU CNN trained with MONAI's SupervisedTrainer and the PPI iteration of the bundles. "
        f"Methods: `ppi_wbp` is the project's default `PPIConfig()`; `{method_label(METHOD_FORM)}` "
        f"(`{METHOD_FORM}`) is the method's own form; every other label names the fields in which a method differs "
        "from the default (or from `--ppi-base`).",
        "",
    ]
    for cue, summary in summaries.items():
        lines += [f"## Cue: {cue}", "", summary_markdown(summary, cfgs[cue]), f"![{cue}]({cue}/shortcut_auc.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def publish(out: Path, cues: Sequence[str], target: Path) -> None:
    """Copy the report and its figures into ``target`` (e.g. ``docs/shortcut``), replacing an older copy."""
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "report.md", target / "README.md")
    for cue in cues:
        (target / cue).mkdir(exist_ok=True)
        for name in ("shortcut_auc.png", "epochs.png", "examples.png", "summary.csv"):
            if (out / cue / name).exists():
                shutil.copy2(out / cue / name, target / cue / name)


def _method_list(items: Sequence[str]) -> list[str]:
    """``--methods`` as given, one per argument or comma-separated (``ppi:dilate=2,fill=zero`` stays one)."""
    try:
        return [m for item in items for m in split_methods(item)]
    except ValueError as err:
        raise ShortcutError(f"--methods: {err}") from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.shortcut", description=__doc__.split("\n\n")[0])
    p.add_argument("--cue", default="patch", help=f"cue kind(s), comma-separated: {', '.join(CUE_KINDS)}")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--train-p-pos", type=float, default=0.95)
    p.add_argument("--train-p-neg", type=float, default=0.05)
    p.add_argument("--grid", default="default", choices=sorted(GRIDS))
    p.add_argument(
        "--methods",
        nargs="+",
        help="method specs, comma-separated or one per argument (baseline,ppi,groupdro,jtt,dfr,random_mask); "
        "overrides --grid",
    )
    p.add_argument("--ppi-base", default="", help="PPI fields applied to every PPI method, as field=value,...")
    p.add_argument(
        "--outline-share",
        type=float,
        default=0.0,
        help="share of training digits whose strokes the annotation guide may use (default 0: none)",
    )
    p.add_argument(
        "--selection",
        default="train",
        choices=(*SELECTIONS, "last"),
        help="which epoch's model is scored: train (best AUC on validation digits with the training cue), "
        "worst_site (best worst-class accuracy there), oracle (best AUC with the cue reversed: an oracle) or last "
        "(default: %(default)s)",
    )
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--norm", default="none", choices=("none", "batch"))
    p.add_argument("--out", help="output folder (default runs/shortcut/<time>)")
    p.add_argument("--publish", help="also copy report.md (as README.md) and the figures into this folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db here)")
    p.add_argument("--experiment", default="shortcut")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads (small images gain nothing from more)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.num_threads)
    try:
        base = parse_fields(args.ppi_base)
        cfgs = {
            cue: ShortcutConfig(
                cue=cue,
                strength=args.strength,
                train_p_pos=args.train_p_pos,
                train_p_neg=args.train_p_neg,
                methods=_method_list(args.methods) if args.methods else grid_methods(args.grid),
                seeds=args.seeds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
                width=args.width,
                norm=args.norm,
                ppi_base=base,
                outline_share=args.outline_share,
                selection=args.selection,
            )
            for cue in args.cue.split(",")
        }
        out = Path(args.out or f"runs/shortcut/{time.strftime('%Y%m%d-%H%M%S')}")
        if (out / "report.md").exists():
            raise ShortcutError(f"{out} already holds a benchmark report; choose another --out")
        summaries = {
            cue: run_benchmark(cfg, out / cue, args.tracking_uri, args.experiment) for cue, cfg in cfgs.items()
        }
    except ShortcutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python -m pipelines.shortcut " + " ".join(argv if argv is not None else sys.argv[1:])
    report = write_report(summaries, cfgs, out, command)
    if args.publish:
        publish(out, list(cfgs), Path(args.publish))
    print(report.read_text())
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
