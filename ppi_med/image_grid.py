"""Images on their scanner grid: reading a source (NIfTI or DICOM) with its affine, writing NIfTI beside it
without ever overwriting, and resampling a map from one grid into another through the affines.

Affines here are NIfTI-style voxel-to-world matrices in RAS millimetres (as nibabel and MONAI's readers give
them: MONAI's DICOM reader converts the DICOM LPS frame to RAS), so two grids that share a frame of
reference line up by ``inv(dst_affine) @ src_affine``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage as ndi

from .atomic import atomic_path

__all__ = [
    "SourceImage",
    "is_nifti",
    "read_source",
    "ensure_new",
    "write_nifti",
    "resample_to_grid",
    "same_grid",
    "world_centroid",
    "voxel_to_world",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(_NIFTI_SUFFIXES)


@dataclass
class SourceImage:
    """An image as the scanner wrote it: its array in file order, its affine and, for NIfTI, its header.

    Attributes:
        path: where it was read from (a NIfTI file, a DICOM folder or file, ...).
        array: the spatial array (3D), in the order MONAI's loader gives it.
        affine: 4 x 4 voxel-to-world (RAS, mm) affine.
        header: the NIfTI header of a NIfTI source, ``None`` otherwise.
    """

    path: Path
    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each array axis (mm)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def is_nifti(self) -> bool:
        return self.header is not None


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.numpy()
    return np.asarray(x)


def read_source(path: str | Path, loader: Callable | None = None) -> SourceImage:
    """Read an image with MONAI's loader and keep its geometry (and the NIfTI header of a NIfTI file).

    Args:
        path: a NIfTI file, a DICOM series folder, or any file MONAI's ``LoadImage`` reads.
        loader: a MONAI ``LoadImage`` (e.g. the one inside the bundle's ``LoadImaged``, so the same reader
            options apply); a default ``LoadImage(image_only=True)`` when ``None``. Its output may have a
            leading channel axis of size 1, which is dropped.

    Returns:
        The :class:`SourceImage`.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ValueError: the image is not a single-channel 3D volume, or MONAI's reading disagrees with the NIfTI
            header about the shape or the affine.
    """
    from monai.transforms import LoadImage

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    loader = loader or LoadImage(image_only=True)
    img = loader(str(path))
    if isinstance(img, (tuple, list)):  # a loader built with image_only=False
        img = img[0]
    affine = _as_numpy(getattr(img, "affine", np.eye(4))).astype(np.float64)
    array = _as_numpy(img)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a single-channel 3D volume, got an array of shape {array.shape}")
    header = None
    if is_nifti(path):
        nii = nib.load(str(path))
        if tuple(nii.shape[:3]) != array.shape or any(s != 1 for s in nii.shape[3:]):
            raise ValueError(f"{path}: NIfTI shape {nii.shape} differs from the loaded volume {array.shape}")
        if not np.allclose(nii.affine, affine, atol=1e-4):
            raise ValueError(f"{path}: the loader's affine differs from the NIfTI header's\n{affine}\n{nii.affine}")
        header, affine = nii.header, np.asarray(nii.affine, dtype=np.float64)
    return SourceImage(path=path, array=array, affine=affine, header=header)


def ensure_new(path: str | Path) -> Path:
    """``path`` as a Path, refusing if something is already there.

    Raises:
        FileExistsError: the file exists (outputs are never overwritten).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"refusing to overwrite existing output {path}; choose a new output folder")
    return path


