"""Subject-level GA splits: two-way as before, and the three-way split (train / checkpoint selection / test)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ppi_med.data import ga_split, load_datalist


@pytest.fixture()
def datalist(tmp_path: Path) -> Path:
    # 2 sites x 20 subjects, two eyes each, half of the subjects GA
    records = [
        {
            "image": f"{site}/{site}-{s:02d}-{eye}.nii.gz",
            "label": int(s % 2),
            "site": site,
            "subject": f"{site}-{s:02d}",
        }
        for site in ("A", "B")
        for s in range(20)
        for eye in ("OD", "OS")
    ]
    volume = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    for r in records:  # the loader checks that every image exists and is a 3D NIfTI
        (tmp_path / r["image"]).parent.mkdir(exist_ok=True)
        nib.save(volume, tmp_path / r["image"])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": records}))
    return path


def _subjects(records: list[dict]) -> set[str]:
    return {r["subject"] for r in records}


def test_three_way_split_is_a_stratified_subject_partition(datalist: Path) -> None:
    parts = {
        p: ga_split(datalist, part=p, train_sites=["A"], val_fraction=0.25, test_fraction=0.25, seed=3)
        for p in ("train", "val", "test")
    }
    subjects = {p: _subjects(r) for p, r in parts.items()}
    # per label (10 subjects): test round(2.5) = 2, validation round(8 x 0.25 / 0.75) = 3
    assert [len(subjects[p]) for p in ("train", "val", "test")] == [10, 6, 4]
    assert not (subjects["train"] & subjects["val"]) and not (subjects["test"] & (subjects["train"] | subjects["val"]))
    assert subjects["train"] | subjects["val"] | subjects["test"] == {f"A-{s:02d}" for s in range(20)}
    for p in ("val", "test"):  # both labels in each held-out part, and both eyes of a subject together
        assert {r["label"] for r in parts[p]} == {0, 1}
        assert len(parts[p]) == 2 * len(subjects[p])


def test_without_a_test_fraction_the_split_is_the_two_way_one(datalist: Path) -> None:
    two = ga_split(datalist, part="val", val_fraction=0.25, seed=1)
    again = ga_split(datalist, part="val", val_fraction=0.25, test_fraction=0.0, seed=1)
    assert two == again
    assert ga_split(datalist, part="test", val_fraction=0.25, seed=1) == []
    # a held-out site has no test part
    assert ga_split(datalist, part="test", train_sites=["A"], val_sites=["B"], test_fraction=0.25) == []


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.25, 1.0), (0.25, -0.1)])
def test_fractions_that_leave_nothing_to_train_on_are_refused(datalist: Path, val: float, test: float) -> None:
    with pytest.raises(ValueError, match="must leave subjects to train on"):
        ga_split(datalist, part="train", val_fraction=val, test_fraction=test)
    with pytest.raises(ValueError, match="part must be"):
        ga_split(datalist, part="holdout")


# ----- bad datalists: each refused with the file and the record named ------------------------------------


def _write(tmp_path: Path, records: list, name: str = "datalist.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"training": records}))
    return path


def _volume(path: Path, shape: tuple[int, ...]) -> str:
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    return path.name


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("1", r"record 1 \(b.nii.gz\) has the label '1' as a string; write it as the number 0 or 1"),
        (True, r"record 1 \(b.nii.gz\) has the boolean label true; write the number 0 or 1"),
        (False, r"record 1 \(b.nii.gz\) has the boolean label false"),
        (2, r"record 1 \(b.nii.gz\) has label 2; expected 0 or 1"),
    ],
)
def test_a_label_that_is_not_the_number_0_or_1_is_named(tmp_path: Path, label, message: str) -> None:
    a, b = _volume(tmp_path / "a.nii.gz", (2, 2, 2)), _volume(tmp_path / "b.nii.gz", (2, 2, 2))
    (tmp_path / "1").mkdir()  # MONAI would read the string "1" as this folder
    path = _write(tmp_path, [{"image": a, "label": 0}, {"image": b, "label": label}])
    with pytest.raises(ValueError, match=message) as err:
        load_datalist(path)
    assert str(path) in str(err.value)


def test_an_empty_datalist_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, [], "empty.json")
    with pytest.raises(ValueError, match=r"empty.json: the 'training' list is empty"):
        load_datalist(path)
    with pytest.raises(ValueError, match=r"empty.json: the 'training' list is empty"):
        ga_split(path, part="train")
    path.write_text(json.dumps({"training": {"image": "a.nii.gz"}}))
    with pytest.raises(ValueError, match=r"empty.json: 'training' is a dict, not a list"):
        load_datalist(path)


@pytest.mark.parametrize("shape", [(8, 8), (4, 8, 8, 3), (4, 8, 8, 2, 1)])
def test_a_2d_or_4d_nifti_is_named_with_its_shape(tmp_path: Path, shape: tuple[int, ...]) -> None:
    good = _volume(tmp_path / "good.nii.gz", (4, 8, 8))
    bad = _volume(tmp_path / "odd.nii.gz", shape)
    path = _write(tmp_path, [{"image": good, "label": 0}, {"image": bad, "label": 1}])
    core = len(shape) - (1 if shape[-1] == 1 else 0)
    with pytest.raises(ValueError, match="record 1: .*odd.nii.gz: " + re.escape(f"a {core}D image of shape {shape}")):
        load_datalist(path)


def test_a_trailing_axis_of_length_1_loads_as_a_volume(tmp_path: Path) -> None:
    one = _volume(tmp_path / "one.nii.gz", (4, 8, 8, 1))
    items = load_datalist(_write(tmp_path, [{"image": one, "label": 1}]))
    assert len(items) == 1 and items[0]["label"] == 1


def test_an_unreadable_nifti_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    path = _write(tmp_path, [{"image": "broken.nii.gz", "label": 0}])
    with pytest.raises(ValueError, match=r"broken.nii.gz: not a readable NIfTI file"):
        load_datalist(path)


def test_fold_split_keeps_a_held_out_test_fold(tmp_path):
    import json

    from ppi_med.data import fold_split

    records = [{"image": f"img{i}.nii.gz", "label": i % 2, "fold": i % 4} for i in range(16)]
    for rec in records:
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / rec["image"])
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": records}))
    train = fold_split(path, part="train", val_fold=0, test_fold=1)
    val = fold_split(path, part="val", val_fold=0, test_fold=1)
    test = fold_split(path, part="test", val_fold=0, test_fold=1)
    assert {r["fold"] for r in train} == {2, 3} and {r["fold"] for r in val} == {0} and {r["fold"] for r in test} == {1}
    assert len(train) + len(val) + len(test) == 16
    assert fold_split(path, part="test", val_fold=0) == []
    assert {r["fold"] for r in fold_split(path, part="train", val_fold=0)} == {1, 2, 3}
    with pytest.raises(ValueError, match="test fold must differ"):
        fold_split(path, part="train", val_fold=1, test_fold=1)
    with pytest.raises(ValueError, match="test fold 7 holds no record"):
        fold_split(path, part="test", val_fold=0, test_fold=7)


def test_a_record_pointing_to_a_missing_mask_is_named(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    rec = {"image": "a.nii.gz", "mask": "a_mask.nii.gz", "label": 1}
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [rec]}))
    with pytest.raises(FileNotFoundError, match=r"record 0 .*a\.nii\.gz.* missing mask .*a_mask\.nii\.gz"):
        load_datalist(tmp_path / "datalist.json")
