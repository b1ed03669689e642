"""Find a CT series in a DICOM download by its UIDs and read it into a checked HU volume.

The TCIA download of LIDC-IDRI is laid out ``ROOT/LIDC-IDRI-dddd/<study>/<series>/*.dcm``, but
newer NBIA downloads use human-readable folder names at some levels. Nothing here depends on
folder names: :class:`DicomIndex` reads the header of the first ``*.dcm`` file (by name) of
each folder and attributes the folder to that file's series (TCIA keeps one series per
folder); when that finds nothing, every file of the patient's folders is checked.

Volumes use pylidc's index order ``hu[i, j, k]``: ``i`` image row (DICOM y), ``j`` image
column (DICOM x), ``k`` slice in ascending ImagePositionPatient z.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

__all__ = [
    "SeriesError",
    "DicomIndex",
    "CtSeries",
    "read_ct_series",
    "match_slice_positions",
    "Z_TOLERANCE_MM",
]

# Slice positions are DICOM decimal strings; two positions closer than this are the same slice.
Z_TOLERANCE_MM = 0.01
_HEADER_TAGS = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID"]


class SeriesError(Exception):
    """A series cannot be used: not found, missing/duplicate slices, unreadable pixels, ...

    The message names the file or slice position and the problem.
    """


def _is_dicom_name(name: str) -> bool:
    return name.lower().endswith(".dcm") and not name.startswith(".")


def _read_header(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    return (
        str(ds.get("PatientID", "")).strip(),
        str(ds.get("StudyInstanceUID", "")).strip(),
        str(ds.get("SeriesInstanceUID", "")).strip(),
    )


@dataclass
class DicomIndex:
    """Folders of ``*.dcm`` files under a root, keyed by the UIDs in their headers.

    Args:
        root: The download's root folder (searched recursively).

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
    """

    root: Path
    _files: dict[Path, list[str]] = field(default_factory=dict, repr=False)
    _first: dict[Path, tuple[str, str, str]] = field(default_factory=dict, repr=False)
    _unreadable: dict[Path, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"DICOM root {self.root} is not a folder")
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            names = sorted(n for n in filenames if _is_dicom_name(n))
            if not names:
                continue
            folder = Path(dirpath)
            self._files[folder] = names
            # The first readable header stands for the folder; an unreadable first file is
            # remembered so a later failure can say why.
            for name in names:
                try:
                    self._first[folder] = _read_header(folder / name)
                    break
                except Exception as exc:  # noqa: BLE001 - any parse error means "not usable"
                    self._unreadable[folder / name] = f"{type(exc).__name__}: {exc}"

    @property
    def n_files(self) -> int:
        """Number of ``*.dcm`` files under the root."""
        return sum(len(v) for v in self._files.values())

    def patient_ids(self) -> list[str]:
        """PatientIDs found in the folders' first headers, sorted."""
        return sorted({pid for pid, _, _ in self._first.values() if pid})

    def find_series(self, patient_id: str, study_uid: str, series_uid: str) -> list[Path]:
        """All ``*.dcm`` files that may belong to a series (checked again when read).

        Args:
            patient_id: The patient's id, used to narrow the file-by-file fallback search.
            study_uid: The series' StudyInstanceUID (must match the files found).
            series_uid: The SeriesInstanceUID to look for.

        Returns:
            The candidate files, sorted by path.

        Raises:
            SeriesError: If no file carries ``series_uid``, or its study UID differs.
        """
        folders = [f for f, (_, _, se) in self._first.items() if se == series_uid]
        files = [f / n for f in folders for n in self._files[f]]
        if not files:
            # Mixed folders (not TCIA's layout): check every file of this patient's folders.
            for folder, (pid, _, _) in self._first.items():
                if pid != patient_id:
                    continue
                for name in self._files[folder]:
                    try:
                        if _read_header(folder / name)[2] == series_uid:
                            files.append(folder / name)
                    except Exception:  # noqa: BLE001 - reported as unreadable when read
                        continue
        if not files:
            n_patient = sum(1 for pid, _, _ in self._first.values() if pid == patient_id)
            raise SeriesError(
                f"series {series_uid} not found under {self.root}: no DICOM file carries that "
                f"SeriesInstanceUID ({self.n_files} .dcm files searched, {n_patient} folder(s) "
                f"with PatientID {patient_id})"
            )
        studies = {self._first[f][1] for f in folders if f in self._first}
        if studies and study_uid not in studies:
            raise SeriesError(
                f"series {series_uid} found in {folders[0]} but its StudyInstanceUID "
                f"{sorted(studies)[0]} differs from the expected {study_uid}"
            )
        return sorted(files)


