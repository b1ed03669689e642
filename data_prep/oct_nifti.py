"""NIfTI conventions shared by the OCT data writers (synthetic generator and real-data ingestion).

Every OCT volume written by ``data_prep`` is a NIfTI-1 file whose data array has axes ``(V, H, W)``:

* axis 0, ``V``: B-scan index. World direction: inferior (``I``), i.e. B-scan 0 is the most superior
  one, as in a raster scan that runs top to bottom over the macula. Spacing ``dv`` (mm between B-scans).
* axis 1, ``H``: axial depth, from the vitreous (row 0, top of a B-scan) to the choroid (last row).
  World direction: posterior (``P``). Spacing ``dh`` (mm per pixel, about 0.0039 for spectral-domain OCT).
* axis 2, ``W``: lateral position along a B-scan. World direction: the patient's right (``R``).
  Spacing ``dw`` (mm per A-scan).

So ``nibabel.aff2axcodes(affine) == ("I", "P", "R")`` and the voxel sizes are ``(dv, dh, dw)``. The
origin is the centre of voxel ``(0, 0, 0)`` at world ``(0, 0, 0)``: OCT has no patient coordinate
frame shared with other modalities, so only spacing and orientation carry meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ppi_med.image_grid import write_nifti

__all__ = ["OCT_AXCODES", "oct_affine", "save_oct_nifti"]

#: Orientation codes of the affine returned by :func:`oct_affine`.
OCT_AXCODES = ("I", "P", "R")


def oct_affine(spacing: Sequence[float]) -> np.ndarray:
    """Build the 4 x 4 voxel-to-world affine of an OCT volume with axes (V, H, W).

    Args:
        spacing: ``(dv, dh, dw)`` in mm: between B-scans, axial, lateral. All must be finite and > 0.

    Returns:
        The affine (float64), mapping B-scan index to inferior, depth to posterior and lateral to right.

    Raises:
        ValueError: if the spacing does not have three positive finite values.
    """
    values = np.asarray(spacing, dtype=np.float64)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be three positive finite numbers (dv, dh, dw) in mm, got {spacing!r}")
    dv, dh, dw = values
    affine = np.zeros((4, 4))
    affine[2, 0] = -dv  # B-scan index -> inferior (RAS z decreases)
    affine[1, 1] = -dh  # depth -> posterior (RAS y decreases)
    affine[0, 2] = dw  # lateral -> right (RAS x increases)
    affine[3, 3] = 1.0
    return affine


def save_oct_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type | np.dtype) -> Path:
    """Write a (V, H, W) array as a NIfTI file with both qform and sform set to ``affine``.

    nibabel writes ``.nii.gz`` with a zero gzip timestamp, so equal arrays give byte-identical files.

    Args:
        array: 3D array with axes (V, H, W).
        affine: 4 x 4 voxel-to-world affine, e.g. from :func:`oct_affine`.
        path: Target file (``.nii`` or ``.nii.gz``); its parent folder is created.
        dtype: On-disk data type (e.g. ``np.float32`` for images, ``np.uint8`` for masks).

    Returns:
        ``path``.

    Raises:
        ValueError: if the array is not 3D.
    """
    if array.ndim != 3:
        raise ValueError(f"expected a 3D (V, H, W) array for {path}, got shape {array.shape}")
    return write_nifti(path, array, affine, dtype=dtype, replace=True)
