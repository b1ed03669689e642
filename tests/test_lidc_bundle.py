"""The LIDC bundle end to end on a small phantom download, through MONAI's CLI, with a real MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from bundle_files import LIDC_BUNDLE, workdir

from data_prep.lidc import preprocess
from data_prep.lidc_phantom import TEST_PATIENTS, TEST_SLICE_STEP, write_phantom

pytestmark = pytest.mark.slow  # each test writes and preprocesses the phantom download; the first trains

ROOT = Path(__file__).resolve().parents[1]


def test_lidc_bundle_trains_on_the_phantom(tmp_path):
    write_phantom(tmp_path / "dicom", TEST_PATIENTS, slice_step=TEST_SLICE_STEP, progress=False)
    datalist = preprocess(
        tmp_path / "dicom", tmp_path / "patches", patients=list(TEST_PATIENTS), folds=2, progress=False
    )
    records = json.loads(datalist.read_text())["training"]
    labelled = [r for r in records if r.get("label") in (0, 1)]
    assert labelled, "the phantom produced no labelled nodule"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(LIDC_BUNDLE),
        "--dataset_dir",
        str(tmp_path / "patches"),
        "--network_def#width",
        "4",
        "--spatial_size",
        "[24,24,24]",
        "--batch_size",
        "4",
        "--max_epochs",
        "2",
        "--ppi#warmup_epochs",
        "0",
        "--runs_dir",
        str(tmp_path / "runs"),
        "--tracking_uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    done = subprocess.run(cmd, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lidc_ppi").experiment_id])
    for key in ("loss_cls", "loss_con", "loss_reg", "loss_ad", "val_auc"):
        assert key in run.data.metrics, f"{key} missing: {sorted(run.data.metrics)}"
    params = run.data.params
    assert params["ppi.w_con"] == "1.0" and params["val_fold"] == "0"
    assert params["test_fold"] == "None" and params["n_test"] == "0" and params["lr_schedule"] == "one_cycle"
    n_val = sum(1 for r in labelled if r["fold"] == 0)
    assert int(params["n_val"]) == n_val and int(params["n_train"]) == len(labelled) - n_val
    assert (next((tmp_path / "runs").iterdir()) / "models" / "model_best.pt").is_file()
    # the comparators run in this bundle too: DFR refits the head of the chosen checkpoint, which the test scores
    dfr = [*cmd, "--ppi#enabled", "false", "--robust#method", "dfr", "--robust#dfr_draws", "2",
           "--selection", "worst_site"]  # fmt: skip
    done = subprocess.run(dfr, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (models,) = (tmp_path / "runs").glob("lidc-dfr-*/models")
    best = torch.load(models / "model_best.pt", map_location="cpu", weights_only=True)
    refit = torch.load(models / "model_dfr.pt", map_location="cpu", weights_only=True)["model"]
    changed = {k for k in best if not torch.equal(best[k], refit[k])}
    assert changed and all(k.startswith(("fc.", "head.", "classifier.")) for k in changed), changed
    oracle = [*cmd, "--selection", "oracle"]
    done = subprocess.run(oracle, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "the LIDC bundle has none" in done.stdout + done.stderr


def test_lidc_outlines_follow_the_images_spatial_transforms(tmp_path):
    """Each nodule outline reaches the PPI step on the image's grid and flipped/rotated with it."""
    import itertools

    import numpy as np
    from monai.utils import set_determinism

    from pipelines.bundle_config import open_config

    write_phantom(tmp_path / "dicom", TEST_PATIENTS, slice_step=TEST_SLICE_STEP, progress=False)
    preprocess(tmp_path / "dicom", tmp_path / "patches", patients=list(TEST_PATIENTS), folds=2, progress=False)
    parser = open_config(LIDC_BUNDLE, {"dataset_dir": str(tmp_path / "patches"), "val_fold": 0})
    records = parser.get_parsed_content("train#datalist")
    fixed = parser.get_parsed_content("preprocessing_transforms") + parser.get_parsed_content(
        "train#outline_transforms"
    )
    random_part = parser.get_parsed_content("train#augmentation")
    assert records and all(r.get("mask") for r in records)

    def spatial_variants(x: np.ndarray):
        for flips in itertools.product((False, True), repeat=3):
            y = x
            for axis, flip in enumerate(flips):
                y = np.flip(y, axis + 1) if flip else y
            for k in range(4):
                yield np.rot90(y, k, axes=(1, 2))

    set_determinism(seed=0)
    checked = 0
    for record in records[:6]:
        base = dict(record)
        for t in fixed:
            base = t(base)
        image0, ann0 = np.asarray(base["image"]), np.asarray(base["annotation"])
        assert bool(base["annotated"]) and ann0.shape == image0.shape and ann0.max() > 0.5
        for _ in range(3):
            out = dict(base)
            for t in random_part:
                out = t(out)
            image1, ann1 = np.asarray(out["image"]), np.asarray(out["annotation"])
            errors = [np.abs(v - image1).mean() for v in spatial_variants(image0)]
            best = int(np.argmin(errors))
            assert errors[best] < 0.02  # the image's own flips and rotation (plus its small noise)
            expected = list(spatial_variants(ann0))[best]
            np.testing.assert_allclose(ann1, expected, atol=1e-6)
            checked += 1
    assert checked == 3 * min(6, len(records))
