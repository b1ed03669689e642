"""Saliency as a DICOM Parametric Map over the source series (ppi_med.dicom_overlay), read back with pydicom.

The LIDC test writes a phantom of the TCIA download (real UIDs and slice positions, every 3rd slice), runs the
real preprocessing (whose records name their DICOM series) and the real export, and checks the map against the
series' own files: each frame's position, orientation, pixel spacing and size equal those of the slice it names
as its source, and it shares the series' study, frame of reference and patient.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from ct_series import write_ct_series
from monai.transforms import Compose, EnsureTyped, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd
from pydicom.uid import generate_uid
from review_export import LesionNet

from data_prep.lidc import preprocess
from data_prep.lidc_phantom import TEST_PATIENTS, TEST_SLICE_STEP, write_phantom
from ppi_med.data import load_datalist
from ppi_med.dicom_overlay import DicomSeriesError, read_source_series, slice_affine_ras, write_parametric_map
from ppi_med.export import export_saliency
from ppi_med.image_grid import read_source, resample_to_grid
from ppi_med.saliency_spec import SaliencySpec

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


@pytest.fixture(scope="module")
def lidc(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("lidc")
    write_phantom(root / "dicom", TEST_PATIENTS[:1], slice_step=TEST_SLICE_STEP, progress=False)
    datalist = preprocess(root / "dicom", root / "patches", patients=list(TEST_PATIENTS[:1]), progress=False)
    return root, load_datalist(datalist)


def _frames_match_their_source_slices(pm: pydicom.Dataset, series_folder: Path) -> dict[str, pydicom.Dataset]:
    """Assert the geometry of every frame against the slice it derives from; return the series by SOP UID."""
    source = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in sorted(series_folder.glob("*.dcm")))}
    first = next(iter(source.values()))
    assert pm.SOPClassUID == PARAMETRIC_MAP
    assert pm.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert pm.StudyInstanceUID == first.StudyInstanceUID and pm.PatientID == first.PatientID
    assert pm.SeriesInstanceUID != first.SeriesInstanceUID
    (ref,) = pm.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert (pm.Rows, pm.Columns) == (first.Rows, first.Columns)
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert np.allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in first.ImageOrientationPatient],
    )
    assert np.allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in first.PixelSpacing]
    )
    assert int(pm.NumberOfFrames) == len(pm.PerFrameFunctionalGroupsSequence) >= 1
    for frame in pm.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        src = source[uid]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        orientation = frame.get("PlaneOrientationSequence", shared.PlaneOrientationSequence)[0]
        assert np.allclose([float(v) for v in orientation.ImageOrientationPatient], src.ImageOrientationPatient)
    return source


@pytest.mark.slow
def test_lidc_export_writes_a_parametric_map_on_the_scans_series(lidc, tmp_path):
    root, records = lidc
    rec = records[0]
    assert Path(rec["scan_dicom"]).is_dir()  # the preprocessing names the series behind scan_image
    preprocessing = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=(2.0, 2.0, 2.0), mode="bilinear"),
            ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )
    out = tmp_path / "export"
    spec = SaliencySpec(LesionNet(), preprocessing, [rec], methods="input_x_gradient", progress=False)
    index = export_saliency(spec, out, montage=False)
    with open(index, newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["dicom_overlay"].endswith("input_x_gradient_pred_in_scan.dcm")
    pm = pydicom.dcmread(row["dicom_overlay"])
    source = _frames_match_their_source_slices(pm, Path(rec["scan_dicom"]))
    # the frames are the in-scan overlay at the slices' own pixels: compare with the NIfTI, voxel by voxel
    placed = nib.load(row["scan_overlay"])
    values = np.asarray(placed.dataobj, dtype=np.float32)
    pixels = pm.pixel_array.reshape(int(pm.NumberOfFrames), pm.Rows, pm.Columns)
    for n, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        expected = resample_to_grid(
            values, placed.affine, (pm.Columns, pm.Rows, 1), slice_affine_ras(source[uid]), order=1
        )[:, :, 0].T
        assert np.allclose(pixels[n], expected, atol=1e-6)
    # every slice the overlay reaches is a frame, and the map's values are the overlay's
    reached = sum(
        np.any(resample_to_grid(values, placed.affine, (pm.Columns, pm.Rows, 1), slice_affine_ras(ds), order=1) != 0)
        for ds in source.values()
    )
    assert int(pm.NumberOfFrames) == reached < len(source)
    assert np.isclose(np.abs(pixels).max(), np.abs(values).max(), atol=1e-6)


@pytest.mark.slow
def test_the_scan_written_as_a_map_gives_back_each_slices_pixels(lidc, tmp_path):
    """The strongest geometry check: the scan itself (NIfTI, MONAI's reading of the series) written as a map
    must reproduce every slice's stored HU, pixel for pixel, in the frame that names that slice."""
    root, records = lidc
    folder = Path(records[0]["scan_dicom"])
    scan = read_source(folder)
    path = write_parametric_map(tmp_path / "scan.dcm", scan.array + 2000.0, scan.affine, folder, description="hu")
    pm = pydicom.dcmread(path)
    source = _frames_match_their_source_slices(pm, folder)
    assert int(pm.NumberOfFrames) == len(source)  # non-zero everywhere: one frame per slice
    pixels = pm.pixel_array
    for n, frame in enumerate(pm.PerFrameFunctionalGroupsSequence):
        src = source[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        hu = src.pixel_array * float(src.RescaleSlope) + float(src.RescaleIntercept)
        assert np.allclose(pixels[n], hu + 2000.0, atol=1e-2)


def test_an_oblique_series_and_bad_series_are_handled(tmp_path):
    c, s = np.cos(np.deg2rad(25)), np.sin(np.deg2rad(25))
    row_dir, col_dir = np.array([c, s, 0.0]), np.array([0.0, c, -s])  # tilted about two axes
    folder = tmp_path / "series"
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(5, 12, 10)).astype(np.int16)
    write_ct_series(
        folder,
        vol,
        pixel_spacing=(0.7, 0.9),
        step=2.5,
        origin=(-20.0, 5.0, 30.0),
        row_dir=row_dir,
        col_dir=col_dir,
        order=(3, 0, 4, 1, 2),  # written out of order
        name="s{k}.dcm",
    )
    scan = read_source(folder)
    pm = pydicom.dcmread(write_parametric_map(tmp_path / "m.dcm", scan.array + 5000.0, scan.affine, folder))
    source = _frames_match_their_source_slices(pm, folder)
    for n, f in enumerate(pm.PerFrameFunctionalGroupsSequence):
        src = source[str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert np.allclose(pm.pixel_array[n], src.pixel_array + 5000.0, atol=1e-2)
    with pytest.raises(FileExistsError, match="m.dcm"):
        write_parametric_map(tmp_path / "m.dcm", scan.array, scan.affine, folder)
    far = scan.affine.copy()
    far[:3, 3] += 500.0  # another place in the patient frame
    with pytest.raises(DicomSeriesError, match="does not reach any slice"):
        write_parametric_map(tmp_path / "far.dcm", scan.array, far, folder)
    ds = pydicom.dcmread(folder / "s0.dcm")
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(folder / "s9.dcm", enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match="holds 2 series"):
        read_source_series(folder)
    with pytest.raises(DicomSeriesError, match="no DICOM image slice"):
        read_source_series(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
    assert not (tmp_path / "far.dcm").exists()
