"""Isotropic 3D patches cut from an axial CT volume, with their NIfTI (RAS) affines.

Frames: DICOM positions are in the patient LPS frame (x to the patient's left, y to the
back, z to the head); NIfTI affines map voxel indices to RAS, so x and y change sign.
Arrays written to NIfTI are ordered ``[x, y, z]``; the CT volume itself is kept in pylidc's
``[row i (y), column j (x), slice k (z)]`` order. Voxel centres follow DICOM: pixel ``(i, j)``
of a slice at ImagePositionPatient ``(x0, y0, z)`` lies at ``(x0 + j*dx, y0 + i*dy, z)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["LPS_TO_RAS", "PatchGrid", "VolumeGeometry", "sample_volume", "mask_centroid_lps"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class VolumeGeometry:
    """Where the voxels of an axial CT volume ``[i, j, k]`` are in the scanner (LPS, mm).

    Attributes:
        origin_xy: ImagePositionPatient x, y of voxel ``(0, 0, *)``.
        row_spacing: mm between rows (along y).
        col_spacing: mm between columns (along x).
        z: Ascending z of each slice (may be unevenly spaced).
    """

    origin_xy: tuple[float, float]
    row_spacing: float
    col_spacing: float
    z: np.ndarray

    def to_index(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, ...]:
        """Fractional voxel indices ``(i, j, k)`` of LPS points, and which lie inside the volume.

        Args:
            x: LPS x (mm).
            y: LPS y (mm).
            z: LPS z (mm).

        Returns:
            ``(i, j, k, inside)``; ``k`` is interpolated between the (possibly uneven) slices.
        """
        i = (np.asarray(y, dtype=float) - self.origin_xy[1]) / self.row_spacing
        j = (np.asarray(x, dtype=float) - self.origin_xy[0]) / self.col_spacing
        z = np.asarray(z, dtype=float)
        k = np.interp(z, self.z, np.arange(len(self.z), dtype=float))
        inside = (z >= self.z[0] - 1e-6) & (z <= self.z[-1] + 1e-6)
        return i, j, k, inside

    def to_lps(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """LPS positions (mm, shape ``(..., 3)``) of fractional voxel indices."""
        x = self.origin_xy[0] + np.asarray(j, dtype=float) * self.col_spacing
        y = self.origin_xy[1] + np.asarray(i, dtype=float) * self.row_spacing
        z = np.interp(np.asarray(k, dtype=float), np.arange(len(self.z), dtype=float), self.z)
        return np.stack([x, y, z], axis=-1)


@dataclass(frozen=True)
class PatchGrid:
    """A cube of ``size``^3 voxels of ``spacing`` mm, axis-aligned in LPS, centred on ``centre``.

    Attributes:
        centre: LPS centre (mm) of the cube.
        size: Voxels per side.
        spacing: Voxel edge (mm).
    """

    centre: tuple[float, float, float]
    size: int
    spacing: float

    @classmethod
    def around(cls, centre_lps: np.ndarray, patch_mm: float, spacing_mm: float) -> PatchGrid:
        """A grid covering ``patch_mm`` per side (rounded to whole voxels, at least 1).

        Args:
            centre_lps: LPS centre (mm).
            patch_mm: Edge of the cube (mm).
            spacing_mm: Voxel edge (mm).

        Returns:
            The grid.
        """
        size = max(int(round(patch_mm / spacing_mm)), 1)
        return cls(tuple(float(c) for c in centre_lps), size, float(spacing_mm))

    @property
    def origin(self) -> np.ndarray:
        """LPS position of voxel ``[0, 0, 0]``."""
        return np.asarray(self.centre) - (self.size - 1) / 2.0 * self.spacing

    def points_lps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS x, y, z of every voxel centre, each shaped ``(size, size, size)`` as ``[x, y, z]``."""
        axis = np.arange(self.size, dtype=float) * self.spacing
        o = self.origin
        return np.meshgrid(o[0] + axis, o[1] + axis, o[2] + axis, indexing="ij")

    def affine_ras(self) -> np.ndarray:
        """NIfTI affine (voxel ``[x, y, z]`` -> RAS mm) of the patch."""
        a = np.eye(4)
        a[:3, :3] *= self.spacing
        a[:3, 3] = self.origin
        return LPS_TO_RAS @ a

    def extent_lps(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest LPS coordinates covered by the patch voxels (their outer faces)."""
        half = self.spacing / 2.0
        return self.origin - half, self.origin + (self.size - 1) * self.spacing + half


def sample_volume(
    volume: np.ndarray,
    geometry: VolumeGeometry,
    grid: PatchGrid,
    *,
    offset: tuple[int, int, int] = (0, 0, 0),
    order: int = 1,
    fill: float = 0.0,
) -> np.ndarray:
    """Resample (a box of) a CT-ordered volume onto a patch grid.

    Args:
        volume: Array ``[i, j, k]``; it may be a sub-box of the full volume starting at voxel
            ``offset`` (e.g. a nodule mask in its bounding box).
        geometry: Geometry of the *full* volume.
        grid: The patch grid.
        offset: Full-volume index of ``volume[0, 0, 0]``.
        order: Interpolation order (1 = trilinear).
        fill: Value outside the (sub-)volume, e.g. -1000 HU (air) for an image, 0 for a mask.

    Returns:
        Float32 array ``[x, y, z]`` of shape ``(size, size, size)``.
    """
    x, y, z = grid.points_lps()
    i, j, k, inside_z = geometry.to_index(x, y, z)
    i, j, k = i - offset[0], j - offset[1], k - offset[2]
    shape = volume.shape
    inside = (
        inside_z
        & (i >= -1e-6)
        & (i <= shape[0] - 1 + 1e-6)
        & (j >= -1e-6)
        & (j <= shape[1] - 1 + 1e-6)
        & (k >= -1e-6)
        & (k <= shape[2] - 1 + 1e-6)
    )
    out = ndi.map_coordinates(
        np.asarray(volume, dtype=np.float32), [i, j, k], order=order, mode="nearest", output=np.float32
    )
    out[~inside] = fill
    return out


def mask_centroid_lps(mask: np.ndarray, geometry: VolumeGeometry, offset: tuple[int, int, int]) -> np.ndarray:
    """Centroid (LPS mm) of a boolean mask box placed at ``offset`` in a CT volume.

    Args:
        mask: Boolean ``[i, j, k]`` box.
        geometry: The volume's geometry.
        offset: Full-volume index of ``mask[0, 0, 0]``.

    Returns:
        The centroid, shape ``(3,)``.

    Raises:
        ValueError: If the mask is empty.
    """
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise ValueError("empty mask has no centroid")
    idx = idx + np.asarray(offset)
    return geometry.to_lps(idx[:, 0], idx[:, 1], idx[:, 2]).mean(axis=0)
