"""A writer of small CT series (one DICOM file per slice, with pydicom) for the tests that read DICOM back.

:func:`write_ct_series` writes ``vol[k, r, c]`` (slice k, row r, column c) as CT Image Storage slices of one
series on a geometry the test chooses: pixel spacing, slice step, the position of slice 0 and the row and
column directions, oblique ones included; slice k lies at ``origin + k * step * (row_dir x col_dir)``. The
slices are written out of slice order unless the test says otherwise, so a reader that trusts the file order
or the file names instead of the positions gets the volume wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

__all__ = ["write_ct_series"]

_DS_MAX_CHARS = 16  # a DICOM decimal string holds at most 16 characters
_INT16 = np.iinfo(np.int16)


def _decimal_strings(values: Sequence[float], decimals: int, what: str) -> list[str]:
    """``values`` as DICOM decimal strings with a fixed number of decimals (so oblique geometry keeps its
    precision); too large a value is an error rather than a header pydicom would write invalid."""
    out = [f"{float(v):.{decimals}f}" for v in values]
    too_long = [s for s in out if len(s) > _DS_MAX_CHARS]
    if too_long:
        raise ValueError(f"{what} {too_long} does not fit a DICOM decimal string ({_DS_MAX_CHARS} characters)")
    return out


def write_ct_series(
    folder: Path,
    vol: np.ndarray,
    *,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    step: float = 1.0,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    row_dir: Sequence[float] = (1.0, 0.0, 0.0),
    col_dir: Sequence[float] = (0.0, 1.0, 0.0),
    order: Sequence[int] | None = None,
    name: str = "slice{n:02d}.dcm",
    patient: str = "PHANTOM",
    study: str | None = None,
    series: str | None = None,
    frame_of_reference: str | None = None,
    **attributes: Any,
) -> list[Path]:
    """Write ``vol[k, r, c]`` as a CT series in a new folder, one slice per file.

    Every slice gets its own SOP Instance UID, ``InstanceNumber`` ``k + 1``, ``SliceThickness`` ``step``,
    signed 16-bit pixels with ``RescaleSlope`` 1 and ``RescaleIntercept`` 0 (stored values are HU), and
    explicit VR little endian with a file meta header.

    Args:
        folder: The folder to create; it must not exist yet.
        vol: A 3-D array of HU values, ``(slices, rows, columns)``; stored as ``int16`` (fractions are cut).
        pixel_spacing: DICOM ``PixelSpacing`` in mm: between rows, then between columns.
        step: mm from one slice to the next along the slice normal.
        origin: ``ImagePositionPatient`` of slice 0 (LPS mm, centre of its first pixel).
        row_dir: The first triplet of ``ImageOrientationPatient``: the direction of increasing column.
        col_dir: The second triplet: the direction of increasing row.
        order: The slice indices in the order they are written; a subset leaves slices out. By default a
            fixed shuffle of all slices.
        name: File name pattern, formatted with ``n`` (position in the write order) and ``k`` (slice index).
        patient: ``PatientID``.
        study: ``StudyInstanceUID``; a new UID by default.
        series: ``SeriesInstanceUID``; a new UID by default.
        frame_of_reference: ``FrameOfReferenceUID``; a new UID by default.
        **attributes: Further dataset attributes by DICOM keyword (``PatientName="Phantom^A"``), the same on
            every slice; set last, so they may also replace any of the above.

    Returns:
        The files, in the order written.

    Raises:
        ValueError: ``vol`` is not 3-D or out of the ``int16`` range, ``order`` names a slice twice or one
            ``vol`` lacks, ``name`` gives two slices one file, a keyword is no DICOM keyword, or a position
            does not fit a DICOM decimal string. Nothing is written then.
        FileExistsError: ``folder`` exists.
    """
    vol = np.asarray(vol)
    if vol.ndim != 3:
        raise ValueError(f"{folder}: vol must be (slices, rows, columns), got shape {vol.shape}")
    if vol.size and (vol.min() < _INT16.min or vol.max() > _INT16.max):
        raise ValueError(f"{folder}: vol spans {vol.min()}..{vol.max()}, outside int16 (stored pixels would wrap)")
    n_slices = vol.shape[0]
    order = [int(k) for k in (np.random.default_rng(0).permutation(n_slices) if order is None else order)]
    if len(set(order)) != len(order) or not all(0 <= k < n_slices for k in order):
        raise ValueError(f"{folder}: order {order} must name distinct slices of 0..{n_slices - 1}")
    names = [name.format(n=n, k=k) for n, k in enumerate(order)]
    if len(set(names)) != len(names):
        raise ValueError(f"{folder}: the name pattern {name!r} gives several slices one file: {names}")
    unknown = sorted(key for key in attributes if tag_for_keyword(key) is None)
    if unknown:
        raise ValueError(f"{folder}: {unknown} are not DICOM keywords")
    normal = np.cross(np.asarray(row_dir, dtype=float), np.asarray(col_dir, dtype=float))
    positions = {
        k: _decimal_strings(np.asarray(origin, dtype=float) + k * step * normal, 6, f"{folder}: slice {k} position")
        for k in order
    }
    orientation = _decimal_strings((*row_dir, *col_dir), 8, f"{folder}: orientation")

    folder.mkdir(parents=True)
    study, series = study or generate_uid(), series or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    files = []
    for k, file_name in zip(order, names, strict=True):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.PatientID = "CT", patient
        ds.ImagePositionPatient, ds.ImageOrientationPatient = positions[k], orientation
        ds.PixelSpacing = [format_number_as_ds(float(v)) for v in pixel_spacing]
        ds.SliceThickness, ds.InstanceNumber = format_number_as_ds(float(step)), k + 1
        ds.Rows, ds.Columns = vol.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = vol[k].astype(np.int16).tobytes()
        for key, value in attributes.items():
            setattr(ds, key, value)
        path = folder / file_name
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
