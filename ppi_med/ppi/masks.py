"""Causal masks made from a saliency map (docs/DESIGN.md section 4, appendix 2.6.2 of the method).

Every function takes a batch of maps shaped like the input, ``(N, C, *spatial)`` with 1 to 3 spatial
axes, and returns a mask of the same shape in ``[0, 1]``: 1 where the salient content is removed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "MASKS",
    "normalize",
    "soft_mask",
    "adaptive_sigma",
    "hard_point_mask",
    "box_mask",
    "topk_mask",
    "dilate",
    "make_mask",
]

MASKS = ("soft", "soft_adaptive", "hard", "box", "topk")


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def normalize(s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each sample's map by its largest absolute value, so thresholds mean the same everywhere."""
    scale = _per_sample(s).abs().amax(dim=1).clamp_min(eps)
    return s / _expand(scale, s)


def soft_mask(s: torch.Tensor, omega: float = 100.0, sigma: float | torch.Tensor = 0.25) -> torch.Tensor:
    """Thresholded sigmoid ``T(s) = 1 / (1 + exp(-omega (s - sigma)))`` (equation 2.2); differentiable.

    Args:
        s: normalised saliency.
        omega: sharpness of the 0-to-1 transition.
        sigma: threshold, a float or a per-sample tensor broadcastable to ``s``.
    """
    return torch.sigmoid(omega * (s - sigma))


def adaptive_sigma(s: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """Per-sample threshold ``mean + k std`` of the map, shaped to broadcast against ``s``."""
    flat = _per_sample(s)
    return _expand(flat.mean(dim=1) + k * flat.std(dim=1, unbiased=False), s)


def hard_point_mask(s: torch.Tensor, k: float = 7.0) -> torch.Tensor:
    """Keep the points whose saliency exceeds ``k`` times the sample's standard deviation."""
    std = _per_sample(s).std(dim=1, unbiased=False)
    return (s > _expand(k * std, s)).to(s.dtype)


def box_mask(s: torch.Tensor, k: float = 7.0, half_size_std: float = 1.2, min_coverage: float = 0.9) -> torch.Tensor:
    """A box around the hard points: centred on their centre of mass, half-size ``1.2 std`` per axis.

    The method states that this box holds at least 90 % of the kept points; for spread-out point sets the
    plain ``1.2 std`` box does not, so the box is grown uniformly until it holds ``min_coverage`` of them.

    Args:
        s: normalised saliency ``(N, C, *spatial)``.
        k: the hard-point threshold in standard deviations.
        half_size_std: half-size of the box per axis, in standard deviations of the points' coordinates.
        min_coverage: smallest share of kept points inside the box (0 turns the growth off).

    Returns:
        A 0/1 mask, the same box on every channel; all zeros for a sample without kept points.
    """
    points = hard_point_mask(s, k).amax(dim=1)  # (N, *spatial): a point is kept if any channel is
    mask = torch.zeros_like(points)
    spatial = points.shape[1:]
    for i in range(points.shape[0]):
        coords = torch.nonzero(points[i]).to(s.dtype)
        if coords.numel() == 0:
            continue
        centre = coords.mean(dim=0)
        half = (half_size_std * coords.std(dim=0, unbiased=False)).clamp_min(0.5)
        for _ in range(100):
            inside = ((coords - centre).abs() <= half).all(dim=1).to(s.dtype).mean()
            if inside >= min_coverage:
                break
            half = half * 1.1
        lo = [max(0, math.ceil(float(c - h))) for c, h in zip(centre, half)]
        hi = [min(n, math.floor(float(c + h)) + 1) for c, h, n in zip(centre, half, spatial)]
        mask[(i, *(slice(a, b) for a, b in zip(lo, hi)))] = 1
    return mask.unsqueeze(1).expand_as(s).contiguous()


def topk_mask(s: torch.Tensor, k: int = 1000) -> torch.Tensor:
    """Keep each sample's ``k`` most salient points (all of them if the map is smaller)."""
    flat = _per_sample(s)
    k = min(int(k), flat.shape[1])
    idx = flat.topk(k, dim=1).indices
    mask = torch.zeros_like(flat).scatter_(1, idx, 1.0)
    return mask.reshape(s.shape)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a mask by ``radius`` voxels along every spatial axis (a running maximum; differentiable).

    A salient structure's neighbours carry the same information (a marker's rim, a lesion's border):
    removing only the salient voxels leaves a remnant the network can still read.
    """
    if radius <= 0:
        return mask
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[mask.ndim - 2]
    return pool(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def make_mask(
    kind: str,
    s: torch.Tensor,
    *,
    omega: float = 100.0,
    sigma: float = 0.25,
    adaptive_k: float = 1.0,
    k_std: float = 7.0,
    box_std: float = 1.2,
    topk: int = 1000,
) -> torch.Tensor:
    """The mask of ``kind`` for a normalised map ``s``.

    Args:
        kind: ``soft`` (fixed sigma), ``soft_adaptive`` (sigma = mean + adaptive_k std), ``hard`` (points
            above k_std std), ``box`` (box around those points) or ``topk``.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "soft":
        return soft_mask(s, omega, sigma)
    if kind == "soft_adaptive":
        return soft_mask(s, omega, adaptive_sigma(s, adaptive_k))
    if kind == "hard":
        return hard_point_mask(s, k_std)
    if kind == "box":
        return box_mask(s, k_std, box_std)
    if kind == "topk":
        return topk_mask(s, topk)
    raise ValueError(f"unknown PPI mask '{kind}'; choose one of {', '.join(MASKS)}")