@dataclass(frozen=True)
class CtSeries:
    """A CT series as a Hounsfield-unit volume with its scanner geometry.

    Attributes:
        hu: HU volume ``[row i, column j, slice k]``, float32, slices by ascending z.
        z: ImagePositionPatient z of each slice (mm, ascending).
        origin_xy: ImagePositionPatient x, y of the first voxel (mm, patient LPS frame).
        row_spacing: Distance between rows, i.e. along y (PixelSpacing[0], mm).
        col_spacing: Distance between columns, i.e. along x (PixelSpacing[1], mm).
        files: The file of each slice, in the order of ``z``.
    """

    hu: np.ndarray
    z: np.ndarray
    origin_xy: tuple[float, float]
    row_spacing: float
    col_spacing: float
    files: tuple[Path, ...]

    @property
    def slice_spacing(self) -> float:
        """Median distance between consecutive slices (mm)."""
        return float(np.median(np.diff(self.z))) if len(self.z) > 1 else 1.0

    @property
    def uniform_z(self) -> bool:
        """Whether all slices are equally spaced (within 1 % of the median spacing)."""
        if len(self.z) < 3:
            return True
        return bool(np.allclose(np.diff(self.z), self.slice_spacing, rtol=0.01, atol=Z_TOLERANCE_MM))

    def affine_lps(self) -> np.ndarray:
        """4x4 voxel-to-patient (LPS, mm) affine of the array ``hu.transpose(1, 0, 2)``.

        The transposed order ``[x, y, z]`` is what is written to NIfTI. For unevenly spaced
        slices the median spacing is used (exact positions are in ``z``).

        Returns:
            The affine as a float64 array.
        """
        a = np.eye(4)
        a[0, 0], a[1, 1], a[2, 2] = self.col_spacing, self.row_spacing, self.slice_spacing
        a[:3, 3] = (self.origin_xy[0], self.origin_xy[1], self.z[0])
        return a


def match_slice_positions(
    z: Sequence[float], expected_z: Sequence[float], files: Sequence[Path] | None = None
) -> np.ndarray:
    """Check slice positions against the scan's known positions; return their indices there.

    A series is complete when its positions are ``expected_z[start::step]`` for one step
    (``step`` = 1 for a real download; a phantom thinned with ``slice_step`` keeps every
    ``step``-th slice). Anything else is a missing, extra or duplicate slice.

    Args:
        z: The positions read from the files (any order).
        expected_z: The scan's ascending slice positions (pylidc's ``scan.slice_zvals``).
        files: The file of each position, to name in messages.

    Returns:
        For each position in ascending order, its index in ``expected_z``.

    Raises:
        SeriesError: On duplicate positions, positions the scan does not have, or gaps.
    """
    z = np.asarray(z, dtype=float)
    expected_z = np.asarray(expected_z, dtype=float)
    names = [Path(f).name for f in files] if files is not None else [f"slice {n}" for n in range(len(z))]
    order = np.argsort(z, kind="stable")
    zs = z[order]
    if len(zs) == 0:
        raise SeriesError("series has no slices")
    dup = np.flatnonzero(np.diff(zs) < Z_TOLERANCE_MM)
    if dup.size:
        pairs = [f"z={zs[d]:.3f} in {names[order[d]]} and {names[order[d + 1]]}" for d in dup[:5]]
        raise SeriesError(f"duplicate slice position(s): {'; '.join(pairs)}")
    nearest = np.abs(zs[:, None] - expected_z[None, :]).argmin(axis=1)
    off = np.abs(expected_z[nearest] - zs) > Z_TOLERANCE_MM
    if off.any():
        bad = [f"z={zs[n]:.3f} ({names[order[n]]})" for n in np.flatnonzero(off)[:5]]
        raise SeriesError(
            f"slice position(s) not among the scan's {len(expected_z)} annotated positions: {', '.join(bad)}"
        )
    step = int(np.median(np.diff(nearest))) if len(nearest) > 1 else 1
    step = max(step, 1)
    want = np.arange(nearest[0] % step, len(expected_z), step)
    missing = np.setdiff1d(want, nearest)
    extra = np.setdiff1d(nearest, want)
    if missing.size:
        where = ", ".join(f"{expected_z[m]:.3f}" for m in missing[:8])
        more = f" (+{missing.size - 8} more)" if missing.size > 8 else ""
        kept = "" if step == 1 else f" (the series keeps one slice in {step})"
        raise SeriesError(
            f"{missing.size} missing slice(s){kept}: expected z={where}{more} mm; found {len(zs)} of {len(want)} slices"
        )
    if extra.size:
        where = ", ".join(f"{expected_z[m]:.3f}" for m in extra[:8])
        raise SeriesError(f"irregular slice subset: unexpected slice(s) at z={where} mm for step {step}")
    return nearest