def write_nifti(
    path: str | Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    like: nib.Nifti1Header | None = None,
    dtype: type | np.dtype = np.float32,
    description: str | None = None,
    replace: bool = False,
) -> Path:
    """Write a 3D array as NIfTI on a given grid, never replacing an existing file unless asked to.

    With ``like`` (the source's header) the qform and sform, their codes and the units are copied from it, so
    a viewer places the result exactly where it places the source; otherwise both forms are set to ``affine``
    with code 1 (scanner).

    Args:
        path: the new file (``.nii.gz``).
        array: the data.
        affine: voxel-to-world affine (must be the header's own affine when ``like`` is given).
        like: a header to copy the geometry from.
        dtype: the on-disk type.
        description: the header's ``descrip`` (truncated to 79 characters).
        replace: replace an existing file (in one rename: a reader sees the old file or the new one, never
            half of one), as data preparation does when it rebuilds its own outputs.

    Returns:
        The path written.

    Raises:
        FileExistsError: the file exists and ``replace`` is false.
        ValueError: ``like``'s affine differs from ``affine``, or the array is not 3D.
    """
    if np.ndim(array) != 3:
        raise ValueError(f"expected a 3D array for {path}, got shape {np.shape(array)}")
    path = Path(path) if replace else ensure_new(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array).astype(dtype, copy=False)
    if like is not None:
        hdr = like.copy()
        hdr.set_data_dtype(dtype)
        img = nib.Nifti1Image(data, affine, header=hdr)
        q, qcode = like.get_qform(coded=True)
        s, scode = like.get_sform(coded=True)
        img.set_qform(q, code=int(qcode))
        img.set_sform(s, code=int(scode))
        if not np.allclose(img.affine, affine, atol=1e-5):
            raise ValueError(f"{path}: the header to copy does not carry the affine of the data")
    else:
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(None, None)  # the stored values are the values: no scaling copied from `like`
    if description:
        img.header["descrip"] = description[:79].encode("ascii", "replace")
    with atomic_path(path, overwrite=replace) as tmp:
        nib.save(img, tmp)
    return path


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World coordinates (mm) of voxel indices ``ijk`` (shape ``(..., 3)``)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_centroid(array: np.ndarray, affine: np.ndarray, positive_only: bool = True) -> np.ndarray:
    """The intensity-weighted centre of a map, in world mm.

    Args:
        array: a 3D map.
        affine: its voxel-to-world affine.
        positive_only: weigh by the positive part only.

    Raises:
        ValueError: the map has no (positive) mass.
    """
    w = np.clip(array, 0, None) if positive_only else np.abs(array)
    total = float(w.sum())
    if total <= 0:
        raise ValueError("the map has no positive values; it has no centroid")
    idx = np.indices(w.shape, dtype=np.float64).reshape(w.ndim, -1)
    centre = idx @ w.ravel().astype(np.float64) / total
    return voxel_to_world(affine, centre)


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-4) -> bool:
    """Whether two grids have the same shape and (numerically) the same affine."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def resample_to_grid(
    array: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: tuple[int, ...],
    dst_affine: np.ndarray,
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Resample a 3D map onto another grid of the same world frame, ``fill`` outside the map's extent.

    Only the destination voxels inside the bounding box of the source's footprint are interpolated, so placing
    a small patch into a whole scan costs the patch's size, not the scan's. A destination voxel belongs to the
    source when its centre falls inside the source's voxels (half a voxel beyond the outer centres); there the
    value is interpolated with edge values repeated, elsewhere it is ``fill``.

    Args:
        array: the source map (3D).
        src_affine: its voxel-to-world affine.
        dst_shape: the destination's shape.
        dst_affine: the destination's affine.
        order: spline order (0 nearest, 1 linear).
        fill: the value outside the source.

    Returns:
        A float32 array of ``dst_shape``.
    """
    array = np.asarray(array, dtype=np.float32)
    out = np.full(tuple(dst_shape), fill, dtype=np.float32)
    dst_to_src = np.linalg.inv(src_affine) @ dst_affine
    src_to_dst = np.linalg.inv(dst_to_src)
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in array.shape])), dtype=np.float64)
    corners_dst = corners @ src_to_dst[:3, :3].T + src_to_dst[:3, 3]
    lo = np.maximum(np.floor(corners_dst.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(corners_dst.max(axis=0)).astype(int) + 1, np.asarray(dst_shape))
    if np.any(hi <= lo):
        return out  # the source lies outside the destination
    grid = np.indices(tuple(hi - lo), dtype=np.float64).reshape(3, -1) + lo[:, None]
    coords = dst_to_src[:3, :3] @ grid + dst_to_src[:3, 3:4]
    inside = np.all((coords >= -0.5) & (coords <= np.asarray(array.shape)[:, None] - 0.5), axis=0)
    values = ndi.map_coordinates(array, coords, order=order, mode="nearest")
    block = np.where(inside, values, fill).reshape(tuple(hi - lo)).astype(np.float32)
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = block
    return out
