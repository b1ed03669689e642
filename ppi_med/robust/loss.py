"""The training loss of a comparator, bound to each batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .config import RobustConfig
from .groupdro import GroupDRO
from .groups import GroupIndex, batch_groups
from .jtt import JTT

__all__ = ["RobustLoss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RobustLoss:
    """What replaces the trainer's ``loss_function`` as ``L_cls`` for one batch.

    ``groupdro``: :class:`GroupDRO` over the batch's groups; ``jtt``: the mean cross-entropy weighted by
    :class:`JTT` (plain until the error set is known); ``erm`` and ``dfr``: the trainer's own loss (DFR changes
    only the last layer, after training).

    Args:
        config: the comparator's settings.
        records: the training records (GroupDRO's groups and their sizes).
        jtt: the JTT weights its handler fills in (``jtt`` only).
    """

    def __init__(self, config: RobustConfig, records: Sequence[Mapping[str, Any]] = (), jtt: JTT | None = None) -> None:
        self.config = config
        self.dro = None
        if config.method == "groupdro":
            self.dro = GroupDRO(GroupIndex.from_records(list(records)), config.step_size, config.adjustment)
        if config.method == "jtt" and jtt is None:
            raise ValueError("robust method 'jtt' needs the JTT weights its handler fills in")
        self.jtt = jtt if config.method == "jtt" else None

    def for_batch(self, batch: Any, labels: torch.Tensor) -> LossFn | None:
        """The loss for this batch, or ``None`` for the trainer's own.

        Raises:
            ValueError: JTT on a batch without ``case`` ids, GroupDRO on one without groups.
        """
        if self.dro is not None:
            if not isinstance(batch, Mapping):
                raise ValueError("GroupDRO needs dict batches with 'site' (or 'group') and 'label'")
            names = batch_groups(batch, labels)
            return lambda z, t: self.dro.loss(F.cross_entropy(z, t.reshape(-1).long(), reduction="none"), names)
        if self.jtt is not None and self.jtt.active:
            if not isinstance(batch, Mapping) or "case" not in batch:
                raise ValueError("JTT needs each training record's 'case' id in the batch")
            w = self.jtt.weights(list(batch["case"]), labels.device)
            return lambda z, t: (F.cross_entropy(z, t.reshape(-1).long(), reduction="none") * w).sum() / w.sum()
        return None
