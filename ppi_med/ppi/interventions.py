"""How a masked region is removed, and the controls that remove regions without saliency.

A pseudo-intervention replaces the masked content of ``x`` by a fill: ``x_int = x - M (x - f)``. A zero
fill (the method's ``x - M x``) carves a hole darker than any tissue, and a network can learn to answer the
hole itself; the other fills put plausible intensity there (docs/DESIGN.md section 4.4).

Controls (section 4.5): :func:`relocate` moves each mask to a random place (same shape and area, PPI
without its saliency), :func:`random_erase` is random erasing as plain augmentation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["FILLS", "fill_values", "intervene", "other_class_donors", "relocate", "random_erase"]

FILLS = ("zero", "mean", "blur", "noise", "other_class")


def _per_sample_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    shape = (x.shape[0], x.shape[1], *([1] * (x.ndim - 2)))
    return flat.mean(dim=2).reshape(shape), flat.std(dim=2, unbiased=False).reshape(shape)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over every spatial axis, ``sigma`` in voxels, reflect-padded."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c = x.shape[:2]
    out = x.reshape(n * c, 1, *x.shape[2:])
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
    for axis in range(x.ndim - 2):
        size = out.shape[2 + axis]
        r = min(radius, size - 1)
        if r < 1:
            continue
        k = kernel[radius - r : radius + r + 1]
        k = k / k.sum()
        shape = [1, 1] + [1] * (x.ndim - 2)
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0] * (x.ndim - 2)
        pad[2 * (x.ndim - 3 - axis)] = pad[2 * (x.ndim - 3 - axis) + 1] = r  # F.pad counts from the last axis
        out = conv(F.pad(out, pad, mode="reflect"), k.reshape(shape))
    return out.reshape(x.shape)


def other_class_donors(y: torch.Tensor) -> torch.Tensor:
    """For each sample, the nearest earlier sample (cyclically) of another label; itself if the batch has one label."""
    labels = y.tolist()
    n = len(labels)
    donors = []
    for i, label in enumerate(labels):
        donor = next((k % n for k in range(i - 1, i - n, -1) if labels[k % n] != label), i)
        donors.append(donor)
    return torch.as_tensor(donors, device=y.device)


def fill_values(
    x: torch.Tensor,
    kind: str = "zero",
    *,
    y: torch.Tensor | None = None,
    blur_sigma: float = 2.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """What a removed region is replaced by, shaped like ``x``.

    Args:
        x: images ``(N, C, *spatial)``.
        kind: ``zero``; ``mean`` (each sample's own mean intensity); ``blur`` (the sample blurred with a
            Gaussian of ``blur_sigma`` voxels: the local brightness stays, the fine structure goes);
            ``noise`` (Gaussian noise with the sample's own mean and standard deviation); ``other_class`` (the
            same voxels of another sample of the batch with another label: a removed lesion becomes tissue of
            an eye without one, at the same place).
        y: labels ``(N,)``, needed by ``other_class``.
        generator: the random source of ``noise``.

    Raises:
        ValueError: an unknown kind, or ``other_class`` without labels.
    """
    if kind == "other_class":
        if y is None:
            raise ValueError("the other_class fill needs the batch's labels")
        return x[other_class_donors(y)]
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return _per_sample_stats(x)[0].expand_as(x)
    if kind == "blur":
        return _gaussian_blur(x, blur_sigma)
    if kind == "noise":
        mean, std = _per_sample_stats(x)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator else x.device)
        return mean + std * noise.to(x.device)
    raise ValueError(f"unknown PPI fill '{kind}'; choose one of {', '.join(FILLS)}")


def intervene(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with the masked content replaced: ``x - mask (x - fill)`` (``fill`` ``None``: zeros)."""
    return x - mask * x if fill is None else x - mask * (x - fill)


def relocate(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample's mask rolled by a random shift along every spatial axis: the same shape and area elsewhere.

    The control "PPI without saliency": if moving the masks to random places trains as well as the saliency's
    own places, the saliency was not what helped. A roll keeps every value (the area is exact), wrapping at
    the borders.
    """
    spatial = mask.shape[2:]
    out = torch.empty_like(mask)
    for i in range(mask.shape[0]):
        shifts = [int(torch.randint(0, n, (1,), generator=generator)) for n in spatial]
        out[i] = torch.roll(mask[i], shifts=shifts, dims=tuple(range(1, mask.ndim - 1)))
    return out


def random_erase(
    x: torch.Tensor,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.33),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random erasing (Zhong et al., AAAI 2020) for images of 1 to 3 spatial axes.

    With probability ``p`` a sample gets one box covering a share of its volume drawn from ``area`` (equal
    sides in relative terms, a random aspect per axis), filled with uniform noise in the sample's own
    intensity range.

    Args:
        x: images ``(N, C, *spatial)``; not modified.
        p: probability that a sample is erased.
        area: range of the erased share of the volume.
        generator: the random source.

    Returns:
        A new tensor.
    """
    out = x.clone()
    spatial = x.shape[2:]
    nd = len(spatial)

    def rand() -> float:
        return float(torch.rand((), generator=generator))

    for i in range(x.shape[0]):
        if rand() >= p:
            continue
        share = area[0] + (area[1] - area[0]) * rand()
        aspect = [math.exp((rand() - 0.5) * math.log(3.0)) for _ in range(nd)]
        scale = (share / math.prod(aspect)) ** (1.0 / nd)
        sides = [max(1, min(n, round(n * scale * a))) for n, a in zip(spatial, aspect)]
        starts = [int(rand() * (n - s + 1)) for n, s in zip(spatial, sides)]
        box = (i, slice(None), *(slice(a, a + s) for a, s in zip(starts, sides)))
        lo, hi = float(x[i].min()), float(x[i].max())
        noise = torch.rand(out[box].shape, generator=generator, dtype=x.dtype)
        out[box] = (lo + (hi - lo) * noise).to(x.device)
    return out
