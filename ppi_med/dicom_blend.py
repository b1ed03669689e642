"""A saliency Parametric Map blended into its scan as colour Secondary Capture images, for viewers without maps.

Many PACS viewers show a Parametric Map (:mod:`ppi_med.dicom_overlay`) as a grey image of its own, or not at
all. :func:`write_blended_series` turns each frame of a map into one RGB Secondary Capture image: the source
slice the frame lies on, windowed to grey, with the saliency painted over it in a diverging colour map (red
where it is positive, blue where negative), its opacity growing with ``|saliency|`` so that a zero leaves the
scan as it was. Each image is the pixel grid of its slice and carries the slice's ImagePositionPatient,
ImageOrientationPatient, PixelSpacing and FrameOfReferenceUID (attributes outside the Secondary Capture IOD,
which viewers use to sort and place it), the study and patient of the scan, and references to the slice and
to the map frame it comes from.

UIDs derive from the map's SOP Instance UID (and the frame number), so blending the same map again gives the
same instances, which a PACS keeps once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .dicom_overlay import DicomSeriesError, read_source_series

__all__ = ["PARAMETRIC_MAP_STORAGE", "blend_frame", "write_blended_series"]

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
_LPS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def _orientation_letters(direction: np.ndarray) -> str:
    """PS3.3 C.7.6.1.1.1: the patient directions a row or column points to, the strongest first."""
    order = np.argsort(-np.abs(direction))
    letters = [_LPS_LETTERS[a][0 if direction[a] > 0 else 1] for a in order if abs(direction[a]) >= 0.25]
    return "".join(letters) or _LPS_LETTERS[order[0]][0 if direction[order[0]] > 0 else 1]


def blend_frame(hu: np.ndarray, saliency: np.ndarray, window: tuple[float, float], alpha: float) -> np.ndarray:
    """One slice (Hounsfield units) windowed to grey with ``saliency`` (in [-1, 1]) painted over it.

    Args:
        hu: the slice, rows x columns.
        saliency: the map on the same pixels.
        window: (centre, width) of the grey window.
        alpha: the opacity where ``|saliency|`` is 1; it falls linearly to 0 at 0.

    Returns:
        rows x columns x 3, uint8 RGB.
    """
    from matplotlib import colormaps

    centre, width = window
    grey = np.clip((hu - (centre - width / 2.0)) / width, 0.0, 1.0)[..., None]
    s = np.clip(saliency, -1.0, 1.0)
    colour = colormaps["RdBu_r"]((s + 1.0) / 2.0)[..., :3]
    a = alpha * np.abs(s)[..., None]
    return np.round(255.0 * ((1.0 - a) * grey + a * colour)).astype(np.uint8)


def _window(ds: Dataset, default: tuple[float, float]) -> tuple[float, float]:
    """The slice's own first window (WindowCenter/WindowWidth), else ``default``."""
    try:
        centre = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return default
    return (centre, width) if width > 0 else default


def write_blended_series(
    pmap: str | Path,
    series: str | Path,
    out_dir: str | Path,
    *,
    alpha: float = 0.6,
    window: tuple[float, float] | None = None,
    default_window: tuple[float, float] = (40.0, 400.0),
    series_number: int = 901,
) -> list[Path]:
    """Write one colour Secondary Capture per frame of ``pmap`` over the slices of ``series`` into ``out_dir``.

    Args:
        pmap: the Parametric Map file (written by :func:`ppi_med.dicom_overlay.write_parametric_map`).
        series: the folder of the series it references.
        out_dir: the new folder for the images (refused if it exists; written whole or not at all).
        alpha: the saliency's opacity where ``|saliency|`` is 1.
        window: (centre, width) of the grey window; default: each slice's own, else ``default_window``.
        default_window: the window of slices without one (soft tissue).
        series_number: the new series' SeriesNumber.

    Returns:
        The files written, one per map frame, in frame order.

    Raises:
        FileExistsError: ``out_dir`` exists.
        ValueError: ``pmap`` is not a Parametric Map, ``series`` is not the series it references, a frame's
            source slice is missing from it, or ``alpha`` is outside [0, 1].
    """
    import highdicom as hd

    pmap, out_dir = Path(pmap), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; blended images are never written over")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a value in [0, 1]")
    pm = pydicom.dcmread(pmap)
    if str(pm.get("SOPClassUID", "")) != PARAMETRIC_MAP_STORAGE:
        raise ValueError(f"{pmap}: not a Parametric Map (SOP class {pm.get('SOPClassUID', 'missing')})")
    try:
        source = read_source_series(series)
    except DicomSeriesError as err:
        raise ValueError(f"{pmap}: its source series cannot be read: {err}") from err
    referenced = {str(r.SeriesInstanceUID) for r in pm.get("ReferencedSeriesSequence", [])}
    if source.series_uid not in referenced:
        raise ValueError(
            f"{pmap}: references series {sorted(referenced)}, but {source.folder} holds series {source.series_uid}"
        )
    by_uid = {str(ds.SOPInstanceUID): f for ds, f in zip(source.datasets, source.files)}
    n_frames = int(pm.get("NumberOfFrames", 1))
    values = pm.pixel_array.reshape(n_frames, int(pm.Rows), int(pm.Columns)).astype(np.float64)
    mapping = pm.SharedFunctionalGroupsSequence[0].get("RealWorldValueMappingSequence")
    if mapping:  # stored value -> saliency (the identity for the maps written here)
        values = values * float(mapping[0].RealWorldValueSlope) + float(mapping[0].RealWorldValueIntercept)
    map_uid = str(pm.SOPInstanceUID)
    series_uid = generate_uid(entropy_srcs=["ppi-med blend", map_uid])
    description = f"{pm.get('SeriesDescription', 'saliency')} (blended)"[:64]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    written = []
    try:
        for n, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
            src_uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            if src_uid not in by_uid:
                raise ValueError(f"{pmap}: frame {n + 1} lies on slice {src_uid}, which {source.folder} lacks")
            ds = pydicom.dcmread(by_uid[src_uid])
            hu = ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
            rgb = blend_frame(hu, values[n], window or _window(ds, default_window), alpha)
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ds,
                pixel_array=rgb,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=generate_uid(entropy_srcs=["ppi-med blend", map_uid, str(n + 1)]),
                instance_number=n + 1,
                manufacturer="ppi-med",
                pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
                patient_orientation=(_orientation_letters(iop[:3]), _orientation_letters(iop[3:])),
                transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            )
            # the slice's place in the patient, so that viewers sort and place the image like the scan
            sc.ImagePositionPatient = ds.ImagePositionPatient
            sc.ImageOrientationPatient = ds.ImageOrientationPatient
            sc.FrameOfReferenceUID = ds.FrameOfReferenceUID
            sc.SeriesDescription = description
            sc.ImageType = ["DERIVED", "SECONDARY", "SALIENCY"]
            sc.DerivationDescription = "ppi-med saliency (Parametric Map frame) blended over the scan slice"
            slice_ref, map_ref = Dataset(), Dataset()
            slice_ref.ReferencedSOPClassUID, slice_ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            map_ref.ReferencedSOPClassUID, map_ref.ReferencedSOPInstanceUID = pm.SOPClassUID, map_uid
            map_ref.ReferencedFrameNumber = n + 1
            sc.SourceImageSequence = [slice_ref, map_ref]
            path = tmp / f"{n + 1:04d}.dcm"
            sc.save_as(path, enforce_file_format=True)
            written.append(out_dir / path.name)
        os.rename(tmp, out_dir)  # the whole series appears at once, or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written
