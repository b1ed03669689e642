"""Controlled spurious cues: put a shortcut into images on purpose, to measure whether a model takes it.

A cue is an image feature that is not the object of the task but correlates with the label in the
training data: a scanner's watermark, a clinic's burnt-in marker, a different gain. :class:`SpuriousCue`
adds one of four kinds to a channel-first image (2D or 3D):

- ``patch``: a bright square in a corner (a burnt-in marker);
- ``line``: a bright band along the far edge of the last axis (the right edge of a 2D image; a scanner's
  ruler or status bar);
- ``intensity``: a global intensity offset (a different gain/offset of the acquisition);
- ``texture``: a fine stripe pattern over the whole image (a detector's interference pattern).

``strength`` is in units of the image's intensity range. Whether a given image carries the cue is the
caller's choice (see :func:`cue_flags`, which draws it with a chosen probability per class), so the same
code builds the cue-aligned training set, the cue-reversed test set and the cue-free test set.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Transform

__all__ = ["CUE_KINDS", "SpuriousCue", "SpuriousCued", "cue_flags"]

CUE_KINDS = ("patch", "line", "intensity", "texture")


class SpuriousCue(Transform):
    """Add a spurious cue to a channel-first image ``(C, *spatial)``.

    Args:
        kind: one of :data:`CUE_KINDS`.
        strength: the cue's amplitude as a fraction of the image's intensity range (max - min).
        size: side of the ``patch`` in voxels, or width of the ``line``.
        period: period of the ``texture`` stripes in voxels.

    Raises:
        ValueError: an unknown kind, or a non-positive strength, size or period.

    Example:
        >>> img = torch.zeros(1, 16, 16)
        >>> SpuriousCue("patch", strength=1.0, size=3)(img)[0, :3, :3].sum().item()
        9.0
    """

    def __init__(self, kind: str = "patch", strength: float = 1.0, size: int = 3, period: int = 2) -> None:
        if kind not in CUE_KINDS:
            raise ValueError(f"unknown cue kind '{kind}'; choose one of {', '.join(CUE_KINDS)}")
        if strength <= 0 or size < 1 or period < 2:
            raise ValueError(f"cue strength must be > 0, size >= 1 and period >= 2; got {strength}, {size}, {period}")
        self.kind, self.strength, self.size, self.period = kind, float(strength), int(size), int(period)

    def region(self, shape: Sequence[int]) -> torch.Tensor | None:
        """Where the cue goes in an image of ``shape`` ``(C, *spatial)``: a boolean mask, or ``None`` for the
        global kinds (``intensity``, ``texture``), which cover the whole image."""
        if self.kind in ("intensity", "texture"):
            return None
        mask = torch.zeros(tuple(shape), dtype=torch.bool)
        if self.kind == "patch":
            mask[(slice(None), *(slice(0, self.size),) * (len(shape) - 1))] = True
        else:
            mask[..., -self.size :] = True
        return mask

    def __call__(self, img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        x = torch.as_tensor(img)
        if x.ndim < 3:
            raise ValueError(f"SpuriousCue expects a channel-first image (C, *spatial), got shape {tuple(x.shape)}")
        span = float(x.max() - x.min()) or 1.0
        amp = self.strength * span
        out = x.clone().float()
        region = self.region(x.shape)
        if region is not None:  # patch, line
            out[region] += amp
        elif self.kind == "intensity":
            out += amp
        else:  # texture: stripes along the last axis
            idx = torch.arange(x.shape[-1])
            out += amp * ((idx // (self.period // 2 or 1)) % 2).to(out.dtype)
        out = out.to(x.dtype) if x.is_floating_point() else out
        return out.numpy() if isinstance(img, np.ndarray) else out


class SpuriousCued(MapTransform):
    """Dictionary wrapper of :class:`SpuriousCue`: adds the cue where ``data[flag_key]`` is true.

    Args:
        keys: image keys.
        flag_key: key of a boolean telling whether this record carries the cue.
        allow_missing_keys: as in MONAI's map transforms.
        **kwargs: :class:`SpuriousCue` arguments.
    """

    def __init__(
        self, keys: Sequence[Hashable] | Hashable, flag_key: str = "cue", allow_missing_keys: bool = False, **kwargs
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.flag_key = flag_key
        self.cue = SpuriousCue(**kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if bool(d[self.flag_key]):
            for key in self.key_iterator(d):
                d[key] = self.cue(d[key])
        return d


def cue_flags(labels: Sequence[int] | np.ndarray, p_pos: float, p_neg: float, rng: np.random.Generator) -> np.ndarray:
    """Which images carry the cue: each positive with probability ``p_pos``, each negative with ``p_neg``.

    The counts are exact (``round(p * n)`` of each class, chosen at random), so a small set has the
    correlation it was asked for rather than a draw around it.

    Args:
        labels: binary labels.
        p_pos, p_neg: the share of positives / negatives that carry the cue, in ``[0, 1]``.
        rng: NumPy random generator.

    Raises:
        ValueError: a share outside ``[0, 1]`` or labels other than 0/1.
    """
    y = np.asarray(labels)
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"cue_flags needs binary labels, got values {sorted(set(np.unique(y)))}")
    for name, p in (("p_pos", p_pos), ("p_neg", p_neg)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p}")
    flags = np.zeros(len(y), dtype=bool)
    for cls, p in ((1, p_pos), (0, p_neg)):
        idx = np.flatnonzero(y == cls)
        chosen = rng.choice(idx, size=int(round(p * len(idx))), replace=False)
        flags[chosen] = True
    return flags
