"""Vendor OCT files (Heidelberg VOL/E2E/XML, Topcon FDA, Zeiss IMG) through data_prep.oct, built byte by byte here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle_files import GA_BUNDLE, ROOT, workdir
from vendor_oct_files import (
    HEIDELBERG_MM_PER_DEG,
    raster_positions,
    write_e2e,
    write_fda,
    write_heyex_xml,
    write_vol,
)

from data_prep.oct import OCTInputError, build_datalist, main
from data_prep.oct_vendor import check_bscan_positions

SHAPE = (4, 32, 48)  # (V, H, W)
VOL_GEOMETRY = {"scale_x": 0.0114, "scale_y": 0.00387, "distance": 0.123}
E2E_GEOMETRY = {"width_deg": 15.0, "spacing_deg": 0.5, "scale_y": 0.0039}
FDA_GEOMETRY = {"x_mm": 6.0, "y_mm": 4.8, "z_um": 2.6}

needs_eyepy = pytest.mark.skipif(importlib.util.find_spec("eyepy") is None, reason="needs the heidelberg extra")
needs_oct_converter = pytest.mark.skipif(
    importlib.util.find_spec("oct_converter") is None, reason="needs the topcon-zeiss extra"
)


def _display(seed: int, ga: bool = False) -> np.ndarray:
    """8-bit B-scans: layered tissue with speckle; a GA eye has a bright band below a thinned retina."""
    rng = np.random.default_rng(seed)
    n_v, n_h, n_w = SHAPE
    depth = np.linspace(0, 1, n_h)[None, :, None]
    tissue = 60 + 120 * np.exp(-(((depth - 0.45) / 0.12) ** 2)) + rng.normal(0, 12, SHAPE)
    if ga:
        tissue[:, int(0.6 * n_h) :, n_w // 3 : 2 * n_w // 3] += 70
    return np.clip(tissue, 0, 255).astype(np.uint8)


def _zooms(image: Path) -> tuple[float, ...]:
    return tuple(float(z) for z in nib.load(str(image)).header.get_zooms())


def _records(datalist: Path) -> dict[str, dict]:
    return {r["subject"]: r for r in json.loads(datalist.read_text())["training"]}


def _class_dir(root: Path, site: str, label: str) -> Path:
    folder = root / site / label
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- the spacing check, on its own -----------------------------------------------------------------------


def test_regular_raster_gives_its_spacing() -> None:
    starts, ends = raster_positions(5, 6.0, 0.12)
    assert check_bscan_positions("x.vol", starts, ends) == pytest.approx(0.12)
    assert check_bscan_positions("x.vol", starts, ends, nominal=0.121) == 0.121


def test_irregular_spacing_names_file_spacings_and_tolerance() -> None:
    starts, ends = raster_positions(5, 6.0, [0.12, 0.12, 0.24, 0.12])
    with pytest.raises(OCTInputError, match=r"irregular B-scan spacing: .*0\.12, 0\.24 mm.*\+/-5%") as info:
        check_bscan_positions("eye.vol", starts, ends)
    assert info.value.path == Path("eye.vol")


def test_header_spacing_that_positions_contradict_is_refused() -> None:
    starts, ends = raster_positions(5, 6.0, 0.12)
    with pytest.raises(OCTInputError, match=r"0\.2 mm \(stated in the header\)"):
        check_bscan_positions("eye.vol", starts, ends, nominal=0.2)


def test_spacing_tolerance_must_be_a_fraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="spacing_tolerance must be a fraction"):
        build_datalist(tmp_path, tmp_path / "out", spacing_tolerance=5.0, progress=False)
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path), "--out", str(tmp_path / "out"), "--spacing-tolerance", "-0.1"])
    assert "expected a fraction between 0 and 1" in capsys.readouterr().err


def test_fanned_bscans_are_not_parallel() -> None:
    starts, ends = raster_positions(3, 6.0, 0.12)
    ends[2] = (ends[2][0], ends[2][1] + 1.0)
    with pytest.raises(OCTInputError, match="not parallel"):
        check_bscan_positions("eye.vol", starts, ends)


def test_missing_extra_names_file_and_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _class_dir(tmp_path / "in", "A", "GA") / "s1.vol"
    target.write_bytes(b"not read: the package check comes first")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "eyepy" else real_find_spec(name, *a)
    )
    with pytest.raises(
        OCTInputError, match=r"needs the optional package eyepy.*pip install 'ppi-med\[heidelberg\]'"
    ) as info:
        build_datalist(tmp_path / "in", tmp_path / "out", progress=False)
    assert info.value.path == target
    assert not (tmp_path / "out").exists()


def test_extra_that_does_not_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _class_dir(tmp_path / "in", "A", "GA") / "s1.fda"
    target.write_bytes(b"FOCT")
    real_import = importlib.import_module

    def broken(name: str, *args: object) -> object:
        if name.startswith("oct_converter"):
            raise ImportError("libGL.so.1: cannot open shared object file")
        return real_import(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(importlib, "import_module", broken)
    expected = r"oct-converter is installed but does not import \(libGL.*'ppi-med\[topcon-zeiss\]'"
    with pytest.raises(OCTInputError, match=expected) as info:
        build_datalist(tmp_path / "in", tmp_path / "out", progress=False)
    assert info.value.path == target


# --- each format through build_datalist ------------------------------------------------------------------


@needs_eyepy
def test_vol_values_geometry_and_eye(tmp_path: Path) -> None:
    display = _display(1)
    write_vol(_class_dir(tmp_path / "in", "A", "GA") / "s1.vol", display, laterality="OS", **VOL_GEOMETRY)
    rec = _records(build_datalist(tmp_path / "in", tmp_path / "out", progress=False))["s1"]
    assert (rec["laterality"], rec["scan_pattern"], rec["format"]) == ("OS", "volume", "heidelberg-vol")
    image = nib.load(str(tmp_path / "out" / rec["image"]))
    np.testing.assert_array_equal(np.asarray(image.dataobj), display.astype(np.float32))
    g = VOL_GEOMETRY
    assert _zooms(tmp_path / "out" / rec["image"]) == pytest.approx((g["distance"], g["scale_y"], g["scale_x"]))
    assert nib.aff2axcodes(image.affine) == ("I", "P", "R")


@needs_eyepy
def test_e2e_values_geometry_and_eye(tmp_path: Path) -> None:
    display = _display(2)
    write_e2e(_class_dir(tmp_path / "in", "A", "normal") / "s2.e2e", display, laterality="OD", **E2E_GEOMETRY)
    rec = _records(build_datalist(tmp_path / "in", tmp_path / "out", progress=False))["s2"]
    assert (rec["laterality"], rec["scan_pattern"], rec["format"]) == ("OD", "volume", "heidelberg-e2e")
    data = np.asarray(nib.load(str(tmp_path / "out" / rec["image"])).dataobj)
    # Heidelberg's 16-bit float keeps 10 mantissa bits: the display value comes back within one grey level
    assert np.abs(data - display).max() <= 1
    g = E2E_GEOMETRY
    expected = (
        g["spacing_deg"] * HEIDELBERG_MM_PER_DEG,
        g["scale_y"],
        g["width_deg"] / SHAPE[2] * HEIDELBERG_MM_PER_DEG,
    )
    assert _zooms(tmp_path / "out" / rec["image"]) == pytest.approx(expected, rel=1e-6)


@needs_eyepy
def test_heyex_xml_export_folder_is_one_subject(tmp_path: Path) -> None:
    display = _display(3)
    positions = raster_positions(SHAPE[0], SHAPE[2] * 0.0114, 0.25)
    folder = _class_dir(tmp_path / "in", "A", "GA") / "eye7"
    write_heyex_xml(folder, display, scale_x=0.0114, scale_y=0.0039, positions=positions, laterality="OS")
    rec = _records(build_datalist(tmp_path / "in", tmp_path / "out", progress=False))["eye7"]
    assert (rec["laterality"], rec["format"]) == ("OS", "heidelberg-xml")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / rec["image"])).dataobj), display)
    assert _zooms(tmp_path / "out" / rec["image"]) == pytest.approx((0.25, 0.0039, 0.0114))


@pytest.mark.slow  # the first oct-converter import takes about a second
@needs_oct_converter
def test_fda_and_fds_values_geometry_and_eye(tmp_path: Path) -> None:
    bscans = (np.random.default_rng(4).integers(0, 60000, SHAPE)).astype(np.uint16)
    write_fda(_class_dir(tmp_path / "in", "A", "GA") / "s4.fda", bscans, laterality="OS", **FDA_GEOMETRY)
    write_fda(_class_dir(tmp_path / "in", "A", "GA") / "s5.fda", _display(5), jpeg=True, **FDA_GEOMETRY)
    write_fda(_class_dir(tmp_path / "in", "A", "normal") / "s6.fds", bscans[::-1], fds=True, **FDA_GEOMETRY)
    records = _records(build_datalist(tmp_path / "in", tmp_path / "out", progress=False))
    raw, jpeg, fds = records["s4"], records["s5"], records["s6"]
    assert (raw["laterality"], jpeg["laterality"], raw["format"]) == ("OS", "OD", "topcon-fda")
    assert (fds["laterality"], fds["format"], fds["scan_pattern"]) == ("OD", "topcon-fds", "volume")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / raw["image"])).dataobj), bscans)
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / fds["image"])).dataobj), bscans[::-1])
    jpeg_data = np.asarray(nib.load(str(tmp_path / "out" / jpeg["image"])).dataobj)
    assert np.abs(jpeg_data - _display(5)).max() <= 3  # JPEG at quality 100 is near-lossless
    g = FDA_GEOMETRY
    expected = (g["y_mm"] / SHAPE[0], g["z_um"] / 1000, g["x_mm"] / SHAPE[2])
    assert _zooms(tmp_path / "out" / raw["image"]) == pytest.approx(expected)


@pytest.mark.slow
@needs_oct_converter
def test_zeiss_img_size_from_name_and_eye(tmp_path: Path) -> None:
    bscans = _display(6)
    n_v, n_h, n_w = SHAPE
    name = f"P100_Macular Cube {n_w}x{n_v}_5-6-2024_7-8-9_OD_sn1_cube_z.img"
    # headerless 8-bit cube: each A-scan's depth samples in turn, A-scans of a B-scan, then the next B-scan
    (_class_dir(tmp_path / "in", "A", "GA") / name).write_bytes(np.transpose(bscans, (0, 2, 1)).tobytes())
    rec = next(iter(_records(build_datalist(tmp_path / "in", tmp_path / "out", progress=False)).values()))
    assert (rec["laterality"], rec["format"]) == ("OD", "zeiss-img")
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "out" / rec["image"])).dataobj), bscans)
    assert _zooms(tmp_path / "out" / rec["image"]) == pytest.approx((6.0 / n_v, 2.0 / n_h, 6.0 / n_w))


# --- what is refused -------------------------------------------------------------------------------------


@needs_eyepy
def test_irregular_vol_is_refused_and_nothing_written(tmp_path: Path) -> None:
    good = _class_dir(tmp_path / "in", "A", "GA") / "good.vol"
    write_vol(good, _display(7), **VOL_GEOMETRY)
    bad = _class_dir(tmp_path / "in", "A", "normal") / "gappy.vol"
    d = VOL_GEOMETRY["distance"]
    positions = raster_positions(SHAPE[0], 0.5, [d, 2 * d, d])
    write_vol(bad, _display(8), positions=positions, **VOL_GEOMETRY)
    with pytest.raises(OCTInputError, match=r"irregular B-scan spacing: .*0\.123, 0\.246 mm.*\+/-5%") as info:
        build_datalist(tmp_path / "in", tmp_path / "out", progress=False)
    assert info.value.path == bad
    assert not (tmp_path / "out").exists()


@needs_eyepy
def test_irregular_e2e_is_refused(tmp_path: Path) -> None:
    bad = _class_dir(tmp_path / "in", "A", "GA") / "gappy.e2e"
    write_e2e(bad, _display(9), width_deg=15.0, spacing_deg=[0.5, 0.5, 0.8], scale_y=0.0039)
    with pytest.raises(OCTInputError, match="irregular B-scan spacing") as info:
        build_datalist(tmp_path / "in", tmp_path / "out", progress=False)
    assert info.value.path == bad


@needs_eyepy
def test_radial_vol_is_not_a_volume(tmp_path: Path) -> None:
    bad = _class_dir(tmp_path / "in", "A", "GA") / "star.vol"
    write_vol(bad, _display(10), pattern="radial", **VOL_GEOMETRY)
    with pytest.raises(OCTInputError, match="scan pattern 'radial' is not a volume"):
        build_datalist(tmp_path / "in", tmp_path / "out", progress=False)


@pytest.mark.slow
@needs_oct_converter
def test_topcon_cross_scan_and_truncated_file_are_refused(tmp_path: Path) -> None:
    cross = write_fda(tmp_path / "cross.fda", _display(11), scan_mode=4, **FDA_GEOMETRY)
    with pytest.raises(OCTInputError, match="scan pattern 'cross'"):
        build_datalist(_tree_of(tmp_path / "c", cross), tmp_path / "out", progress=False)
    cut = tmp_path / "cut.fda"
    cut.write_bytes(write_fda(tmp_path / "whole.fda", _display(12), **FDA_GEOMETRY).read_bytes()[:500])
    with pytest.raises(OCTInputError, match="truncated file"):
        build_datalist(_tree_of(tmp_path / "t", cut), tmp_path / "out", progress=False)


def _tree_of(root: Path, file: Path) -> Path:
    (_class_dir(root, "A", "GA") / file.name).write_bytes(file.read_bytes())
    return root


# --- end to end: the command line, then the GA bundle ----------------------------------------------------


def _vendor_tree(root: Path, per_class: int = 3) -> dict[str, tuple[str, tuple[float, float, float], str]]:
    """2 sites x {GA, normal} x ``per_class`` eyes, cycling VOL, E2E and FDA.

    Returns:
        subject -> (format, voxel size written into the file, eye).
    """
    expected = {}
    g, e, f = VOL_GEOMETRY, E2E_GEOMETRY, FDA_GEOMETRY
    vol_zooms = (g["distance"], g["scale_y"], g["scale_x"])
    e2e_zooms = (
        e["spacing_deg"] * HEIDELBERG_MM_PER_DEG,
        e["scale_y"],
        e["width_deg"] / SHAPE[2] * HEIDELBERG_MM_PER_DEG,
    )
    fda_zooms = (f["y_mm"] / SHAPE[0], f["z_um"] / 1000, f["x_mm"] / SHAPE[2])
    seed = 100
    for site in ("A", "B"):
        for label in ("GA", "normal"):
            folder = _class_dir(root, site, label)
            for i in range(per_class):
                seed += 1
                eye = "OD" if seed % 2 else "OS"
                display, subject = _display(seed, ga=label == "GA"), f"{site}{label}{i}"
                kind = ("vol", "e2e", "fda")[(seed + i) % 3]
                if kind == "vol":
                    write_vol(folder / f"{subject}.vol", display, laterality=eye, **g)
                    expected[subject] = ("heidelberg-vol", vol_zooms, eye)
                elif kind == "e2e":
                    write_e2e(folder / f"{subject}.e2e", display, laterality=eye, **e)
                    expected[subject] = ("heidelberg-e2e", e2e_zooms, eye)
                else:
                    write_fda(folder / f"{subject}.fda", display.astype(np.uint16) * 200, laterality=eye, **f)
                    expected[subject] = ("topcon-fda", fda_zooms, eye)
    return expected


def _ingest(tmp_path: Path) -> tuple[Path, dict]:
    expected = _vendor_tree(tmp_path / "vendor")
    out = tmp_path / "ingested"
    done = subprocess.run(
        [sys.executable, "-m", "data_prep.oct", "--input", str(tmp_path / "vendor"), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out / "datalist.json", expected


@pytest.mark.slow
@needs_eyepy
@needs_oct_converter
def test_cli_ingests_vol_e2e_and_fda_with_their_geometry(tmp_path: Path) -> None:
    datalist, expected = _ingest(tmp_path)
    records = _records(datalist)
    assert sorted(records) == sorted(expected)
    assert {r["format"] for r in records.values()} == {"heidelberg-vol", "heidelberg-e2e", "topcon-fda"}
    for subject, (fmt, zooms, eye) in expected.items():
        rec = records[subject]
        assert (rec["format"], rec["laterality"], rec["scan_pattern"]) == (fmt, eye, "volume"), subject
        image = datalist.parent / rec["image"]
        assert _zooms(image) == pytest.approx(zooms, rel=1e-6), subject
        assert nib.load(str(image)).shape == SHAPE
        assert rec["label"] == (1 if "GA" in subject else 0)


@pytest.mark.slow
@needs_eyepy
@needs_oct_converter
def test_ga_bundle_trains_an_epoch_on_ingested_vendor_files(tmp_path: Path) -> None:
    datalist, _ = _ingest(tmp_path)
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(GA_BUNDLE),
        "--dataset_dir", str(datalist.parent),
        "--spatial_size", f"[{SHAPE[0]},{SHAPE[1]},{SHAPE[2]}]",
        "--network_def#width", "4",
        "--batch_size", "4",
        "--max_epochs", "1",
        "--runs_dir", str(tmp_path / "runs"),
        "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = list((tmp_path / "runs").iterdir())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_one = {r["key"] for r in logged if r["kind"] == "metric" and r["step"] == 1}
    assert {"loss", "loss_cls", "val_auc"} <= epoch_one, sorted(epoch_one)
    assert (run / "models" / "model_final.pt").is_file()
