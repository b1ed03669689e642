"""Reading a record's lesion/nodule mask onto its image's grid: the one mask reader.

A datalist record may carry a ground-truth ``mask`` (docs/DESIGN.md section 5) drawn on the image's grid.
Saliency export (the mask copied beside the overlay and outlined in the montage) and saliency evaluation
(localisation scores) both read it here, under the record keys they are given: the mask from
``record[mask_key]``, put onto the grid of ``record[image_key]``.

A mask on another grid (the same scanner frame, other voxels) is resampled by nearest neighbour through the
two affines, with a warning; one that is not empty but lands outside its image is an error, as is a file
that cannot be read. Every error names the case and the file.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .image_grid import SourceImage, read_source, resample_to_grid, same_grid

__all__ = ["read_case_mask"]


def read_case_mask(
    record: Mapping[str, Any],
    *,
    image_key: str = "image",
    mask_key: str = "mask",
    image: SourceImage | None = None,
    loader: Callable | None = None,
    case: str | None = None,
) -> np.ndarray | None:
    """The record's mask as a boolean array on its image's grid, or ``None`` when the record has none.

    Args:
        record: a datalist record.
        image_key: the key of the image whose grid the mask is put on.
        mask_key: the key of the mask (a NIfTI file or anything MONAI's loader reads); a missing key or an
            empty value means no mask.
        image: ``record[image_key]`` already read (saves reading it again); read here when ``None``.
        loader: MONAI's ``LoadImage`` to read with (the bundle's, so its reader options apply); see
            :func:`ppi_med.image_grid.read_source`.
        case: the case's name in messages (default: the image path).

    Returns:
        ``True`` inside the mask (values above 0.5), on the image's grid; ``None`` without a mask.

    Raises:
        KeyError: the record has a mask but no ``image_key``.
        FileNotFoundError: the mask file does not exist.
        ValueError: the mask file cannot be read or is not a 3D volume, or a non-empty mask lies outside
            its image.
    """
    path = record.get(mask_key)
    if not path:
        return None
    if image is None:
        if image_key not in record:
            raise KeyError(f"case {case or path}: the record has a mask ({mask_key}) but no image key '{image_key}'")
        image = read_source(record[image_key], loader)
    name = case or str(image.path)
    if not Path(path).exists():
        raise FileNotFoundError(f"case {name}: mask not found: {path}")
    try:
        mask = read_source(path, loader)
    except FileNotFoundError:
        raise
    except Exception as err:  # MONAI's readers raise many kinds; the caller needs the file, not the kind
        raise ValueError(f"case {name}: cannot read the mask {path}: {err}") from err
    inside = mask.array > 0.5
    if same_grid(mask.shape, mask.affine, image.shape, image.affine):
        return inside
    warnings.warn(f"case {name}: mask {path} is on another grid than the image; resampled (nearest)", stacklevel=2)
    placed = resample_to_grid(inside.astype(np.float32), mask.affine, image.shape, image.affine, order=0) > 0.5
    if inside.any() and not placed.any():
        raise ValueError(f"case {name}: the mask {path} does not overlap its image {image.path}")
    return placed
