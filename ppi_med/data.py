"""Datalists and splits: subject-level, stratified, with held-out sites."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import load_decathlon_datalist

__all__ = ["check_volume_shape", "load_datalist", "split_by_subject", "select_sites", "ga_split", "fold_split"]


def _check_label(path: Path, i: int, rec: dict) -> None:
    """Refuse a raw (as written in the JSON) label that is not the number 0 or 1, naming the record."""
    label = rec["label"]
    where = f"{path}: record {i} ({rec.get('image')})"
    if isinstance(label, bool):
        # JSON true/false: Python would let True pass as 1; a boolean usually means a mis-built datalist
        raise ValueError(f"{where} has the boolean label {json.dumps(label)}; write the number 0 or 1")
    if isinstance(label, str):
        # refused rather than converted: MONAI would read "1" as a path beside the datalist, and a string
        # column usually means the datalist came from a CSV whose other columns need checking too
        raise ValueError(f"{where} has the label {label!r} as a string; write it as the number 0 or 1 (no quotes)")
    if label not in (0, 1):
        raise ValueError(f"{where} has label {label!r}; expected 0 or 1")


def check_volume_shape(image: str | Path, ndim: int = 3) -> None:
    """Refuse a NIfTI file that is not an ``ndim``-D volume (other formats are not checked here).

    Trailing axes of length 1 are allowed (MONAI loads ``(X, Y, Z, 1)`` as a one-channel volume). Only the
    header is read.

    Args:
        image: the file.
        ndim: the spatial dimensionality expected.

    Raises:
        ValueError: the file is not a readable NIfTI, or its shape has another number of axes.
    """
    path = Path(image)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as err:  # nibabel raises several types for a truncated or foreign file
        raise ValueError(f"{path}: not a readable NIfTI file ({err})") from err
    core = list(shape)
    while len(core) > ndim and core[-1] == 1:
        core.pop()
    if len(core) != ndim:
        raise ValueError(
            f"{path}: a {len(core)}D image of shape {shape}; expected a {ndim}D volume "
            + ("(e.g. B-scans x height x width)" if ndim == 3 else "")
        )


def load_datalist(
    path: str | Path,
    key: str = "training",
    required: Sequence[str] = ("image", "label"),
    ndim: int | None = 3,
) -> list[dict]:
    """Read a decathlon-style datalist with paths resolved against its folder, checking every record.

    Args:
        path: the JSON file.
        key: the list to read.
        required: keys every record must have.
        ndim: the dimensionality every NIfTI image must have (header only); ``None`` skips the check.

    Raises:
        FileNotFoundError: no such datalist, or a record's image or mask is missing on disk.
        ValueError: malformed JSON, an empty list, missing keys, a label that is not the number 0 or 1 (a
            string or boolean included), or a NIfTI image that is not ``ndim``-D.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"datalist not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or key not in raw:
        raise ValueError(f"{path}: no '{key}' list in the datalist")
    records = raw[key]
    if not isinstance(records, list):
        raise ValueError(f"{path}: '{key}' is a {type(records).__name__}, not a list of records")
    if not records:
        raise ValueError(f"{path}: the '{key}' list is empty; there is nothing to train or score")
    # checked on the records as written: MONAI's loader turns strings that name an existing path into paths
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, not an object with {list(required)}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing}")
        if "label" in rec:
            _check_label(path, i, rec)
    items = load_decathlon_datalist(path, data_list_key=key, base_dir=path.parent)
    for item, rec in zip(items, records):
        # MONAI turns any value naming an existing path into one: site "A" beside a folder A/ would
        # become ".../A"; site and subject are identifiers, so keep them as written
        for ident in ("site", "subject"):
            if ident in rec:
                item[ident] = rec[ident]
    for i, item in enumerate(items):
        if "image" not in item:
            continue
        if not Path(item["image"]).exists():
            raise FileNotFoundError(f"{path}: record {i} points to a missing image {item['image']}")
        if item.get("mask") and not Path(item["mask"]).exists():
            # read later by PPI's outline guide and the localisation metrics, far from the datalist
            raise FileNotFoundError(f"{path}: record {i} ({item['image']}) points to a missing mask {item['mask']}")
        if ndim is not None:
            try:
                check_volume_shape(item["image"], ndim)
            except ValueError as err:
                raise ValueError(f"{path}: record {i}: {err}") from err
    return items


def select_sites(items: list[dict], sites: Sequence[str] | str | None) -> list[dict]:
    """The records of the given sites (all of them for ``None``/empty)."""
    if not sites:
        return list(items)
    wanted = {sites} if isinstance(sites, str) else set(sites)
    known = {it.get("site") for it in items}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown site(s) {sorted(unknown)}; the datalist has {sorted(s for s in known if s)}")
    return [it for it in items if it.get("site") in wanted]


