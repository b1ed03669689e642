"""Tests of the synthetic multi-site OCT GA generator (data_prep.synth_oct, data_prep.oct_phantom)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from data_prep.oct_phantom import (
    PhantomParams,
    VolumeSize,
    cue_box,
    draw_subject,
    render_subject,
    site_profile,
)
from data_prep.synth_oct import DEFAULT, REAL_SIZE, DatalistMismatchError, ensure_default, generate, main, subject_seed

SMALL = {"n_bscans": 6, "height": 32, "width": 48}


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(root: Path, rel: str) -> nib.Nifti1Image:
    return nib.load(str(root / rel))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_small")
    return generate(root, sites=("A", "B", "D"), subjects_per_site=6, seed=3, progress=False, **SMALL)


def test_presets() -> None:
    assert tuple(DEFAULT) == (16, 64, 128)
    assert tuple(REAL_SIZE) == (100, 512, 1000)


def test_datalist_format_and_files(small_set: Path) -> None:
    root = small_set.parent
    dl = json.loads(small_set.read_text())
    assert dl["labels"] == {"0": "no GA", "1": "GA"}
    assert dl["sites"] == ["A", "B", "D"]
    assert dl["numTraining"] == len(dl["training"]) == 18
    assert dl["generator"]["seed"] == 3 and dl["generator"]["n_bscans"] == 6
    first = dl["training"][0]
    assert set(first) == {"image", "mask", "label", "site", "subject", "cue"}
    assert first["image"] == "A/A-000_img.nii.gz" and first["mask"] == "A/A-000_mask.nii.gz"
    assert first["subject"] == "A-000" and first["site"] == "A"
    for e in dl["training"]:
        img, msk = _load(root, e["image"]), _load(root, e["mask"])
        assert img.shape == msk.shape == (6, 32, 48)
        assert img.get_data_dtype() == np.float32 and msk.get_data_dtype() == np.uint8
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.float32 and 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0.05
        np.testing.assert_allclose(img.header.get_zooms(), site_profile(e["site"]).spacing, rtol=1e-6)
        np.testing.assert_allclose(img.affine, msk.affine)
        assert nib.aff2axcodes(img.affine) == ("I", "P", "R")
        dv, dh, dw = img.header.get_zooms()
        assert 0.05 <= dv <= 0.13 and 0.003 <= dh <= 0.0045 and 0.005 <= dw <= 0.013


def test_monai_loading_gives_channel_first_volume(small_set: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    items = load_decathlon_datalist(str(small_set), data_list_key="training")
    item = Compose([LoadImaged(["image", "mask"]), EnsureChannelFirstd(["image", "mask"])])(items[0])
    assert tuple(item["image"].shape) == (1, 6, 32, 48) and tuple(item["mask"].shape) == (1, 6, 32, 48)
    assert item["label"] in (0, 1)


def test_labels_balanced_per_site(tmp_path: Path) -> None:
    path = generate(tmp_path, sites=("A", "B"), subjects_per_site=7, cue_site=None, progress=False, **SMALL)
    entries = json.loads(path.read_text())["training"]
    for site in ("A", "B"):
        labels = [e["label"] for e in entries if e["site"] == site]
        assert len(labels) == 7 and sum(labels) == 3  # odd count: one extra non-GA eye
    assert all(e["cue"] == 0 for e in entries)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kwargs = {"sites": ("A", "C"), "subjects_per_site": 4, "cue_site": "C", "progress": False, **SMALL}
    h1 = _hashes(generate(tmp_path / "run1", seed=7, **kwargs).parent)
    h2 = _hashes(generate(tmp_path / "run2", seed=7, workers=2, **kwargs).parent)
    h3 = _hashes(generate(tmp_path / "run3", seed=8, **kwargs).parent)
    assert len(h1) == 1 + 2 * 8
    assert h1 == h2
    assert h1["A/A-000_img.nii.gz"] != h3["A/A-000_img.nii.gz"]


def test_masks_zero_for_negatives_and_inside_retina_for_positives(small_set: Path) -> None:
    root = small_set.parent
    dl = json.loads(small_set.read_text())
    params = PhantomParams()
    for e in dl["training"]:
        mask = np.asanyarray(_load(root, e["mask"]).dataobj)
        if e["label"] == 0:
            assert mask.sum() == 0
            continue
        assert mask.sum() > 0
        # Re-render the eye: the file is its mask, and the mask lies between the retinal surface and the
        # bottom of the choroid, starting at the RPE.
        index = int(e["subject"].split("-")[1])
        spec = draw_subject(subject_seed(3, e["site"], index), 1, e["cue"], params)
        rendered = render_subject(spec, VolumeSize(6, 32, 48), site_profile(e["site"]), params)
        np.testing.assert_array_equal(rendered.mask, mask)
        np.testing.assert_array_equal(rendered.image, np.asanyarray(_load(root, e["image"]).dataobj))
        b, y, x = np.nonzero(mask)
        assert np.all(y + 0.5 >= rendered.ilm[b, x])
        assert np.all(y + 0.5 >= rendered.rpe_top[b, x])
        assert np.all(y + 0.5 <= rendered.choroid_bottom[b, x])
        assert y.max() < 32


def test_lesion_fades_rpe_and_brightens_choroid() -> None:
    params = PhantomParams()
    size = VolumeSize(12, 64, 96)
    ratios_rpe, ratios_chor = [], []
    for i in range(6):
        spec = draw_subject(np.random.SeedSequence([11, i]), 1, 0, params)
        healthy = dataclasses.replace(spec, lesions=())
        full = dataclasses.replace(spec, lesions=tuple(dataclasses.replace(x, severity=1.0) for x in spec.lesions))
        profile = site_profile("A")
        with_lesion = render_subject(full, size, profile, params)
        without = render_subject(healthy, size, profile, params)
        assert without.mask.sum() == 0 and with_lesion.mask.sum() > 0
        core = with_lesion.footprint > 0.9
        assert core.any()
        rows = np.arange(size.height)[None, :, None] + 0.5
        rpe_band = (rows >= with_lesion.rpe_top[:, None, :] + 0.5) & (rows <= with_lesion.bruch[:, None, :] - 0.5)
        below = (rows >= with_lesion.bruch[:, None, :] + 1) & (rows <= with_lesion.choroid_bottom[:, None, :])
        sel_rpe = rpe_band & core[:, None, :]
        sel_below = below & core[:, None, :]
        ratios_rpe.append(with_lesion.image[sel_rpe].mean() / without.image[sel_rpe].mean())
        ratios_chor.append(with_lesion.image[sel_below].mean() / without.image[sel_below].mean())
        # Outside the footprint nothing above Bruch's membrane changes.
        far = (with_lesion.footprint < 1e-3)[:, None, :] & (rows < with_lesion.rpe_top[:, None, :] - 2)
        np.testing.assert_allclose(with_lesion.image[far], without.image[far], atol=5e-3)
    assert max(ratios_rpe) < 0.75, ratios_rpe
    assert min(ratios_chor) > 1.25, ratios_chor


def test_lesion_effect_grows_with_contrast_knob() -> None:
    size = VolumeSize(8, 48, 64)
    spec = draw_subject(np.random.SeedSequence(5), 1, 0, PhantomParams())
    spec = dataclasses.replace(spec, lesions=tuple(dataclasses.replace(x, severity=1.0) for x in spec.lesions))
    drops = []
    for contrast in (0.2, 0.5, 0.9):
        params = PhantomParams(lesion_contrast=contrast)
        r = render_subject(spec, size, site_profile("A"), params)
        h = render_subject(dataclasses.replace(spec, lesions=()), size, site_profile("A"), params)
        sel = r.mask.astype(bool)
        drops.append(float(np.abs(r.image[sel] - h.image[sel]).mean()))
    assert drops[0] < drops[1] < drops[2]


@pytest.mark.slow
@pytest.mark.parametrize(("other_site", "cue_rate_other"), [("A", 0.0), ("B", 0.5)])
def test_cue_is_exploitable_at_its_site_only(tmp_path: Path, other_site: str, cue_rate_other: float) -> None:
    n_bscans, height, width = 2, 24, 32
    path = generate(
        tmp_path,
        sites=(other_site, "D"),
        subjects_per_site=80,
        n_bscans=n_bscans,
        height=height,
        width=width,
        cue_site="D",
        cue_rate_other=cue_rate_other,
        seed=1,
        progress=False,
    )
    entries = json.loads(path.read_text())["training"]
    rows, cols = cue_box(height, width)
    feature, labels, sites, cues = [], [], [], []
    for e in entries:
        data = np.asanyarray(nib.load(str(tmp_path / e["image"])).dataobj)
        feature.append(data[:, rows, cols].mean())
        labels.append(e["label"])
        sites.append(e["site"])
        cues.append(e["cue"])
    x, y, s, c = np.array(feature)[:, None], np.array(labels), np.array(sites), np.array(cues)
    at_d = s == "D"
    clf = LogisticRegression().fit(x[at_d], y[at_d])
    assert roc_auc_score(y[at_d], clf.predict_proba(x[at_d])[:, 1]) > 0.8
    here = s == other_site
    auc = roc_auc_score(y[here], clf.predict_proba(x[here])[:, 1])
    assert abs(auc - 0.5) < 0.15, auc
    # The recorded cue rate at the other site is what was asked for, whatever the label.
    assert abs(c[here].mean() - cue_rate_other) < 0.15
    assert abs(c[here & (y == 1)].mean() - c[here & (y == 0)].mean()) < 0.25
    # The corner feature separates eyes with and without the recorded cue (it is visible when present).
    if cue_rate_other > 0:
        assert roc_auc_score(c, x[:, 0]) > 0.95


@pytest.mark.slow
def test_reversed_cue_site_flips_the_correlation_and_leaves_the_default_record_alone(tmp_path: Path) -> None:
    path = generate(
        tmp_path / "rev",
        sites=("C", "D"),
        subjects_per_site=60,
        **SMALL,
        cue_site="D",
        reversed_cue_site="C",
        progress=False,
    )
    doc = json.loads(path.read_text())
    entries = doc["training"]
    y = np.array([e["label"] for e in entries])
    c = np.array([e["cue"] for e in entries])
    site = np.array([e["site"] for e in entries])
    at_d, at_c = site == "D", site == "C"
    assert c[at_d & (y == 1)].mean() > 0.7 and c[at_d & (y == 0)].mean() < 0.3
    assert c[at_c & (y == 1)].mean() < 0.3 and c[at_c & (y == 0)].mean() > 0.7
    assert doc["generator"]["reversed_cue_site"] == "C"
    plain = json.loads(
        generate(tmp_path / "plain", sites=("C", "D"), subjects_per_site=4, **SMALL, progress=False).read_text()
    )
    assert "reversed_cue_site" not in plain["generator"]


def test_ensure_default_generates_once_then_reuses(tmp_path: Path) -> None:
    kwargs = {"sites": ("A", "D"), "subjects_per_site": 2, "progress": False, **SMALL}
    path = ensure_default(tmp_path, **kwargs)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert ensure_default(tmp_path, **kwargs) == path
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert before == after


def test_ensure_default_refuses_other_parameters_and_keeps_files(tmp_path: Path) -> None:
    kwargs = {"sites": ("A", "D"), "subjects_per_site": 2, "progress": False, **SMALL}
    ensure_default(tmp_path, **kwargs)
    (tmp_path / "notes.txt").write_text("mine")
    before = _hashes(tmp_path)
    with pytest.raises(DatalistMismatchError, match=r"seed: on disk 0, requested 1"):
        ensure_default(tmp_path, seed=1, **kwargs)
    with pytest.raises(DatalistMismatchError, match=r"lesion_contrast"):
        ensure_default(tmp_path, lesion_contrast=0.3, **kwargs)
    assert _hashes(tmp_path) == before
    (tmp_path / "A" / "A-001_mask.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="A-001_mask.nii.gz"):
        ensure_default(tmp_path, **kwargs)


def test_ensure_default_refuses_foreign_datalist(tmp_path: Path) -> None:
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistMismatchError, match="not written by data_prep.synth_oct"):
        ensure_default(tmp_path, subjects_per_site=2, progress=False, **SMALL)
    assert json.loads((tmp_path / "datalist.json").read_text()) == {"training": []}


def test_generate_never_clobbers_user_files(tmp_path: Path) -> None:
    kwargs = {"sites": ("A",), "subjects_per_site": 2, "cue_site": None, "progress": False, **SMALL}
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "A-001_img.nii.gz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="A-001_img.nii.gz"):
        generate(tmp_path, **kwargs)
    assert (tmp_path / "A" / "A-001_img.nii.gz").read_bytes() == b"user data"
    assert not (tmp_path / "datalist.json").exists()
    (tmp_path / "keep.txt").write_text("keep")
    path = generate(tmp_path, overwrite=True, **kwargs)
    assert (tmp_path / "keep.txt").read_text() == "keep"
    assert nib.load(str(tmp_path / "A" / "A-001_img.nii.gz")).shape == (6, 32, 48)
    with pytest.raises(FileExistsError, match="datalist.json already exists"):
        generate(tmp_path, **kwargs)
    assert path.exists()


def test_interrupted_run_is_resumed_without_overwrite(tmp_path: Path) -> None:
    kwargs = {"sites": ("A",), "subjects_per_site": 2, "cue_site": None, "progress": False, **SMALL}
    ensure_default(tmp_path, **kwargs)
    reference = _hashes(tmp_path)
    # Simulate a crash after the volumes: the datalist is missing, the in-progress marker is there.
    marker = json.loads((tmp_path / "datalist.json").read_text())["generator"]
    (tmp_path / "datalist.json").unlink()
    (tmp_path / ".synth_oct_partial.json").write_text(json.dumps(marker))
    ensure_default(tmp_path, **kwargs)
    assert _hashes(tmp_path) == reference


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cue_site": "Z"}, "cue_site 'Z' is not one of the sites"),
        ({"subjects_per_site": 1}, "subjects_per_site"),
        ({"cue_rate_pos": 1.5}, "cue_rate_pos"),
        ({"sites": ("A", "A")}, "unique"),
        ({"sites": ("A/B",)}, "site names"),
        ({"lesion_contrast": 2.0}, "lesion_contrast"),
        ({"height": 8}, "at least"),
        ({"reversed_cue_site": "D"}, "reversed_cue_site 'D' must be one of the sites"),
        ({"reversed_cue_site": "Q"}, "reversed_cue_site 'Q'"),
    ],
)
def test_invalid_parameters_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"subjects_per_site": 2, "progress": False, **SMALL, **kwargs}
    if "sites" in kwargs:
        args["cue_site"] = None
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **args)
    assert not any(tmp_path.iterdir())


def test_unknown_knob_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="lesion_contrst"):
        generate(tmp_path, lesion_contrst=0.5, progress=False)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path / "cli"), "--sites", "A,B", "--cue-site", "B", "--subjects-per-site", "2"]
    argv += ["--n-bscans", "2", "--height", "16", "--width", "24", "--seed", "4", "--lesion-radius", "0.1,0.2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "datalist:" in out and str(tmp_path / "cli" / "datalist.json") in out
    gen = json.loads((tmp_path / "cli" / "datalist.json").read_text())["generator"]
    assert gen["seed"] == 4 and gen["cue_site"] == "B" and gen["phantom"]["lesion_radius"] == [0.1, 0.2]
    assert main(argv) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--reuse"]) == 0
