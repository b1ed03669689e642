"""PNG montages of a saliency map over its image: a few slices through the saliency peak along every axis."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["peak_index", "montage_slices", "save_montage"]

# a panel's pixel aspect follows the voxel spacing, within these bounds: OCT voxels are ~25x longer between
# B-scans than along depth, which would squash a panel into a line
_ASPECT_BOUNDS = (0.25, 4.0)


def peak_index(saliency: np.ndarray, signed: bool = False) -> tuple[int, ...]:
    """Voxel of the largest saliency (largest absolute value when ``signed``)."""
    values = np.abs(saliency) if signed else saliency
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(values)), saliency.shape))


def montage_slices(peak: int, size: int, n: int = 3) -> list[int]:
    """``n`` distinct slice indices around ``peak`` (always included), a sixth of the axis apart where the axis is
    long enough; the window slides inwards at the ends of the axis. Fewer only when the axis has fewer slices."""
    n = min(n, size)
    step = max(1, size // 6)
    while step > 1 and (n - 1) * step > size - 1:
        step -= 1
    start = min(max(peak - (n // 2) * step, 0), size - 1 - (n - 1) * step)
    picks = [start + i * step for i in range(n)]
    if peak not in picks:  # the peak falls between the picks: put it in place of the nearest one
        nearest = min(range(n), key=lambda i: abs(picks[i] - peak))
        picks[nearest] = peak
    return sorted(set(picks))


def _take(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def save_montage(
    path: str | Path,
    image: np.ndarray,
    saliency: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    signed: bool = False,
    n_slices: int = 3,
    alpha: float = 0.7,
    axis_names: Sequence[str] | None = None,
    display_percentile: float = 99.5,
    dpi: int = 90,
) -> Path:
    """Write a montage: rows = array axes, columns = slices through the saliency peak.

    The image is shown in grey (1-99 percentile window); the saliency as a colour overlay whose opacity grows
    with its value: the positive part on ``inferno``, or with ``signed`` the whole map on a diverging
    ``RdBu_r`` scale symmetric about zero (both scaled by a robust maximum); the ground-truth mask, if any, as
    a cyan outline. The peak slice of each row is marked.

    Args:
        path: the PNG to write (must not exist).
        image: the 3D image.
        saliency: the 3D map on the same grid.
        mask: a 3D mask on the same grid, or ``None``.
        spacing: voxel size per axis, for the panels' aspect ratio.
        title: the figure title (prediction, label, method...).
        signed: diverging colours for a signed map instead of its positive part.
        n_slices: slices per axis.
        alpha: the overlay's opacity at the map's maximum.
        axis_names: a label per axis (default ``axis 0`` ...).
        display_percentile: the colour scale's maximum is this percentile of the shown (positive or absolute)
            values, so one extreme voxel does not hide the rest.
        dpi: resolution.

    Returns:
        The path written.

    Raises:
        ValueError: arrays of different shapes, or not 3D.
        FileExistsError: ``path`` exists.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"refusing to overwrite existing output {path}")
    image, saliency = np.asarray(image, dtype=np.float32), np.asarray(saliency, dtype=np.float32)
    if image.ndim != 3 or image.shape != saliency.shape:
        raise ValueError(f"image {image.shape} and saliency {saliency.shape} must be 3D arrays of one shape")
    if mask is not None and np.asarray(mask).shape != image.shape:
        raise ValueError(f"mask {np.asarray(mask).shape} is not on the image grid {image.shape}")
    names = list(axis_names or [f"axis {a}" for a in range(3)])

    lo, hi = np.percentile(image, [1, 99])
    hi = hi if hi > lo else lo + 1.0
    shown = np.abs(saliency) if signed else np.clip(saliency, 0, None)
    # a robust maximum: one extreme voxel would otherwise leave the rest of the map invisible
    scale = float(np.percentile(shown[shown > 0], display_percentile)) if (shown > 0).any() else 1.0
    if signed:
        norm_map = np.clip(saliency / scale, -1, 1)
        cmap, vmin, vmax = colormaps["RdBu_r"], -1.0, 1.0
    else:
        norm_map = np.clip(saliency / scale, 0, 1)
        cmap, vmin, vmax = colormaps["inferno"], 0.0, 1.0
    peak = peak_index(saliency, signed)

    rows = [(a, montage_slices(peak[a], image.shape[a], n_slices)) for a in range(3)]
    ncols = max(len(s) for _, s in rows)
    aspects, heights = [], []
    for axis, _ in rows:
        others = [d for d in range(3) if d != axis]
        aspect = float(np.clip(spacing[others[0]] / spacing[others[1]], *_ASPECT_BOUNDS))
        aspects.append(aspect)
        heights.append(image.shape[others[0]] * aspect / image.shape[others[1]])  # panel height / width
    panel_w = 2.8
    fig = Figure(figsize=(panel_w * ncols + 1.0, sum(panel_w * h + 0.35 for h in heights) + 0.6))
    axes = fig.subplots(3, ncols, squeeze=False, gridspec_kw={"height_ratios": heights})  # no pyplot
    for r, (axis, slices) in enumerate(rows):
        aspect = aspects[r]
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(slices):
                ax.axis("off")
                continue
            idx = slices[c]
            ax.imshow(_take(image, axis, idx), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            sal = _take(norm_map, axis, idx)
            rgba = cmap((sal - vmin) / (vmax - vmin))
            rgba[..., 3] = alpha * np.sqrt(np.abs(sal))
            ax.imshow(rgba, aspect=aspect, interpolation="nearest")
            if mask is not None:
                m = _take(np.asarray(mask), axis, idx) > 0.5
                if m.any() and not m.all():
                    ax.contour(m.astype(float), levels=[0.5], colors="cyan", linewidths=0.9)
            mark = " (peak)" if idx == peak[axis] else ""
            ax.set_title(f"{names[axis]} = {idx}{mark}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.88, 0.97))
    cax = fig.add_axes((0.895, 0.15, 0.015, 0.7))
    label = f"saliency / {display_percentile:g}th percentile of |saliency|" + (" (positive part)" if not signed else "")
    fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), cax=cax, label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
