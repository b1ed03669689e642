"""Subject-level GA splits: two-way as before, and the three-way split (train / checkpoint selection / test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ppi_med.data import ga_split


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
    for r in records:  # the loader checks that every image exists
        (tmp_path / r["image"]).parent.mkdir(exist_ok=True)
        (tmp_path / r["image"]).touch()
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