def _f(ds: pydicom.Dataset, keyword: str, path: Path) -> list[float]:
    if keyword not in ds:
        raise SeriesError(f"{path.name}: missing {keyword}")
    value = ds[keyword].value
    try:
        try:
            return [float(v) for v in value]
        except TypeError:  # a single value
            return [float(value)]
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{path.name}: malformed {keyword} {value!r}") from exc


def read_ct_series(files: Sequence[Path], series_uid: str, expected_z: Sequence[float] | None = None) -> CtSeries:
    """Read, check and stack the slices of one axial CT series.

    Files in the list that belong to another series are left out (a folder may hold several);
    every file must be readable DICOM.

    Args:
        files: Candidate files (e.g. from :meth:`DicomIndex.find_series`).
        series_uid: The SeriesInstanceUID to keep.
        expected_z: The scan's known slice positions; when given, the slices must match them
            (see :func:`match_slice_positions`), otherwise only duplicates are checked.

    Returns:
        The checked series.

    Raises:
        SeriesError: Naming the file and problem: unreadable file or pixel data, mixed
            geometry, non-axial orientation, duplicate/missing/unknown slice positions.
    """
    datasets: list[tuple[Path, pydicom.Dataset]] = []
    for path in files:
        path = Path(path)
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - any parse error
            raise SeriesError(f"{path.name}: not readable as DICOM ({type(exc).__name__}: {exc})") from exc
        if str(ds.get("SeriesInstanceUID", "")).strip() == series_uid:
            datasets.append((path, ds))
    if not datasets:
        raise SeriesError(f"no file of series {series_uid} among {len(files)} candidate(s)")

    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in datasets if "Rows" in ds and "Columns" in ds}
    if len(shapes) != 1:
        raise SeriesError(f"slices have different or missing Rows/Columns: {sorted(shapes)}")
    z, xy, spacing = [], [], []
    for path, ds in datasets:
        ipp = _f(ds, "ImagePositionPatient", path)
        iop = _f(ds, "ImageOrientationPatient", path)
        if len(ipp) != 3 or len(iop) != 6:
            raise SeriesError(f"{path.name}: malformed ImagePositionPatient/ImageOrientationPatient")
        if not np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-3):
            raise SeriesError(f"{path.name}: unsupported ImageOrientationPatient {iop} (only axial 1\\0\\0\\0\\1\\0)")
        ps = _f(ds, "PixelSpacing", path)
        if len(ps) != 2 or min(ps) <= 0:
            raise SeriesError(f"{path.name}: malformed PixelSpacing {ps}")
        z.append(ipp[2])
        xy.append(ipp[:2])
        spacing.append(ps)
    paths = [p for p, _ in datasets]
    if expected_z is not None:
        match_slice_positions(z, expected_z, paths)
    else:
        match_slice_positions(z, sorted(z), paths)
    spacing_arr = np.asarray(spacing)
    if not np.allclose(spacing_arr, spacing_arr[0], atol=1e-4):
        raise SeriesError(f"PixelSpacing differs between slices: {np.unique(spacing_arr, axis=0).tolist()}")
    xy_arr = np.asarray(xy)
    if np.abs(xy_arr - xy_arr[0]).max() > 0.5 * spacing_arr[0].min():
        raise SeriesError("ImagePositionPatient x/y drift between slices (gantry tilt?); not supported")

    order = np.argsort(z, kind="stable")
    rows, cols = shapes.pop()
    hu = np.empty((rows, cols, len(order)), dtype=np.float32)
    for k, n in enumerate(order):
        path, ds = datasets[n]
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder errors vary by transfer syntax
            raise SeriesError(f"{path.name}: unreadable pixel data ({type(exc).__name__}: {exc})") from exc
        if pixels.shape != (rows, cols):
            raise SeriesError(f"{path.name}: pixel data shape {pixels.shape} is not {(rows, cols)}")
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        hu[:, :, k] = pixels.astype(np.float32) * slope + intercept
    return CtSeries(
        hu=hu,
        z=np.asarray(z, dtype=float)[order],
        origin_xy=(float(xy_arr[order[0], 0]), float(xy_arr[order[0], 1])),
        row_spacing=float(spacing_arr[0, 0]),
        col_spacing=float(spacing_arr[0, 1]),
        files=tuple(paths[n] for n in order),
    )
