"""Saliency evaluation (ppi_med.evaluation): deletion and localisation on hand-made maps with known values,
and the driver (CSV, plots, MLflow) over a tiny synthetic GA set, directly and through the bundle's run id."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from bundle_files import GA_BUNDLE, SALIENCY
from monai.transforms import Compose, EnsureTyped, LoadImaged, ScaleIntensityRangePercentilesd
from torch import nn

from ppi_med.evaluation import (
    DEFAULT_THRESHOLDS,
    best_dice,
    delete_topk,
    deletion_probabilities,
    dice_at,
    evaluate_saliency,
    localisation,
    pointing_hit,
    resolve_k,
    share_inside,
)
from ppi_med.networks import MVCNN
from ppi_med.saliency import METHODS, compute
from ppi_med.saliency_spec import SaliencySpec

ROOT = Path(__file__).resolve().parents[1]


class SumNet(nn.Module):
    """logit 1 = a * sum(x), logit 0 = 0, so p(class 1) = sigmoid(a * sum(x)): deletion has a closed form."""

    def __init__(self, a: float = 0.05) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.a * x.flatten(1).sum(1)
        return torch.stack([torch.zeros_like(s), s], dim=1)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# -- deletion ----------------------------------------------------------------------------------------------


def test_resolve_k_counts_and_fractions():
    assert resolve_k(100, 1000) == 100 and resolve_k(0.25, 64) == 16 and resolve_k(0.001, 64) == 1
    for bad in (0, -1, 65, 2.5):
        with pytest.raises(ValueError):
            resolve_k(bad, 64)


def test_deletion_follows_the_saliency_ranking_with_known_probabilities():
    g = torch.Generator().manual_seed(0)
    v = torch.randperm(64, generator=g).float() / 10 + 1.0  # values 1.0 ... 7.3, min 1.0
    x = v.reshape(1, 1, 4, 4, 4)
    net, a = SumNet(), 0.05
    total, desc = float(v.sum()), torch.sort(v, descending=True).values
    ks = [1, 8, 0.25]
    # ranked by the input itself: the largest values go first, replaced by the minimum (1.0)
    p = deletion_probabilities(net, x, x.clone(), target=1, ks=ks, fill="min")[0]
    for i, n in enumerate([1, 8, 16]):
        expected = _sig(a * (total - float(desc[:n].sum()) + n * 1.0))
        assert float(p[i + 1]) == pytest.approx(expected, abs=1e-6)
    assert float(p[0]) == pytest.approx(_sig(a * total), abs=1e-6)
    # ranked by the opposite map: the smallest go first; with fill zero, the sum drops by exactly their sum
    p = deletion_probabilities(net, x, -x, target=0, ks=[8], fill="zero")[0]
    asc = torch.sort(v).values
    assert float(p[1]) == pytest.approx(1 - _sig(a * (total - float(asc[:8].sum()))), abs=1e-6)
    # a number as the fill value
    d = delete_topk(x, x, 2, fill=-3.0)
    assert float(d.sum()) == pytest.approx(total - float(desc[:2].sum()) - 6.0)


def test_deletion_ranks_voxels_over_channels_and_deletes_every_channel():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 2, 2, 2, 2)  # channel 0: 0..7, channel 1: 8..15
    sal = torch.zeros_like(x)
    sal[0, 0, 0, 0, 1], sal[0, 1, 0, 0, 1] = 5.0, -4.0  # voxel (0,0,1): summed 1.0
    sal[0, 1, 1, 1, 1] = 3.0  # voxel (1,1,1): summed 3.0, the top one
    out = delete_topk(x, sal, 1, fill="min")
    assert out[0, :, 1, 1, 1].tolist() == [0.0, 0.0] and int((out != x).sum()) == 2
    out = delete_topk(x, sal, 2, fill="min")
    assert out[0, :, 0, 0, 1].tolist() == [0.0, 0.0] and int((out != x).sum()) == 4
    with pytest.raises(ValueError, match="fill"):
        delete_topk(x, sal, 1, fill="median")


# -- localisation ------------------------------------------------------------------------------------------

SAL = np.array([1.0, 0.8, 0.6, 0.3, 0.55, 0.0, 0.0, -1.0]).reshape(1, 1, 8)
MASK = np.array([1, 1, 1, 1, 0, 0, 0, 0]).reshape(1, 1, 8)


def test_share_inside_mask():
    assert share_inside(SAL, MASK) == pytest.approx(2.7 / 3.25)
    assert math.isnan(share_inside(-np.abs(SAL), MASK))  # no positive saliency at all
    with pytest.raises(ValueError, match="different grids"):
        share_inside(SAL, MASK[..., :4])


def test_dice_at_known_thresholds():
    assert dice_at(SAL, MASK, 0.5) == pytest.approx(2 * 3 / (4 + 4))  # {0, 1, 2, 4}
    assert dice_at(SAL, MASK, 0.25) == pytest.approx(2 * 4 / (5 + 4))  # {0, 1, 2, 3, 4}
    assert dice_at(SAL, MASK, 0.6) == pytest.approx(2 * 2 / (2 + 4))  # {0, 1}
    assert dice_at(SAL * 10, MASK, 0.5) == pytest.approx(0.75)  # normalised by the maximum
    assert dice_at(-np.abs(SAL), MASK, 0.5) == 0.0
    best, t = best_dice(SAL, MASK)
    assert best == pytest.approx(8 / 9) and t == DEFAULT_THRESHOLDS[0]
    best, t = best_dice(SAL, MASK, thresholds=[0.3, 0.5, 0.7])
    assert best == pytest.approx(0.75) and t == 0.3


def test_pointing_game_with_tolerance_in_voxels_and_mm():
    assert pointing_hit(SAL, MASK)
    far = np.zeros((1, 1, 8))
    far[0, 0, 6] = 1.0  # 3 voxels from the mask's last voxel (index 3)
    assert not pointing_hit(far, MASK)
    assert not pointing_hit(far, MASK, tolerance=2)
    assert pointing_hit(far, MASK, tolerance=3)
    assert pointing_hit(far, MASK, tolerance=1.5, spacing=(1.0, 1.0, 0.5))  # 3 voxels of 0.5 mm
    assert not pointing_hit(far, MASK, tolerance=1.4, spacing=(1.0, 1.0, 0.5))
    with pytest.raises(ValueError, match="non-empty"):
        pointing_hit(far, np.zeros_like(MASK))


def test_localisation_bundles_every_score():
    scores = localisation(SAL, MASK, threshold=0.5)
    assert scores == pytest.approx(
        {
            "share_inside": 2.7 / 3.25,
            "mask_fraction": 0.5,
            "pointing_hit": 1.0,
            "dice_fixed": 0.75,
            "dice_best": 8 / 9,
            "best_threshold": 0.05,
        }
    )


# -- the driver --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ga_records(tmp_path_factory):
    from data_prep.synth_oct import generate

    root = tmp_path_factory.mktemp("ga_eval")
    datalist = generate(
        root / "data", sites=["A"], subjects_per_site=4, n_bscans=4, height=32, width=48, cue_site=None, progress=False
    )
    from ppi_med.data import load_datalist

    return root, datalist, load_datalist(datalist)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _preprocessing() -> Compose:
    # no resizing: the preprocessed grid is the file's, so the driver's localisation can be recomputed here
    return Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )


@pytest.mark.slow
def test_driver_writes_csv_plots_and_logs_into_a_given_mlflow_run(ga_records, mlflow_uri, tmp_path):
    _, _, all_records = ga_records
    records = [next(r for r in all_records if r["label"] == lab) for lab in (1, 0)]  # one eye of each class
    torch.manual_seed(0)
    net = MVCNN(width=4)
    uri = mlflow_uri
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("training")
    run_id = client.create_run(exp, run_name="training-run").info.run_id
    out = tmp_path / "eval"
    ks = [0.01, 0.05, 0.2]
    spec = SaliencySpec(net, _preprocessing(), records, methods=METHODS, targets="label", progress=False)
    summary = evaluate_saliency(spec, out, ks=ks, tracking_uri=uri, run_id=run_id)
    assert list(summary["method"]) == [*METHODS, "random"]
    deletion = pd.read_csv(out / "deletion.csv")
    loc = pd.read_csv(out / "localisation.csv")
    assert len(deletion) == len(records) * 6 * 3
    n_ga = 1
    assert len(loc) == n_ga * 5  # only cases with a lesion are localised
    # the summary is the mean of the per-case rows
    wbp = deletion[deletion["method"] == "wbp"]
    assert summary.loc[0, "drop_kp05"] == pytest.approx(wbp.loc[wbp["k"] == 0.05, "drop"].mean())
    assert summary.loc[0, "n_cases"] == len(records) and summary.loc[0, "n_localised"] == n_ga
    # recompute one case by hand: probabilities, deletion and localisation of the label's class
    rec = next(r for r in records if r["label"] == 1)
    cid = Path(rec["image"]).name.replace(".nii.gz", "")
    x = _preprocessing()({"image": rec["image"]})["image"].as_tensor()[None]
    net.eval()
    with torch.no_grad():
        p1 = float(torch.softmax(net(x), 1)[0, 1])
    row = deletion[(deletion["case_id"] == cid) & (deletion["method"] == "gradient") & (deletion["k"] == 0.2)]
    s = compute("gradient", net, x, 1)
    expected_after = float(deletion_probabilities(net, x, s, 1, [0.2])[0, 1])
    assert float(row["prob_before"].iloc[0]) == pytest.approx(p1, abs=1e-5)
    assert float(row["prob_after"].iloc[0]) == pytest.approx(expected_after, abs=1e-5)
    import nibabel as nib

    mask = np.asarray(nib.load(rec["mask"]).dataobj)
    lrow = loc[(loc["case_id"] == cid) & (loc["method"] == "gradient")].iloc[0]
    assert lrow["share_inside"] == pytest.approx(share_inside(s[0, 0].numpy(), mask), abs=1e-5)
    assert lrow["dice_fixed"] == pytest.approx(dice_at(s[0, 0].numpy(), mask, 0.5), abs=1e-5)
    assert lrow["mask_fraction"] == pytest.approx(float((mask > 0).mean()))
    for name in ("summary.csv", "deletion_curves.png", "localisation.png", "config.json"):
        assert (out / name).stat().st_size > 100
    # MLflow: into the given run, the curve as steps
    run = client.get_run(run_id)
    assert run.data.metrics["saliency/wbp/drop_kp2"] == pytest.approx(summary.loc[0, "drop_kp2"])
    assert run.data.metrics["saliency/gradcam/dice_best"] == pytest.approx(summary.loc[3, "dice_best"])
    curve = client.get_metric_history(run_id, "saliency/lrp/deletion_drop")
    assert sorted(m.step for m in curve) == [0, 1, 2]
    assert {a.path for a in client.list_artifacts(run_id, "saliency_eval")} >= {
        "saliency_eval/summary.csv",
        "saliency_eval/deletion_curves.png",
        "saliency_eval/localisation.png",
    }
    assert len(client.search_runs([exp])) == 1  # no new run
    # never overwrite
    with pytest.raises(FileExistsError, match="deletion.csv"):
        evaluate_saliency(spec, out, ks=ks, log_mlflow=False)


@pytest.mark.slow  # the first use of the module's MLflow store creates its tables
def test_driver_rejects_bad_options(ga_records, mlflow_uri, tmp_path):
    _, _, records = ga_records
    net = MVCNN(width=4)
    with pytest.raises(ValueError, match="unknown saliency method"):
        SaliencySpec(net, _preprocessing(), records, methods=["wbp", "smoothgrad"])
    gradient = SaliencySpec(net, _preprocessing(), records, methods=["gradient"], progress=False)
    with pytest.raises(ValueError, match="cannot delete"):
        evaluate_saliency(gradient, tmp_path / "b", ks=[10**6], log_mlflow=False)
    one = SaliencySpec(net, _preprocessing(), records[:1], methods=["gradient"], progress=False)
    with pytest.raises(ValueError, match="not found"):
        evaluate_saliency(one, tmp_path / "c", ks=[0.1], tracking_uri=mlflow_uri, run_id="0" * 32)
    two_targets = SaliencySpec(net, _preprocessing(), records, methods="gradient", targets=["label", 1])
    with pytest.raises(ValueError, match="one target choice"):
        evaluate_saliency(two_targets, tmp_path / "d", log_mlflow=False)
    assert not any((tmp_path / d).exists() for d in "bcd")


@pytest.mark.slow
def test_bundle_evaluate_saliency_run_id(ga_records, mlflow_uri, tmp_path):
    """``monai.bundle run evaluate_saliency`` on the GA bundle: a new run in the bundle's experiment."""
    from monai.bundle import run

    root, datalist, _ = ga_records
    ckpt = tmp_path / "model_best.pt"
    torch.manual_seed(1)
    torch.save(MVCNN(width=4).state_dict(), ckpt)
    uri = mlflow_uri
    out = tmp_path / "eval"
    run(
        "evaluate_saliency",
        config_file=[str(GA_BUNDLE), str(SALIENCY)],
        dataset_dir=str(Path(datalist).parent),
        spatial_size=[4, 32, 48],
        **{"network_def#width": 4},
        runs_dir=str(tmp_path / "runs"),
        tracking_uri=uri,
        checkpoint=str(ckpt),
        eval_dir=str(out),
        eval_methods=["wbp", "gradcam"],
        eval_ks=[0.05, 0.5],
    )
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["method"]) == ["wbp", "gradcam", "random"]
    config = json.loads((out / "config.json").read_text())
    assert config["checkpoint"] == str(ckpt) and config["target"] == "label"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("ga_ppi")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.tags["kind"] == "saliency_eval" and r.info.status == "FINISHED"
    assert r.data.metrics["saliency/wbp/drop_kp5"] == pytest.approx(float(summary.loc[0, "drop_kp5"]))
