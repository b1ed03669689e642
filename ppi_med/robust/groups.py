"""Groups of a study: site x label by default, or whatever each record names as its ``group``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform

__all__ = ["CaseIdd", "GroupIndex", "batch_groups", "record_group"]


def record_group(site: Any, label: Any) -> str:
    """The group name of a record of ``site`` with ``label`` (``"A/1"``)."""
    return f"{site}/{int(label)}"


def _labels(label: Any) -> list[int]:
    return [int(v) for v in torch.as_tensor(label).reshape(-1).tolist()]


def batch_groups(batch: Mapping[str, Any], labels: Any | None = None) -> list[str]:
    """Each sample's group in a collated batch: its ``group`` field, else ``site/label``, else ``label``.

    Args:
        batch: a dict batch (as a MONAI data loader yields it).
        labels: the labels to use instead of ``batch["label"]`` (e.g. after ``prepare_batch``).
    """
    if "group" in batch:
        return [str(g) for g in batch["group"]]
    ys = _labels(batch["label"] if labels is None else labels)
    if "site" in batch:
        return [record_group(s, y) for s, y in zip(batch["site"], ys)]
    return [str(y) for y in ys]


class GroupIndex:
    """Group names to indices, fixed from the training records so every step counts the same groups.

    Args:
        names: every group name of the training records, one per record (their counts are kept).

    Raises:
        ValueError: no records.
    """

    def __init__(self, names: Iterable[str]) -> None:
        names = [str(n) for n in names]
        if not names:
            raise ValueError("no training records to form groups from")
        self.names = sorted(set(names))
        self._index = {n: i for i, n in enumerate(self.names)}
        self.counts = torch.tensor([names.count(n) for n in self.names], dtype=torch.float32)

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> GroupIndex:
        """The groups of datalist records (``group``, else ``site/label``, else ``label``)."""
        return cls(
            str(r["group"]) if "group" in r else record_group(r["site"], r["label"]) if "site" in r else str(r["label"])
            for r in records
        )

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, names: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """``(N,)`` indices of ``names``.

        Raises:
            KeyError: a group the training records do not have (named).
        """
        try:
            return torch.tensor([self._index[str(n)] for n in names], dtype=torch.long, device=device)
        except KeyError as err:
            raise KeyError(f"group {err.args[0]!r} is not among the training groups {self.names}") from None


class CaseIdd(MapTransform):
    """Give a record its ``case`` id before its image is loaded: the ``case`` it has, else its image path.

    JTT's error set names records by it. Put it first in a preprocessing chain, while ``image`` is a path.

    Args:
        keys: the key whose value (a path) becomes the id (default ``image``).
        name: the id's key.
    """

    def __init__(self, keys: str = "image", name: str = "case") -> None:
        super().__init__(keys)
        self.name = name

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        if self.name not in d:
            d[self.name] = str(d[self.first_key(d)])
        return d
