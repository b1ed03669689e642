"""Saliency overlays mapped back onto the original scan (ppi_med.export): geometry checked in world mm.

The saliency "method" in most tests is a function that puts a Gaussian blob on the preprocessed tensor at
the centroid of a bright marker, so the real inverse path (MONAI Invertd over the bundle-style preprocessing)
runs, and the overlay's centroid in scanner mm is compared with the marker's position computed independently
from the DICOM tags or the NIfTI affine.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_files import GA_BUNDLE, SALIENCY, config_list, workdir
from ct_series import write_ct_series
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)
from torch import nn

from ppi_med.cases import case_ids, parse_targets
from ppi_med.data import ga_split
from ppi_med.export import SaliencyExporter, export_saliency
from ppi_med.image_grid import resample_to_grid, voxel_to_world, world_centroid
from ppi_med.montage import montage_slices
from ppi_med.saliency_spec import SaliencySpec
from ppi_med.weights import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


# -- fixtures: sources with awkward geometry ---------------------------------------------------------------


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def _dicom_world_ras(k, r, c, pixel_spacing, step, origin, row_dir, col_dir) -> np.ndarray:
    """The DICOM standard's pixel position (C.7.6.2.1.1), LPS, converted to RAS."""
    normal = np.cross(row_dir, col_dir)
    lps = np.asarray(origin) + k * step * normal + c * pixel_spacing[1] * np.asarray(row_dir)
    lps = lps + r * pixel_spacing[0] * np.asarray(col_dir)
    return lps * LPS_TO_RAS


def _ct_preprocessing(size=(16, 16, 16), pixdim=(1.0, 1.0, 1.0)) -> Compose:
    """The LIDC bundle's patch preprocessing, small."""
    return Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=pixdim, mode="bilinear"),
            ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
            ResizeWithPadOrCropd("image", spatial_size=size),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )


def _ga_preprocessing(size=(4, 32, 48)) -> Compose:
    """The GA bundle's preprocessing."""
    return Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            Resized("image", spatial_size=size, mode="area"),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )


def blob_at_marker(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A fake saliency method: a Gaussian blob (sigma 1.5 voxels) at the centroid of the input's bright marker."""
    v = x[0, 0].detach()
    w = torch.where(v > 0.5 * v.max(), v, torch.zeros_like(v)).double()
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in v.shape], indexing="ij"))
    centre = (idx * w).flatten(1).sum(1) / w.sum()
    d2 = ((idx - centre[:, None, None, None]) ** 2).sum(0)
    return torch.exp(-d2 / (2 * 1.5**2)).float()[None, None].expand_as(x).clone()


