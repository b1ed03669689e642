"""Lesion and nodule outlines for the ``annotation`` guide of PPI: which records keep one, and their batch form.

A study rarely has an outline for every record. :func:`keep_outlines` keeps the ``mask`` of a seeded share of
the training records (per label, so the share means the same in both classes) and drops it from the others;
:class:`Outlined` turns whatever a record has after preprocessing into the two fields the PPI step reads:
``annotation`` (the outline on the network's input grid, in ``[0, 1]``) and ``annotated`` (whether the record
has one). A record without an outline gets an all-zero ``annotation`` and ``annotated = False``, so that every
batch collates; all-zero with ``annotated = True`` means "outlined, and no finding".
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["choose_outlined", "keep_outlines", "Outlined"]


def choose_outlined(labels: Sequence[Any], share: float, rng: np.random.Generator) -> np.ndarray:
    """Which entries keep their outline: a random ``share`` of each label's entries, nested across shares.

    Each entry draws one random key; within a label the entries with the smallest keys are kept, so a larger
    share keeps a superset of a smaller one's entries.

    Args:
        labels: one label per entry.
        share: the share kept per label (0 to 1).
        rng: the random source (one ``random`` draw per entry).

    Returns:
        A boolean array, one entry per label.

    Raises:
        ValueError: a share outside [0, 1].
    """
    if not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"the share of records that keep their outline must lie in [0, 1], got {share}")
    labels = np.asarray(labels, dtype=object)
    keys = rng.random(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for label in sorted(set(labels.tolist()), key=str):
        members = np.flatnonzero(labels == label)
        keep[members[np.argsort(keys[members])][: round(float(share) * len(members))]] = True
    return keep


def keep_outlines(
    records: Sequence[Mapping[str, Any]], share: float = 1.0, seed: int = 0, key: str = "mask"
) -> list[dict]:
    """The records, with the outline ``key`` kept on a seeded ``share`` of those that have one, per label.

    Args:
        records: datalist records (not modified).
        share: the share of outlined records, per label, that keep their outline (0 to 1).
        seed: chooses which ones; a larger share keeps a superset of a smaller one's records.
        key: the outline's field.

    Raises:
        ValueError: a share outside [0, 1].
    """
    out = [dict(r) for r in records]
    outlined = [i for i, r in enumerate(out) if r.get(key)]
    keep = choose_outlined([out[i].get("label") for i in outlined], share, np.random.default_rng(seed))
    for i, kept in zip(outlined, keep):
        if not kept:
            del out[i][key]
    return out


class Outlined(MapTransform):
    """Add ``annotation`` and ``annotated`` to a preprocessed record from its (optional) outline.

    Place it after the outline went through the same spatial transforms as the image (loading with
    ``allow_missing_keys``). The outline is clipped to ``[0, 1]`` (an area-resized mask is a coverage map) and
    given one channel; the outline's own key is removed, so records with and without one collate alike.

    Args:
        keys: the outline's key (default ``mask``).
        image_key: the image whose grid an absent outline takes.
        annotation_key, flag_key: the fields written.
    """

    def __init__(
        self,
        keys: KeysCollection = "mask",
        image_key: str = "image",
        annotation_key: str = "annotation",
        flag_key: str = "annotated",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = image_key
        self.annotation_key = annotation_key
        self.flag_key = flag_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        outline = None
        for key in self.key_iterator(d):
            outline = d.pop(key)
        where = getattr(image, "meta", {}).get("filename_or_obj", d.get("subject", "?"))
        if isinstance(outline, str):
            raise ValueError(
                f"record {where}: its outline {outline} was not loaded; load '{self.keys[0]}' before Outlined"
            )
        if outline is None:
            d[self.annotation_key] = torch.zeros((1, *image.shape[1:]), dtype=torch.float32)
            d[self.flag_key] = torch.tensor(False)
            return d
        a = torch.as_tensor(
            np.asarray(outline) if not isinstance(outline, torch.Tensor) else outline.as_subclass(torch.Tensor)
        )
        a = a.float().clamp(0, 1)
        if a.ndim == image.ndim and a.shape[0] > 1:
            a = a.amax(dim=0, keepdim=True)
        if tuple(a.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"outline {tuple(a.shape)} is not on the image's grid {tuple(image.shape)} after preprocessing "
                f"(record {where})"
            )
        d[self.annotation_key] = a
        d[self.flag_key] = torch.tensor(True)
        return d
