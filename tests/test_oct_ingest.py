"""Tests of real-OCT ingestion (data_prep.oct): every format round-trips, every bad file is named."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data_prep.oct import DEFAULT_SPACING, OCTInputError, build_datalist, main, read_volume
from data_prep.oct_nifti import oct_affine, save_oct_nifti

SHAPE = (4, 10, 12)  # (V, H, W)
OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage


def _volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, size=shape).astype(np.uint16)


def write_dicom(
    path: Path,
    volume: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.0039, 0.0117),
    between: float = 0.12,
    functional_groups: bool = True,
) -> Path:
    """Write a multi-frame Ophthalmic Tomography DICOM whose frames are the B-scans of ``volume``."""
    frames, rows, cols = volume.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = OPT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = OPT_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OPT"
    ds.PatientID = "P001"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    if functional_groups:
        measures = Dataset()
        measures.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        measures.SliceThickness = f"{between:g}"
        group = Dataset()
        group.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([group])
    else:
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        ds.SliceThickness = f"{between:g}"
    ds.PixelData = np.ascontiguousarray(volume, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mat(path: Path, volume: np.ndarray, key: str = "images") -> Path:
    """Duke layout: (H, W, V), B-scans along the last axis."""
    scipy.io.savemat(str(path), {key: np.transpose(volume, (1, 2, 0)), "Age": 71})
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, dict[tuple[str, str], np.ndarray]]:
    """One file of each format across two sites and both classes."""
    root = tmp_path / "in"
    vols = {key: _volume(i) for i, key in enumerate([("A", "s1"), ("A", "s2"), ("B", "s3"), ("B", "s4"), ("B", "s5")])}
    (root / "A" / "GA").mkdir(parents=True)
    (root / "A" / "normal").mkdir(parents=True)
    (root / "B" / "ga").mkdir(parents=True)
    (root / "B" / "Normal").mkdir(parents=True)
    save_oct_nifti(vols[("A", "s1")], oct_affine((0.1, 0.004, 0.01)), root / "A" / "GA" / "s1.nii.gz", np.float32)
    np.save(root / "A" / "normal" / "s2.npy", vols[("A", "s2")])
    write_dicom(root / "B" / "ga" / "s3.dcm", vols[("B", "s3")])
    write_mat(root / "B" / "Normal" / "s4.mat", vols[("B", "s4")])
    save_oct_nifti(vols[("B", "s5")], oct_affine((0.07, 0.0039, 0.007)), root / "B" / "ga" / "s5.nii", np.float32)
    (root / "A" / "GA" / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    return root, vols


EXPECTED = {
    ("A", "s1"): (1, (0.1, 0.004, 0.01)),
    ("A", "s2"): (0, DEFAULT_SPACING),
    ("B", "s3"): (1, (0.12, 0.0039, 0.0117)),
    ("B", "s4"): (0, DEFAULT_SPACING),
    ("B", "s5"): (1, (0.07, 0.0039, 0.007)),
}


def _check_output(out: Path, datalist: Path, vols: dict, expected: dict) -> None:
    dl = json.loads(datalist.read_text())
    assert datalist == out / "datalist.json"
    assert dl["labels"] == {"0": "no GA", "1": "GA"}
    assert dl["sites"] == ["A", "B"]
    assert dl["numTraining"] == len(dl["training"]) == len(vols)
    for e in dl["training"]:
        key = (e["site"], e["subject"])
        label, spacing = expected[key]
        assert e["label"] == label
        assert e["image"] == f"images/{e['site']}/{e['subject']}.nii.gz"
        assert Path(e["source"]).is_absolute() and Path(e["source"]).is_file()
        img = nib.load(str(out / e["image"]))
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.float32
        np.testing.assert_array_equal(data, vols[key].astype(np.float32))
        np.testing.assert_allclose(img.header.get_zooms(), spacing, rtol=1e-5)
        assert nib.aff2axcodes(img.affine) == ("I", "P", "R")


def test_folder_tree_every_format(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, vols = tree
    out = tmp_path / "out"
    datalist = build_datalist(root, out, progress=False)
    _check_output(out, datalist, vols, EXPECTED)


def test_csv_input_and_custom_spacing(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, vols = tree
    csv_path = root / "list.csv"
    rows = ["path,label,site,subject,eye"]
    rows += ["A/GA/s1.nii.gz,1,A,s1,OD", "A/normal/s2.npy,normal,A,s2,OS", "B/ga/s3.dcm,GA,B,s3,OD"]
    rows += [f"{root / 'B' / 'Normal' / 's4.mat'},0,B,s4,OD", "B/ga/s5.nii,1,B,s5,OS"]
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out_csv"
    spacing = (0.2, 0.005, 0.02)
    datalist = build_datalist(csv_path, out, spacing=spacing, progress=False)
    expected = {k: (lab, spacing if sp == DEFAULT_SPACING else sp) for k, (lab, sp) in EXPECTED.items()}
    _check_output(out, datalist, vols, expected)


def test_dicom_spacing_at_top_level_and_rescale(tmp_path: Path) -> None:
    vol = _volume(9)
    path = write_dicom(tmp_path / "v.dcm", vol, pixel_spacing=(0.0035, 0.006), between=0.06, functional_groups=False)
    data, affine = read_volume(path)
    np.testing.assert_array_equal(data, vol.astype(np.float32))
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), (0.06, 0.0035, 0.006))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-5"
    ds.save_as(path)
    data, _ = read_volume(path)
    np.testing.assert_allclose(data, vol.astype(np.float32) * 2 - 5)


def test_cli_writes_datalist(tree: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, vols = tree
    out = tmp_path / "cli"
    assert main(["--input", str(root), "--out", str(out), "--spacing", "0.06,0.0039,0.006"]) == 0
    assert f"datalist: {out / 'datalist.json'}" in capsys.readouterr().out
    _check_output(out, out / "datalist.json", vols, EXPECTED)
    assert main(["--input", str(root), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_rerun_refuses_without_overwrite_and_keeps_other_files(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, vols = tree
    out = tmp_path / "out"
    datalist = build_datalist(root, out, progress=False)
    (out / "notes.txt").write_text("mine")
    (out / "images" / "old.nii.gz").write_bytes(b"old")
    before = datalist.read_bytes()
    with pytest.raises(OCTInputError, match="datalist already exists") as info:
        build_datalist(root, out, progress=False)
    assert info.value.path == out.resolve() / "datalist.json"
    assert datalist.read_bytes() == before
    build_datalist(root, out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "images" / "old.nii.gz").read_bytes() == b"old"
    _check_output(out, datalist, vols, EXPECTED)


def test_existing_image_without_datalist_is_not_overwritten(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tree
    out = tmp_path / "out"
    (out / "images" / "A").mkdir(parents=True)
    (out / "images" / "A" / "s1.nii.gz").write_bytes(b"user")
    with pytest.raises(OCTInputError, match="output image already exists"):
        build_datalist(root, out, progress=False)
    assert (out / "images" / "A" / "s1.nii.gz").read_bytes() == b"user"


def test_varying_shapes_refused_unless_allowed(tree: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = tree
    odd = root / "B" / "Normal" / "s6.npy"
    np.save(odd, _volume(20, (4, 10, 14)))
    with pytest.raises(OCTInputError, match=r"shape \(4, 10, 14\) differs from \(4, 10, 12\)") as info:
        build_datalist(root, tmp_path / "out", progress=False)
    assert info.value.path == odd
    assert not (tmp_path / "out").exists()  # nothing written when an input is bad
    datalist = build_datalist(root, tmp_path / "out", allow_varying_shape=True, progress=False)
    assert json.loads(datalist.read_text())["numTraining"] == 6


def _bad_tree(tmp_path: Path, name: str, writer) -> Path:
    """A valid two-file tree plus one bad file at A/GA/<name>."""
    root = tmp_path / "bad"
    (root / "A" / "GA").mkdir(parents=True)
    (root / "A" / "normal").mkdir(parents=True)
    np.save(root / "A" / "normal" / "ok.npy", _volume(1))
    target = root / "A" / "GA" / name
    writer(target)
    return target


def _fake_v73_mat(path: Path) -> None:
    # A MATLAB 7.3 header (version 0x0200, little-endian 'IM') followed by bytes that are not HDF5.
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM"
    path.write_bytes(header + b"\0" * 512)


def _non_finite() -> np.ndarray:
    vol = _volume(2).astype(np.float64)
    vol[0, 0, :2] = np.nan
    vol[1, 2, 3] = -np.inf
    return vol


def _single_frame_dicom(path: Path) -> None:
    write_dicom(path, _volume(3, (1, 10, 12)))


BAD_FILES = [
    ("corrupt.nii.gz", lambda p: p.write_bytes(b"this is not a nifti file"), "unreadable or corrupt"),
    ("corrupt.dcm", lambda p: p.write_bytes(b"\0" * 10), "unreadable or corrupt"),
    ("corrupt.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "unreadable or corrupt"),
    ("flat.npy", lambda p: np.save(p, _volume(2, (10, 12))), r"wrong dimensionality.*\(10, 12\)"),
    ("four_d.npy", lambda p: np.save(p, _volume(2, (4, 10, 12, 3))), r"wrong dimensionality.*\(4, 10, 12, 3\)"),
    ("nan.npy", lambda p: np.save(p, _non_finite()), "non-finite values: 2 NaN and 1 infinite"),
    ("huge.npy", lambda p: np.save(p, _volume(2) * 1e300), "0 NaN and 0 infinite, 480 beyond the float32 range"),
    ("const.npy", lambda p: np.save(p, np.full(SHAPE, 3.0)), "constant volume: every voxel equals 3.0"),
    ("thin.npy", lambda p: np.save(p, _volume(2, (1, 10, 12))), r"degenerate shape \(1, 10, 12\)"),
    ("text.npy", lambda p: np.save(p, np.full(SHAPE, "a")), "unsupported data type"),
    ("scan.png", lambda p: p.write_bytes(b"\x89PNG"), "unknown extension '.png'"),
    ("single.dcm", _single_frame_dicom, r"single-frame DICOM with shape \(10, 12\)"),
    ("nokey.mat", lambda p: write_mat(p, _volume(2), key="volume"), r"no 'images' variable.*\['Age', 'volume'\]"),
    (
        "flat.mat",
        lambda p: scipy.io.savemat(str(p), {"images": np.ones((10, 12)) * np.arange(12)}),
        "wrong dimensionality",
    ),
]


@pytest.mark.parametrize(("name", "writer", "problem"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_names_file_and_problem(tmp_path: Path, name: str, writer, problem: str) -> None:
    target = _bad_tree(tmp_path, name, writer)
    out = tmp_path / "out"
    with pytest.raises(OCTInputError, match=problem) as info:
        build_datalist(target.parents[2], out, progress=False)
    assert info.value.path == target
    assert str(target) in str(info.value)
    assert not out.exists()


def test_v73_mat_without_h5py_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # h5py arrives with the vendor-oct extra; a machine without it must still get the explanation
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "h5py" else real_find_spec(name, *a)
    )
    target = _bad_tree(tmp_path, "v73.mat", _fake_v73_mat)
    with pytest.raises(OCTInputError, match="v7.3 .*h5py") as info:
        build_datalist(target.parents[2], tmp_path / "out", progress=False)
    assert info.value.path == target
    assert not (tmp_path / "out").exists()


def test_v73_mat_reads_through_h5py(tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    vol = _volume(9)
    path = tmp_path / "duke73.mat"
    with h5py.File(path, "w", userblock_size=512) as fh:
        fh["images"] = np.transpose(vol, (0, 2, 1))  # MATLAB's (H, W, V) as HDF5 stores it: (V, W, H)
    _fake_v73_header = path.read_bytes()
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 ."
    header = header.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM"
    path.write_bytes(header.ljust(512, b"\0") + _fake_v73_header[512:])
    data, _ = read_volume(path)
    np.testing.assert_array_equal(data, vol.astype(np.float32))


def test_file_outside_class_folder_is_missing_label(tmp_path: Path) -> None:
    target = _bad_tree(tmp_path, "x.npy", lambda p: np.save(p, _volume(1)))
    stray = target.parents[1] / "loose.npy"
    np.save(stray, _volume(5))
    with pytest.raises(OCTInputError, match="missing label") as info:
        build_datalist(target.parents[2], tmp_path / "out", progress=False)
    assert info.value.path == stray


def test_unknown_class_folder_is_missing_label(tmp_path: Path) -> None:
    target = _bad_tree(tmp_path, "x.npy", lambda p: np.save(p, _volume(1)))
    other = target.parents[1] / "maybe"
    other.mkdir()
    with pytest.raises(OCTInputError, match="missing label: unknown class folder 'maybe'") as info:
        build_datalist(target.parents[2], tmp_path / "out", progress=False)
    assert info.value.path == other


def test_duplicate_subject(tmp_path: Path) -> None:
    target = _bad_tree(tmp_path, "ok.mat", lambda p: write_mat(p, _volume(4)))
    with pytest.raises(OCTInputError, match="duplicate subject 'ok' at site 'A'") as info:
        build_datalist(target.parents[2], tmp_path / "out", progress=False)
    assert info.value.path.name in {"ok.mat", "ok.npy"}


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("v.npy,,A,s1", "row 2: missing label"),
        ("v.npy,maybe,A,s1", "row 2: invalid label 'maybe'"),
        ("v.npy,1,,s1", "row 2: missing site"),
        ("missing.npy,1,A,s1", "file not found"),
    ],
)
def test_bad_csv_rows(tmp_path: Path, row: str, problem: str) -> None:
    np.save(tmp_path / "v.npy", _volume(1))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,site,subject\n" + row + "\n")
    with pytest.raises(OCTInputError, match=problem) as info:
        build_datalist(csv_path, tmp_path / "out", progress=False)
    expected = tmp_path / "missing.npy" if "missing.npy" in row else csv_path
    assert info.value.path == expected


def test_csv_missing_column_and_duplicates(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", _volume(1))
    np.save(tmp_path / "w.npy", _volume(2))
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,subject\nv.npy,1,s1\n")
    with pytest.raises(OCTInputError, match=r"missing CSV column\(s\) \['site'\]"):
        build_datalist(csv_path, tmp_path / "out", progress=False)
    csv_path.write_text("path,label,site,subject\nv.npy,1,A,s1\nw.npy,0,A,s1\n")
    with pytest.raises(OCTInputError, match="duplicate subject 's1' at site 'A'") as info:
        build_datalist(csv_path, tmp_path / "out", progress=False)
    assert info.value.path == tmp_path / "w.npy"


def test_empty_or_missing_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(OCTInputError, match="no volumes found"):
        build_datalist(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(OCTInputError, match="input not found"):
        build_datalist(tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_output_inside_input_tree_is_refused(tree: tuple[Path, dict]) -> None:
    root, _ = tree
    with pytest.raises(OCTInputError, match="inside the input tree"):
        build_datalist(root, root / "converted", progress=False)
