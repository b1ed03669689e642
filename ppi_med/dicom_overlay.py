"""Saliency overlays as DICOM Parametric Maps on the source CT series, for a PACS to show over the scan.

An overlay exported as NIfTI (:mod:`ppi_med.export`) lives on a RAS-mm grid; a PACS places images by their
DICOM tags. :func:`write_parametric_map` resamples the overlay onto the pixel grid of every slice of the
source series (through the two frames, so it does not matter how the NIfTI's axes were ordered or flipped),
and writes one multi-frame Parametric Map (highdicom) whose frame ``n`` sits exactly on source slice ``n``:
same ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows x Columns, and the series' study,
FrameOfReferenceUID and patient. Each frame references the slice it came from (SourceImageSequence), and
the map's ReferencedSeriesSequence names the source series, so a viewer can fuse it with the scan.

Only slices the overlay reaches (any non-zero value) become frames: an overlay of a 32 mm nodule patch placed
into a whole scan would otherwise carry hundreds of empty 512 x 512 float frames. Values are the overlay's
(saliency divided by its maximum absolute value, in [-1, 1]), stored as 32-bit floats with an identity
real-world value mapping.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from .atomic import atomic_path
from .image_grid import ensure_new, resample_to_grid

__all__ = ["DicomSeriesError", "SourceSeries", "read_source_series", "slice_affine_ras", "write_parametric_map"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(ValueError):
    """A DICOM series cannot carry an overlay (unreadable, mixed series or geometry); names the file."""


@dataclass(frozen=True)
class SourceSeries:
    """The slices of one DICOM image series, sorted along the slice normal.

    Attributes:
        folder: where the files were found.
        datasets: the slices (headers and pixels), first to last along the normal.
        files: the file of each slice.
    """

    folder: Path
    datasets: tuple[pydicom.Dataset, ...]
    files: tuple[Path, ...]

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].FrameOfReferenceUID)


def _floats(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError) as err:
        raise DicomSeriesError(f"{path}: missing or malformed {keyword} ({value!r})") from err
    if arr.size != n:
        raise DicomSeriesError(f"{path}: {keyword} has {arr.size} values, expected {n}")
    return arr


def read_source_series(path: str | Path) -> SourceSeries:
    """Read a DICOM series (a folder of single-frame slices, or one of its files) and check its geometry.

    Args:
        path: the series folder, or a file in it (its folder is read).

    Returns:
        The series, slices sorted by their position along the slice normal.

    Raises:
        DicomSeriesError: no readable DICOM image, several series in the folder, slices without a frame of
            reference, or slices whose orientation, spacing or size differ; the message names the file.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    found: list[tuple[Path, pydicom.Dataset]] = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            # headers only: the map copies the series' attributes and geometry, never its pixels
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - files that are not DICOM are not part of the series
            continue
        if "ImagePositionPatient" in ds and "Rows" in ds:
            found.append((f, ds))
    if not found:
        raise DicomSeriesError(f"{folder}: no DICOM image slice found")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in found}
    if len(series) != 1:
        raise DicomSeriesError(f"{folder}: holds {len(series)} series ({sorted(series)}); expected one")
    f0, ds0 = found[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, f0)
    spacing = _floats(ds0, "PixelSpacing", 2, f0)
    size = (int(ds0.Rows), int(ds0.Columns))
    for f, ds in found:
        if not str(ds.get("FrameOfReferenceUID", "")):
            raise DicomSeriesError(f"{f}: no FrameOfReferenceUID; an overlay could not be placed on it")
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, f), iop, atol=1e-4):
            raise DicomSeriesError(f"{f}: ImageOrientationPatient differs from {f0.name}'s")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, f), spacing, atol=1e-5):
            raise DicomSeriesError(f"{f}: PixelSpacing differs from {f0.name}'s")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise DicomSeriesError(f"{f}: Rows x Columns differ from {f0.name}'s {size}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomSeriesError(f"{f}: a multi-frame image; expected single-frame slices")
    normal = np.cross(iop[:3], iop[3:])
    order = sorted(range(len(found)), key=lambda i: float(_floats(found[i][1], "ImagePositionPatient", 3, f0) @ normal))
    return SourceSeries(
        folder=folder, datasets=tuple(found[i][1] for i in order), files=tuple(found[i][0] for i in order)
    )


def slice_affine_ras(ds: pydicom.Dataset) -> np.ndarray:
    """Voxel-to-world (RAS mm) affine of one slice as an array indexed ``[column, row, 0]``.

    DICOM's pixel position (PS3.3 C.7.6.2.1.1): ``P = IPP + column * dc * X + row * dr * Y`` in LPS, with
    ``X``, ``Y`` the two direction cosines of ImageOrientationPatient and ``dr``, ``dc`` = PixelSpacing; the
    third axis is the slice normal with a unit step (only its centre plane is used).
    """
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * dc
    lps[:3, 1] = iop[3:] * dr
    lps[:3, 2] = np.cross(iop[:3], iop[3:])
    lps[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return _LPS_TO_RAS @ lps


# Patient and study attributes the map copies from its source; type 2 (present, may be empty) in the standard.
# Series written by research tools often leave them out, so they are filled in empty on a copy.
_TYPE2_FROM_SOURCE = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _with_type2_defaults(ds: pydicom.Dataset) -> pydicom.Dataset:
    missing = [k for k in _TYPE2_FROM_SOURCE if k not in ds]
    if not missing:
        return ds
    out = copy.copy(ds)  # shallow: the source's pixel data is shared, the source itself is left as read
    for k in missing:
        setattr(out, k, "")
    return out


def _crop_to_support(overlay: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The overlay cut to its non-zero box plus one voxel of zeros, with the affine moved to match.

    A patch's overlay placed in a whole scan is zero almost everywhere; resampling only its box onto each slice
    costs the patch's size, and gives the same values (outside the box the map is zero either way).
    """
    nz = np.argwhere(overlay != 0)
    if nz.size == 0:
        return overlay, affine
    lo = np.maximum(nz.min(axis=0) - 1, 0)
    hi = np.minimum(nz.max(axis=0) + 2, overlay.shape)
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    return overlay[tuple(slice(a, b) for a, b in zip(lo, hi))], moved


def write_parametric_map(
    path: str | Path,
    overlay: np.ndarray,
    affine: np.ndarray,
    series: SourceSeries | str | Path,
    *,
    description: str = "saliency",
    series_number: int = 900,
    software_version: str = "0.1.0",
) -> Path:
    """Write ``overlay`` (on the RAS grid ``affine``) as a Parametric Map over the slices of ``series``.

    Args:
        path: the new ``.dcm`` file (refused if it exists).
        overlay: the 3D map.
        affine: its voxel-to-world (RAS mm) affine.
        series: the source series, or its folder.
        description: SeriesDescription and ContentDescription (e.g. ``wbp saliency, class 1``).
        series_number: the map's SeriesNumber.
        software_version: SoftwareVersions.

    Returns:
        The path written.

    Raises:
        FileExistsError: ``path`` exists.
        DicomSeriesError: the series cannot be read (see :func:`read_source_series`), or the overlay reaches
            none of its slices (the two do not share a place in the patient frame).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = ensure_new(path)
    if not isinstance(series, SourceSeries):
        series = read_source_series(series)
    overlay, affine = _crop_to_support(np.asarray(overlay, dtype=np.float32), np.asarray(affine, dtype=float))
    ds0 = series.datasets[0]
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    frames, sources = [], []
    for ds in series.datasets:
        plane = resample_to_grid(overlay, affine, (cols, rows, 1), slice_affine_ras(ds), order=1)[:, :, 0].T
        if np.any(plane != 0):
            frames.append(plane)
            sources.append(_with_type2_defaults(ds))
    if not frames:
        raise DicomSeriesError(
            f"{series.folder}: the overlay does not reach any slice of series {series.series_uid}; "
            "it is not in this scan's frame"
        )
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="saliency",
        lut_explanation="saliency / max |saliency|",
        unit=codes.UCUM.NoUnits,
        value_range=(-1.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pmap = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=np.stack(frames).astype(np.float32),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ppi-med",
        manufacturer_model_name="ppi-med saliency export",
        software_versions=software_version,
        device_serial_number="none",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.content.VOILUTTransformation(window_center=0.0, window_width=2.0)],
        content_description=description[:64],
        content_label="SALIENCY",
    )
    pmap.SeriesDescription = description[:64]
    # highdicom writes float maps uncompressed; deflating the dataset (a standard transfer syntax, read by
    # pydicom and DICOM toolkits as is) shrinks a map that is zero outside a nodule about a hundredfold
    pmap.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with atomic_path(path, overwrite=False) as tmp:
        pmap.save_as(tmp, enforce_file_format=True)
    return path
