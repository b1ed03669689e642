"""The GA bundle end to end through MONAI's own CLI, on a tiny synthetic data set, with a real MLflow store."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from bundle_files import GA_BUNDLE as BUNDLE
from bundle_files import GA_INFERENCE, ROOT, config_list, workdir

pytestmark = pytest.mark.slow  # every test runs the bundle in a subprocess or reads the runs of one


def _tiny(tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long run: 2 sites x 8 eyes of 4 B-scans of 32 x 48, a 4-channel backbone."""
    return [
        "--default_dataset_dir", str(tmp_path / "data"),
        "--dataset_dir", str(tmp_path / "data"),
        "--synthetic#sites", "['A','B']",
        "--synthetic#subjects_per_site", "8",
        "--synthetic#n_bscans", "4",
        "--synthetic#height", "32",
        "--synthetic#width", "48",
        "--synthetic#cue_site", "B",
        "--spatial_size", "[4,32,48]",
        "--network_def#width", "4",
    ]  # fmt: skip


def _run_bundle(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(BUNDLE),
        *_tiny(tmp_path),
        "--batch_size", "4",
        "--max_epochs", "2",
        "--runs_dir", str(tmp_path / "runs"),
        "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300)


def _runs(tmp_path: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ga_ppi")
    assert exp is not None, "the bundle created no MLflow experiment"
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One PPI run and one baseline run into the same store, as a user comparing them would make."""
    tmp = tmp_path_factory.mktemp("ga_bundle")
    ppi = _run_bundle(tmp, "--ppi#warmup_epochs", "0")
    assert ppi.returncode == 0, ppi.stdout[-3000:] + ppi.stderr[-3000:]
    base = _run_bundle(tmp, "--ppi#enabled", "false")
    assert base.returncode == 0, base.stdout[-3000:] + base.stderr[-3000:]
    return tmp, ppi, base


def test_bundle_logs_a_complete_mlflow_run(two_runs):
    tmp, ppi, _ = two_runs
    client, runs = _runs(tmp)
    run = next(r for r in runs if r.data.tags.get("method") == "ppi_wbp")
    metrics = run.data.metrics
    for key in ("loss", "loss_cls", "loss_con", "loss_reg", "loss_ad", "val_auc"):
        assert key in metrics, f"metric {key} missing from the MLflow run: {sorted(metrics)}"
    history = client.get_metric_history(run.info.run_id, "loss_con")
    assert [m.step for m in history] == [1, 2]
    assert 0.0 <= metrics["val_auc"] <= 1.0
    # the linear reference of the same split sits in the same run
    assert 0.0 <= metrics["ref_val_auc"] <= 1.0 and "ref_cv_auc" in metrics
    params = run.data.params
    assert params["ppi.enabled"] == "True" and params["ppi.saliency"] == "wbp"
    assert params["max_epochs"] == "2" and params["backbone"] == "resnet10"
    assert params["ref.model"] == "l2_logistic_regression_on_preprocessed_voxels"
    assert int(params["n_train"]) + int(params["n_val"]) == 16
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["seed"] == "0" and run.data.tags["git_commit"] == head
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_best.pt", "model_final.pt", "train.json", "base.json", "metadata.json", "params.json"} <= artifacts
    assert run.info.status == "FINISHED"
    # the console tells the user where to look
    assert "best val_auc" in ppi.stdout and "mlflow ui --backend-store-uri" in ppi.stdout
    assert f"ref_val_auc: {metrics['ref_val_auc']:.4f}" in ppi.stdout


def test_checkpoint_loads_into_the_network(two_runs):
    tmp, _, _ = two_runs
    from ppi_med.networks import MVCNN

    best = sorted((tmp / "runs").glob("ga-ppi_wbp-*/models/model_best.pt"))
    assert best, "no best checkpoint written"
    net = MVCNN(width=4)
    net.load_state_dict(torch.load(best[0], map_location="cpu", weights_only=True))
    assert net(torch.rand(2, 1, 4, 32, 48)).shape == (2, 2)


def test_baseline_override_disables_ppi(two_runs):
    tmp, _, base = two_runs
    _, runs = _runs(tmp)
    run = next(r for r in runs if r.data.tags.get("method") == "baseline")
    assert run.data.params["ppi.enabled"] == "False"
    assert "loss_con" not in run.data.metrics and "loss_ad" not in run.data.metrics
    # the plain objective: total loss is the classification loss
    assert run.data.metrics["loss"] == pytest.approx(run.data.metrics["loss_cls"])
    # both runs sit in one experiment with the same parameter columns, for the MLflow compare view
    ppi_run = next(r for r in runs if r.data.tags.get("method") == "ppi_wbp")
    assert set(run.data.params) == set(ppi_run.data.params)
    # and the same data: their dataset inputs (name, digest, context) are equal, training and validation
    base_data, ppi_data = (
        sorted((i.tags[0].value, i.dataset.name, i.dataset.digest) for i in r.inputs.dataset_inputs)
        for r in (run, ppi_run)
    )
    assert base_data == ppi_data and [c for c, _, _ in base_data] == ["training", "validation"]


def test_runs_never_overwrite_each_other(two_runs):
    tmp, _, _ = two_runs
    run_dirs = sorted(p.name for p in (tmp / "runs").iterdir())
    assert len(run_dirs) == 2 and len(set(run_dirs)) == 2


def test_inference_override_writes_predictions(two_runs):
    tmp, _, _ = two_runs
    best = sorted((tmp / "runs").glob("ga-ppi_wbp-*/models/model_best.pt"))[0]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", config_list(BUNDLE, GA_INFERENCE),
        *_tiny(tmp),
        "--runs_dir", str(tmp / "infer_runs"),
        "--checkpoint", str(best),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=workdir(tmp), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (csv,) = (tmp / "infer_runs").glob("ga-inference-*/predictions.csv")
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert len(rows) == 4  # the validation subjects of 2 sites x 8 eyes at val_fraction 0.25
    assert all(Path(r[0]).is_file() and 0.0 <= float(r[1]) <= 1.0 for r in rows)


def test_held_out_test_part_is_scored_with_the_chosen_checkpoint(tmp_path):
    """With ``test_fraction`` the best checkpoint is scored once on eyes that neither trained nor chose it."""
    from sklearn.metrics import roc_auc_score

    from pipelines.bundle_config import open_config
    from ppi_med.held_out import predict_records
    from ppi_med.networks import MVCNN

    done = _run_bundle(tmp_path, "--ppi#enabled", "false", "--test_fraction", "0.25", "--max_epochs", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, runs = _runs(tmp_path)
    (run,) = runs
    metrics, params = run.data.metrics, run.data.params
    assert (int(params["n_train"]), int(params["n_val"]), int(params["n_test"])) == (8, 4, 4)
    assert metrics["test_n"] == 4 and metrics["test_n_pos"] == 2
    assert metrics["test_auc_lo"] <= metrics["test_auc"] <= metrics["test_auc_hi"]
    assert "ref_test_auc" in metrics
    (csv,) = (tmp_path / "runs").glob("ga-baseline-*/test_predictions.csv")
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert rows[0][:3] == ["image", "label", "prob"] and len(rows) == 5
    labels, probs = [int(r[1]) for r in rows[1:]], [float(r[2]) for r in rows[1:]]
    assert roc_auc_score(labels, probs) == pytest.approx(metrics["test_auc"])
    assert "test_predictions.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # the datalist is the run's dataset, one input per part (the UI's Dataset column)
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    assert {d.name for d in inputs.values()} == {"synthetic-oct-ga"}
    assert {json.loads(d.source)["uri"] for d in inputs.values()} == {"data/datalist.json"}
    assert [json.loads(inputs[c].profile)["num_rows"] for c in ("training", "validation", "test")] == [8, 4, 4]
    # the digest is of the part's records as the datalist writes them (paths relative to its folder)
    written = {r["image"]: r for r in json.loads((tmp_path / "data" / "datalist.json").read_text())["training"]}
    test_records = [written[str(Path(r[0]).relative_to(tmp_path / "data"))] for r in rows[1:]]
    digest = hashlib.sha256(json.dumps(test_records, sort_keys=True).encode()).hexdigest()[:8]
    assert inputs["test"].digest == digest and len({d.digest for d in inputs.values()}) == 3
    # the probabilities are the best checkpoint's, not the final weights'
    parser = open_config(BUNDLE, {"network_def#width": 4, "spatial_size": [4, 32, 48]})
    preprocessing = parser.get_parsed_content("common#preprocessing")
    records = [{"image": r[0], "label": int(r[1])} for r in rows[1:]]
    (best,) = (tmp_path / "runs").glob("ga-baseline-*/models/model_best.pt")
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, MVCNN)
    net.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    again = predict_records(net, records, preprocessing)
    assert again == pytest.approx(probs, abs=1e-5)
    assert "held-out test AUC (4 records, model_best.pt)" in done.stdout
    # the checkpoint is chosen only from the epochs after the warm-up (max_epochs // 2 = 1), for every method
    assert params["checkpoint_from_epoch"] == "2"
    best_epoch = int(re.search(r"best val_auc: [\d.]+ \(epoch (\d+)\)", done.stdout).group(1))
    assert best_epoch >= 2


def test_switch_on_table_reads_the_runs_own_validation_history(two_runs, tmp_path):
    import pandas as pd

    from pipelines.switch_on import main

    tmp, _, _ = two_runs
    out = tmp_path / "switch_on"
    groups = [f"baseline={tmp / 'runs' / 'ga-baseline-*'}", f"ppi={tmp / 'runs' / 'ga-ppi_wbp-*'}"]
    assert main([*groups, "--out", str(out)]) == 0
    rows = pd.read_csv(out.with_suffix(".csv")).set_index("group")
    client, runs = _runs(tmp)
    run = next(r for r in runs if r.data.tags.get("method") == "ppi_wbp")
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val_auc")]
    assert rows.loc["ppi", "warmup_epochs"] == 0
    assert rows.loc["ppi", "best_val"] == pytest.approx(max(history))
    assert rows.loc["ppi", "val_first"] == pytest.approx(history[0])
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| ppi | 1 |" in out.with_suffix(".md").read_text()
    assert main([f"none={tmp / 'nowhere-*'}", "--out", str(out)]) == 2


def test_dfr_retrains_only_the_head_of_the_chosen_checkpoint_and_the_test_scores_it(tmp_path):
    """``--robust#method dfr``: ``model_dfr.pt`` is ``model_best.pt`` with a new head; the held-out test scores it;
    ``worst_site`` selection chooses by the worst (site, label) group's accuracy, which is logged."""
    done = _run_bundle(
        tmp_path, "--ppi#enabled", "false", "--robust#method", "dfr", "--robust#dfr_draws", "3",
        "--test_fraction", "0.25", "--max_epochs", "3", "--selection", "worst_site",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, (run,) = _runs(tmp_path)
    assert run.data.tags["method"] == "dfr" and run.data.params["selection"] == "worst_site"
    assert 0.0 <= run.data.metrics["val_worst_group_acc"] <= 1.0 and "val_auc" in run.data.metrics
    assert "held-out test AUC (4 records, model_dfr.pt)" in done.stdout
    assert re.search(r"best val_worst_group_acc: [\d.]+ \(epoch \d+\)", done.stdout)
    (models,) = (tmp_path / "runs").glob("ga-dfr-*/models")
    best = torch.load(models / "model_best.pt", map_location="cpu", weights_only=True)
    dfr = torch.load(models / "model_dfr.pt", map_location="cpu", weights_only=True)["model"]
    assert set(best) == set(dfr)
    for k in best:
        assert torch.equal(best[k], dfr[k]) != k.startswith("head."), k


def test_jtt_restarts_after_its_first_stage_with_the_error_set_written(tmp_path):
    done = _run_bundle(
        tmp_path, "--ppi#enabled", "false", "--robust#method", "jtt", "--robust#jtt_epochs", "1", "--max_epochs", "3"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, (run,) = _runs(tmp_path)
    assert run.data.tags["method"] == "jtt"
    assert run.data.params["robust.method"] == "jtt"
    (errors,) = (tmp_path / "runs").glob("ga-jtt-*/error_set.csv")
    lines = errors.read_text().splitlines()
    assert lines[0] == "case" and all(line.endswith("_img.nii.gz") for line in lines[1:])
    assert run.data.metrics["jtt_errors"] == len(lines) - 1


def test_weight_average_is_what_is_validated_and_chosen_while_training_steps_the_raw_weights(tmp_path):
    """``--weight_average 1``: the checkpoint chosen on validation is the average (with its precise batch-norm
    statistics), the resume checkpoint keeps the raw weights and the average beside them."""
    done = _run_bundle(
        tmp_path, "--ppi#enabled", "false", "--max_epochs", "1", "--ppi#warmup_epochs", "0", "--weight_average", "1"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, (run,) = _runs(tmp_path)
    assert run.data.params["weight_average"] == "1"
    (models,) = (tmp_path / "runs").glob("ga-baseline-*/models")
    best = torch.load(models / "model_best.pt", map_location="cpu", weights_only=True)
    final = torch.load(models / "model_final.pt", map_location="cpu", weights_only=True)
    average, raw = final["weight_average"]["average"], final["model"]
    assert set(best) == set(average) == set(raw)
    for k in best:
        assert torch.equal(best[k], average[k]), k
    assert not torch.equal(best["backbone.conv1.weight"], raw["backbone.conv1.weight"])


def test_monai_tracking_mlflow_logs_the_training_loss_of_every_iteration(tmp_path):
    """MONAI's own ``--tracking mlflow`` (it finds ``train#trainer``, ``train#handlers``, ``validate#evaluator``)
    adds its handler to the bundle's run: the batch loss of every iteration beside the bundle's own metrics."""
    done = _run_bundle(tmp_path, "--tracking", "mlflow", "--max_epochs", "1", "--ppi#warmup_epochs", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, (run,) = _runs(tmp_path)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    n_train = int(run.data.params["n_train"])
    assert len(history) == -(-n_train // 4) and all(m.value > 0 for m in history)  # batch 4, one epoch
    assert {"loss", "loss_con", "val_auc"} <= set(run.data.metrics)