class MeanNet(nn.Module):
    """Two logits from the mean intensity: enough for the export's forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=tuple(range(1, x.ndim)))[:, None])


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
    return path


def _marker_volume(shape, centre, background=-1000.0, value=800.0) -> np.ndarray:
    """A CT-like volume: air with a 3x3x1-voxel (or smaller at the edges) bright marker around ``centre``."""
    vol = np.full(shape, background, dtype=np.float32)
    sl = tuple(slice(max(c - h, 0), c + h + 1) for c, h in zip(centre, (1, 1, 0)))
    vol[sl] = value
    return vol


def _read_index(index: Path) -> list[dict]:
    with open(index, newline="") as fh:
        return list(csv.DictReader(fh))


# -- the inverse path, in world coordinates ----------------------------------------------------------------


def test_dicom_series_overlay_lands_on_the_marker(tmp_path):
    # oblique (rotated 20 deg about the patient axis), anisotropic (0.7 x 0.9 mm pixels, 2.5 mm slices)
    row_dir = np.array([np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20)), 0.0])
    col_dir = np.array([0.0, 0.0, -1.0])
    geo = {
        "pixel_spacing": (0.7, 0.9),
        "step": 2.5,
        "origin": (12.5, -40.0, 88.0),
        "row_dir": row_dir,
        "col_dir": col_dir,
    }
    vol = np.full((6, 14, 12), -1000, dtype=np.int16)
    marker = (3, 6, 8)  # slice, row, column
    vol[marker] = 900
    vol[3, 5:8, 7:10] = 900
    # written out of order: the reader must sort by position
    write_ct_series(tmp_path / "series", vol, **geo, order=[3, 0, 5, 1, 4, 2], name="img{n:03d}.dcm")
    expected = np.mean([_dicom_world_ras(3, r, c, **geo) for r in range(5, 8) for c in range(7, 10)], axis=0)

    out = tmp_path / "out"
    spec = SaliencySpec(MeanNet(), _ct_preprocessing(), str(tmp_path / "series"), methods=blob_at_marker)
    index = export_saliency(spec, out, montage=True)
    row = _read_index(index)[0]
    image, overlay = nib.load(row["image"]), nib.load(row["overlay"])
    # the DICOM series comes with a NIfTI of itself; both share one grid
    assert Path(row["image"]) == out / "series" / "image.nii.gz"
    assert overlay.shape == image.shape and np.allclose(overlay.affine, image.affine)
    assert sorted(image.shape) == [6, 12, 14]
    # the NIfTI copy of the series is right on its own: the marker voxel sits where the DICOM tags say
    ijk = np.linalg.solve(image.affine, np.r_[_dicom_world_ras(*marker, **geo), 1.0])[:3]
    assert np.allclose(ijk, np.round(ijk), atol=1e-3)
    assert image.get_fdata()[tuple(np.round(ijk).astype(int))] == 900
    # and the overlay's blob is on the marker, in scanner mm, within a voxel
    centroid = world_centroid(np.asarray(overlay.dataobj), overlay.affine)
    assert np.linalg.norm(centroid - expected) < 0.9, (centroid, expected)
    assert row["peak_ras_mm"] and Path(row["montage"]).stat().st_size > 1000


@pytest.mark.parametrize(
    "name, affine",
    [
        ("flipped", np.array([[-0.8, 0, 0, 30.0], [0, 1.2, 0, -12.0], [0, 0, -3.0, 40.0], [0, 0, 0, 1]])),
        (
            "oblique",
            np.block(
                [
                    [
                        _rotation("x", 25) @ _rotation("z", -35) @ np.diag([0.6, 0.9, 2.0]),
                        np.array([[5.0], [-7.5], [3.0]]),
                    ],
                    [np.zeros((1, 3)), np.ones((1, 1))],
                ]
            ),
        ),
        # permuted axes as an OCT file has them (B-scan -> inferior, depth -> posterior, lateral -> right)
        ("permuted", np.array([[0, 0, 0.9, 1.0], [0, -0.7, 0, 2.0], [-2.2, 0, 0, 3.0], [0, 0, 0, 1]])),
    ],
)
def test_nifti_overlay_keeps_the_header_and_lands_on_the_marker(tmp_path, name, affine):
    shape, marker = (18, 14, 9), (11, 4, 6)
    src = _save_nifti(tmp_path / f"{name}.nii.gz", _marker_volume(shape, marker), affine)
    index = export_saliency(SaliencySpec(MeanNet(), _ct_preprocessing(), src, methods=blob_at_marker), tmp_path / "out")
    row = _read_index(index)[0]
    original, overlay = nib.load(src), nib.load(row["overlay"])
    # the source is copied into the export (a review page reads only there), header and values unchanged
    copy = nib.load(row["image"])
    assert row["source"] == str(src) and Path(row["image"]) == tmp_path / "out" / name / "image.nii.gz"
    assert np.array_equal(copy.get_fdata(), original.get_fdata()) and np.allclose(copy.affine, original.affine)
    assert int(copy.header["sform_code"]) == int(original.header["sform_code"])
    assert overlay.shape == original.shape
    assert np.allclose(overlay.affine, original.affine)
    assert np.allclose(overlay.header.get_qform(), original.header.get_qform())
    assert int(overlay.header["qform_code"]) == int(original.header["qform_code"]) == 1
    assert int(overlay.header["sform_code"]) == int(original.header["sform_code"]) == 1
    data = np.asarray(overlay.dataobj)
    assert data.dtype == np.float32 and np.isclose(np.abs(data).max(), 1.0)  # normalised
    # the marker's centre, in world mm from the file's own affine
    expected = voxel_to_world(affine, np.array([marker[0], marker[1], marker[2]], dtype=float))
    got = world_centroid(data, overlay.affine)
    assert np.linalg.norm(got - expected) < np.linalg.norm(affine[:3, :3], axis=0).max(), (got, expected)


@pytest.mark.parametrize("interp", ["linear", "nearest", "trace"])
def test_ga_style_resize_is_inverted_onto_the_oct_grid(tmp_path, interp):
    """The GA preprocessing (percentile scaling + area Resize to another size) on an OCT-style affine."""
    oct_affine = np.array([[0, 0, 0.011, 0], [0, -0.0039, 0, 0], [-0.1, 0, 0, 0], [0, 0, 0, 1]])
    shape, marker = (6, 40, 30), (2, 25, 9)
    vol = np.zeros(shape, dtype=np.float32)
    vol[1:4, 23:28, 7:12] = 1.0
    src = _save_nifti(tmp_path / "eye.nii.gz", vol, oct_affine)
    spec = SaliencySpec(MeanNet(), _ga_preprocessing(), src, methods=blob_at_marker)
    index = export_saliency(spec, tmp_path / "out", interp=interp, montage=False)
    overlay = nib.load(_read_index(index)[0]["overlay"])
    assert overlay.shape == shape and np.allclose(overlay.affine, oct_affine)
    got = world_centroid(np.asarray(overlay.dataobj), overlay.affine)
    expected = voxel_to_world(oct_affine, np.array(marker, dtype=float))
    # within a voxel along each axis
    assert np.all(np.abs(got - expected) <= np.array([0.011, 0.0039, 0.1]) + 1e-9), (got, expected)


def test_patch_overlay_is_placed_in_the_whole_scan(tmp_path):
    """A 1 mm patch of a 0.7 x 0.7 x 2.5 mm scan: the overlay re-sampled into the scan lands on the nodule."""
    nodule_ras = np.array([-20.0, 14.0, -31.0])
    scan_affine = np.array([[-0.7, 0, 0, 10.0], [0, -0.7, 0, 40.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    scan_shape = (64, 60, 24)
    patch_affine = np.eye(4)
    patch_affine[:3, 3] = nodule_ras - 7.5  # a 16 mm cube centred on the nodule
    patch_shape = (16, 16, 16)

    def ball(shape, affine):  # the nodule drawn from world coordinates on any grid
        idx = np.indices(shape).reshape(3, -1).T
        d = np.linalg.norm(voxel_to_world(affine, idx) - nodule_ras, axis=1)
        return np.where(d < 3.0, 50.0, -900.0).reshape(shape).astype(np.float32)

    scan = _save_nifti(tmp_path / "scan.nii.gz", ball(scan_shape, scan_affine), scan_affine)
    patch = _save_nifti(tmp_path / "patch.nii.gz", ball(patch_shape, patch_affine), patch_affine)
    record = {"image": str(patch), "scan_image": str(scan), "label": 1, "patient_id": "LIDC-0001", "nodule_index": 2}
    spec = SaliencySpec(MeanNet(), _ct_preprocessing(size=(16, 16, 16)), [record], methods=blob_at_marker)
    index = export_saliency(spec, tmp_path / "out")
    row = _read_index(index)[0]
    assert row["case_id"] == "LIDC-0001_nodule2"
    assert row["scan_image"] == str(tmp_path / "out" / "scans" / "scan.nii.gz")
    assert np.array_equal(nib.load(row["scan_image"]).get_fdata(), nib.load(scan).get_fdata())  # copied as it is
    placed = nib.load(row["scan_overlay"])
    assert placed.shape == scan_shape and np.allclose(placed.affine, scan_affine)
    data = np.asarray(placed.dataobj)
    got = world_centroid(data, scan_affine)
    assert np.linalg.norm(got - nodule_ras) < 1.0, got
    # zeros outside the patch's footprint: every non-zero voxel lies inside the 16 mm cube
    nz = voxel_to_world(scan_affine, np.argwhere(data != 0))
    lo, hi = patch_affine[:3, 3] - 0.5, patch_affine[:3, 3] + 15.5
    assert np.all((nz >= lo - 1e-6) & (nz <= hi + 1e-6))
    assert (data == 0).mean() > 0.9


def test_resample_to_grid_places_a_voxel_exactly():
    src_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    src_aff[:3, 3] = [10, 20, 30]
    src = np.zeros((3, 3, 3), np.float32)
    src[1, 2, 0] = 5.0  # world (12, 24, 30)
    dst_aff = np.eye(4)
    dst_aff[:3, 3] = 0.25  # 1 mm voxels centred off the source's voxel borders
    out = resample_to_grid(src, src_aff, (40, 40, 40), dst_aff, order=0)
    # the 2 mm voxel spans [11, 13] x [23, 25] x [29, 31] mm: the 1 mm voxels centred at 11.25 and 12.25, ...
    assert out[11:13, 23:25, 29:31].tolist() == np.full((2, 2, 2), 5.0).tolist() and out.sum() == 5.0 * 8
    linear = resample_to_grid(src, src_aff, (40, 40, 40), dst_aff, order=1)
    assert linear[:9].sum() == 0 and linear[16:].sum() == 0 and linear[:, 26:].sum() == 0


# -- outputs, index, refusal to overwrite ------------------------------------------------------------------


def test_two_targets_index_and_no_overwrite(tmp_path):
    shape = (18, 14, 9)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    src = _save_nifti(tmp_path / "a.nii.gz", _marker_volume(shape, (9, 7, 4)), affine)
    mask = np.zeros(shape, np.uint8)
    mask[7:12, 5:10, 3:6] = 1
    mask_path = _save_nifti(tmp_path / "a_mask.nii.gz", mask, affine)
    out = tmp_path / "out"
    net = MeanNet()
    rec = {"image": str(src), "mask": str(mask_path), "label": 1}
    two = SaliencySpec(net, _ct_preprocessing(), [rec], methods="input_x_gradient", targets=["predicted", 1])
    index = export_saliency(two, out)
    rows = _read_index(index)
    assert [r["target"] for r in rows] == ["predicted", "1"]
    with torch.no_grad():
        x = _ct_preprocessing()({"image": str(src)})["image"].as_tensor()[None]
        p = torch.softmax(net(x), 1)[0]
    assert int(rows[0]["predicted_class"]) == int(p.argmax()) == int(rows[0]["target_class"])
    assert rows[1]["target_class"] == "1" and float(rows[1]["prob_target"]) == pytest.approx(float(p[1]), abs=1e-5)
    assert {Path(r["overlay"]).name for r in rows} == {"input_x_gradient_pred.nii.gz", "input_x_gradient_class1.nii.gz"}
    for r in rows:
        assert Path(r["montage"]).is_file() and Path(r["montage"]).stat().st_size < 300_000
        assert r["view_command"] == f"itksnap -g {out / 'a' / 'image.nii.gz'} -o {r['overlay']}"
        # the mask is copied beside the overlay (for the review page's outline), as 0/1 on the image's grid
        assert r["mask"] == str(out / "a" / "mask.nii.gz") and r["dicom_overlay"] == ""
        assert np.array_equal(np.asarray(nib.load(r["mask"]).dataobj), mask)
    meta = json.loads((out / "export.json").read_text())
    assert meta["methods"] == ["input_x_gradient"] and meta["targets"] == ["predicted", "1"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="index.csv"):
        export_saliency(two, out)
    (out / "index.csv").rename(tmp_path / "moved.csv")
    with pytest.raises(FileExistsError, match="a/image.nii.gz"):
        export_saliency(SaliencySpec(net, _ct_preprocessing(), [rec], methods="input_x_gradient"), out)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert {p: t for p, t in before.items() if p.name != "index.csv"} == after


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        export_saliency(
            SaliencySpec(MeanNet(), _ct_preprocessing(), [{"image": str(tmp_path / "nothere.nii.gz")}]), tmp_path / "o"
        )
    bad = tmp_path / "bad.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(MeanNet(), bad)
    with pytest.raises(ValueError, match="unknown target"):
        parse_targets(["predicted", "best"])
    assert parse_targets(["predicted", "1", 1]) == ["predicted", 1]
    src = _save_nifti(tmp_path / "a.nii.gz", _marker_volume((8, 8, 4), (4, 4, 2)), np.eye(4))
    with pytest.raises(ValueError, match="no label"):
        export_saliency(
            SaliencySpec(MeanNet(), _ct_preprocessing(), src, methods=blob_at_marker, targets="label"), tmp_path / "o2"
        )
    with pytest.raises(ValueError, match="no checkpoint"):
        SaliencySpec(MeanNet(), _ct_preprocessing(), src, require_checkpoint=True)


def test_a_spatial_step_outside_the_trace_is_caught(tmp_path):
    """A crop MONAI cannot invert (a plain function) leaves the map off the source grid: an error, not a
    silently shifted overlay."""
    from monai.transforms import Lambdad

    pre = Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Lambdad("image", func=lambda t: t[:, 2:, :, :]),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )
    src = _save_nifti(tmp_path / "a.nii.gz", _marker_volume((12, 8, 4), (6, 4, 2)), np.eye(4))
    with pytest.raises(ValueError, match="does not land on the source grid|could not be fully inverted"):
        SaliencyExporter(SaliencySpec(MeanNet(), pre, src, methods=blob_at_marker), montage=False).run(tmp_path / "o")


def test_montage_slices_always_include_the_peak():
    assert montage_slices(0, 8) == [0, 1, 2] and montage_slices(7, 8) == [5, 6, 7]
    assert montage_slices(50, 128) == [29, 50, 71] and montage_slices(126, 128) == [85, 106, 126]
    assert montage_slices(0, 1) == [0] and montage_slices(1, 2) == [0, 1]


def test_case_ids_are_unique_and_safe():
    recs = [
        {"image": "/d/A/A-000_img.nii.gz"},
        {"image": "/e/A/A-000_img.nii.gz"},
        {"image": "/x/series 1"},
        {"image": "/y.nii", "case_id": "eye/left"},
    ]
    assert case_ids(recs) == ["A-000_img", "A-000_img-2", "series_1", "eye_left"]


# -- the GA bundle's export run id, through MONAI's CLI ----------------------------------------------------


@pytest.mark.slow
def test_ga_bundle_export_run(tmp_path):
    from ppi_med.networks import MVCNN

    ckpt = tmp_path / "model_best.pt"
    torch.manual_seed(0)
    torch.save(MVCNN(width=4).state_dict(), ckpt)
    out = tmp_path / "export"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "export",
        "--config_file", config_list(GA_BUNDLE, SALIENCY),
        "--default_dataset_dir", str(tmp_path / "data"), "--dataset_dir", str(tmp_path / "data"),
        "--synthetic#sites", "['A']", "--synthetic#subjects_per_site", "4", "--synthetic#n_bscans", "4",
        "--synthetic#height", "32", "--synthetic#width", "48", "--synthetic#cue_site", "A",
        "--spatial_size", "[4,32,48]", "--network_def#width", "4", "--network_def#feature_pool", "max",
        "--runs_dir", str(tmp_path / "runs"),
        "--checkpoint", str(ckpt), "--export_dir", str(out), "--export_target", "['predicted',1]",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _read_index(out / "index.csv")
    # by default the bundle's validation records, each with the two targets asked for
    val = ga_split(tmp_path / "data" / "datalist.json", part="val", val_fraction=0.25, seed=0)
    assert len(val) >= 2 and [r["source"] for r in rows] == [v["image"] for v in val for _ in range(2)]
    assert {r["method"] for r in rows} == {"wbp"} and [r["target"] for r in rows] == ["predicted", "1"] * len(val)
    for r, v in zip(rows, [v for v in val for _ in range(2)]):
        assert r["label"] == str(v["label"])
        src, ov = nib.load(r["source"]), nib.load(r["overlay"])
        assert ov.shape == src.shape and np.allclose(ov.affine, src.affine)
        assert np.abs(np.asarray(ov.dataobj)).max() == pytest.approx(1.0)
        assert Path(r["montage"]).is_file()
    # the overlay is the checkpoint's WBP map brought back to the source grid (here the grids coincide)
    net = load_checkpoint(MVCNN(width=4, feature_pool="max"), ckpt).eval()
    from ppi_med.saliency import compute

    x = _ga_preprocessing((4, 32, 48))({"image": rows[1]["source"]})["image"].as_tensor()[None]
    s = compute("wbp", net, x, torch.tensor([1]))[0, 0].numpy()
    ov = np.asarray(nib.load(rows[1]["overlay"]).dataobj)
    assert np.allclose(ov, s / np.abs(s).max(), atol=1e-4)


def test_a_checkpoint_of_another_network_names_the_file_and_the_keys(tmp_path):
    from ppi_med.networks import MVCNN
    from ppi_med.weights import CheckpointMismatchError

    wide = tmp_path / "wide.pt"
    torch.save({"model": MVCNN(width=8).state_dict(), "optimizer": {}}, wide)
    net = MVCNN(width=4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"wide.pt: checkpoint does not fit MVCNN") as err:
        load_checkpoint(net, wide)
    msg = str(err.value)
    assert "shape in checkpoint vs network:" in msg and "(8, 1, 7, 7) vs (4, 1, 7, 7)" in msg
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # nothing half-loaded
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 3), "head.weight": torch.zeros(2, 3)}, other)
    with pytest.raises(
        CheckpointMismatchError, match=r"other.pt: .*missing from the checkpoint: backbone.conv1.weight, "
    ) as err:
        load_checkpoint(net, other)
    assert f"({len(before) - 1} in all)" in str(err.value) and "not in the network: fc.weight" in str(err.value)
    assert "head.weight (2, 3) vs (2, 32)" in str(err.value)
    # a pickled object is refused (weights only), with the file named
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": MVCNN(width=4)}, pickled)
    with pytest.raises(ValueError, match=r"pickled.pt: not a readable weights-only torch checkpoint"):
        load_checkpoint(net, pickled)


def test_a_2d_or_4d_image_is_refused_before_anything_is_written(tmp_path):
    flat = _save_nifti(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"case 0: .*flat.nii.gz: a 2D image of shape \(16, 16\)"):
        export_saliency(
            SaliencySpec(MeanNet(), _ct_preprocessing(), [flat], methods="input_x_gradient"), tmp_path / "out"
        )
    series = _save_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"series.nii.gz: a 4D image of shape \(8, 8, 8, 2\)"):
        export_saliency(
            SaliencySpec(MeanNet(), _ct_preprocessing(), series, methods="input_x_gradient"), tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()
