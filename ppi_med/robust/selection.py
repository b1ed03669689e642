"""Model selection rules: which validation records and which metric choose the checkpoint."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Metric

from .config import SELECTIONS
from .groups import record_group

__all__ = ["WorstGroupAccuracy", "check_selection", "oracle_records", "validation_metrics", "worst_group_accuracy"]


def check_selection(selection: str, oracle_sites: Sequence[str] | str | None = None, where: str | None = None) -> str:
    """``selection`` if valid.

    Args:
        selection: the rule.
        oracle_sites: the sites ``oracle`` validates on.
        where: a study that has no sites (named in the error): ``oracle`` is refused there.

    Raises:
        ValueError: an unknown rule, or ``oracle`` without the sites it validates on.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got '{selection}'")
    if selection == "oracle" and where is not None:
        raise ValueError(f"selection 'oracle' needs sites to validate on; {where} has none (use train or worst_site)")
    if selection == "oracle" and not oracle_sites:
        raise ValueError(
            "selection 'oracle' validates on records where the shortcut does not hold; name them with "
            "oracle_sites (e.g. the site generated with the cue reversed)"
        )
    return selection


def worst_group_accuracy(preds: Sequence[int], labels: Sequence[int], groups: Sequence[str]) -> float:
    """The lowest accuracy over the groups present."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, y, g in zip(preds, labels, groups):
        hits[g][0] += int(int(p) == int(y))
        hits[g][1] += 1
    if not hits:
        raise ValueError("worst-group accuracy of no records")
    return min(c / n for c, n in hits.values())


def _class(value: Any) -> int:
    t = torch.as_tensor(value).reshape(-1)
    return int(t.argmax()) if t.numel() > 1 else int(t.item())


class WorstGroupAccuracy(Metric):
    """Accuracy of the worst (site, label) group of a MONAI evaluator's epoch, for ``worst_site`` selection.

    It needs no cue labels: the groups are the validation records' sites crossed with their labels (with one
    site, the worst class). The sites come from the evaluator's batch (``site``; a record without one counts as
    its label's group), the predictions and labels from its decollated, post-processed output (probabilities
    or logits, one-hot or index labels).
    """

    def reset(self) -> None:
        self._preds: list[int] = []
        self._labels: list[int] = []
        self._groups: list[str] = []

    def update(self, output: Any) -> None:  # fed by iteration_completed, which also sees the batch
        raise NotImplementedError

    def iteration_completed(self, engine: Engine) -> None:
        outputs = engine.state.output
        batch = engine.state.batch
        items = outputs if isinstance(outputs, list) else [outputs]
        records = batch if isinstance(batch, list) else [batch]
        for out, rec in zip(items, records):
            pred, label = _class(out["pred"]), _class(out["label"])
            site = rec.get("site") if isinstance(rec, Mapping) else None
            self._preds.append(pred)
            self._labels.append(label)
            self._groups.append(str(label) if site is None else record_group(site, label))

    def compute(self) -> float:
        return worst_group_accuracy(self._preds, self._labels, self._groups)


def validation_metrics(selection: str) -> tuple[dict[str, Metric], dict[str, Metric]]:
    """The evaluator's key metric (the one that chooses the checkpoint) and its other metrics.

    ``train`` and ``oracle`` choose by ``val_auc`` (on the training distribution's validation part, or on the
    oracle records); ``worst_site`` by ``val_worst_group_acc``. Both are always computed and logged.
    """
    from monai.handlers import ROCAUC, from_engine

    check_selection(selection, oracle_sites="given" if selection == "oracle" else None)
    auc = ROCAUC(output_transform=from_engine(["pred", "label"]))
    worst = WorstGroupAccuracy()
    if selection == "worst_site":
        return {"val_worst_group_acc": worst}, {"val_auc": auc}
    return {"val_auc": auc}, {"val_worst_group_acc": worst}


def oracle_records(
    datalist: str | Path, oracle_sites: Sequence[str] | str | None, seed: int, fraction: float = 0.5
) -> list[dict[str, Any]]:
    """The records that choose the checkpoint under ``oracle`` selection: a seeded, subject-level
    ``fraction`` of the oracle sites (the rest of those sites stays for scoring).

    Raises:
        ValueError: no oracle site named.
    """
    from ..data import ga_split

    check_selection("oracle", oracle_sites)
    return ga_split(datalist, part="val", train_sites=oracle_sites, val_fraction=fraction, seed=seed)