def split_by_subject(
    items: list[dict], val_fraction: float = 0.25, seed: int = 0, subject_key: str = "subject"
) -> tuple[list[dict], list[dict]]:
    """Split records so that no subject is on both sides, stratified by the subject's label.

    A subject's label is the maximum of its records' labels (a subject with any GA eye counts as GA).

    Args:
        items: records with ``label`` and ``subject_key`` (records without a subject are their own subject).
        val_fraction: share of subjects held out per label.
        seed: shuffling seed.

    Returns:
        ``(train, val)``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    subjects: dict[str, list[dict]] = defaultdict(list)
    for i, it in enumerate(items):
        subjects[str(it.get(subject_key, f"record-{i}"))].append(it)
    by_label: dict[int, list[str]] = defaultdict(list)
    for sid, recs in sorted(subjects.items()):
        by_label[max(int(r["label"]) for r in recs)].append(sid)
    rng = np.random.default_rng(seed)
    val_ids: set[str] = set()
    for label in sorted(by_label):
        ids = by_label[label]
        rng.shuffle(ids)
        n_val = max(1, round(val_fraction * len(ids))) if len(ids) > 1 else 0
        val_ids.update(ids[:n_val])
    train = [r for sid, recs in subjects.items() if sid not in val_ids for r in recs]
    val = [r for sid, recs in subjects.items() if sid in val_ids for r in recs]
    return train, val


def ga_split(
    datalist: str | Path,
    *,
    part: str,
    train_sites: Sequence[str] | str | None = None,
    val_sites: Sequence[str] | str | None = None,
    val_fraction: float = 0.25,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The training, validation or test records of a GA datalist.

    With ``val_sites`` empty, the training sites' subjects are split (stratified, subject-level) into
    training and validation, and first, when ``test_fraction`` > 0, a test part that neither trains nor
    chooses the checkpoint. With ``val_sites`` given, training uses all of ``train_sites`` and validation
    all of ``val_sites`` (a held-out-site experiment, e.g. train on A-C and validate on D); there is no
    test part then.

    Args:
        datalist: path of the datalist JSON.
        part: ``train``, ``val`` or ``test``.
        train_sites: sites to train on (all for ``None``).
        val_sites: held-out sites for validation, or ``None``.
        val_fraction: share of all subjects for validation when no site is held out.
        test_fraction: share of all subjects for the test part (0: none).
        seed: split seed.

    Raises:
        ValueError: a bad ``part``, or fractions that leave nothing to train on.
    """
    if part not in ("train", "val", "test"):
        raise ValueError(f"part must be 'train', 'val' or 'test', got '{part}'")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must leave subjects to train on"
        )
    items = load_datalist(datalist)
    if val_sites:
        held = select_sites(items, val_sites)
        held_names = {it["site"] for it in held}
        train = [it for it in select_sites(items, train_sites) if it.get("site") not in held_names]
        return {"train": train, "val": held, "test": []}[part]
    rest, test = select_sites(items, train_sites), []
    if test_fraction > 0:
        rest, test = split_by_subject(rest, test_fraction, seed)
    train, val = split_by_subject(rest, val_fraction / (1.0 - test_fraction), seed)
    return {"train": train, "val": val, "test": test}[part]


def fold_split(
    datalist: str | Path, *, part: str, val_fold: int = 0, test_fold: int | None = None
) -> list[dict[str, Any]]:
    """The training, validation (``val_fold``) or held-out test (``test_fold``) records of a datalist with folds.

    Training takes every fold but ``val_fold`` and ``test_fold``. With ``test_fold`` ``None`` there is no test
    part (``part="test"`` gives an empty list): the validation fold then both chooses the checkpoint and is
    the only score, which is optimistic.

    Raises:
        ValueError: a bad ``part``, records without a fold, a fold that holds no record, or ``test_fold`` equal
            to ``val_fold``.
    """
    if part not in ("train", "val", "test"):
        raise ValueError(f"part must be 'train', 'val' or 'test', got '{part}'")
    items = load_datalist(datalist)
    missing = [it["image"] for it in items if "fold" not in it]
    if missing:
        raise ValueError(f"{datalist}: {len(missing)} record(s) have no 'fold', e.g. {missing[0]}")
    folds = sorted({int(it["fold"]) for it in items})
    held = [int(val_fold)] + ([] if test_fold is None else [int(test_fold)])
    for name, fold in zip(("validation", "test"), held):
        if fold not in folds:
            raise ValueError(f"{datalist}: {name} fold {fold} holds no record; folds are {folds}")
    if len(set(held)) < len(held):
        raise ValueError(f"{datalist}: the test fold must differ from the validation fold {val_fold}")
    if part == "val":
        return [it for it in items if int(it["fold"]) == int(val_fold)]
    if part == "test":
        return [] if test_fold is None else [it for it in items if int(it["fold"]) == int(test_fold)]
    return [it for it in items if int(it["fold"]) not in held]
