"""The GA bundle and the site CV against a real MLflow tracking server (``mlflow server`` on loopback, over HTTP).

Each server is a separate process with its own SQLite store and artifact folder in the test's tmp folder; it is
started on a free port, waited for until ``/health`` answers, and its process group is killed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from bundle_files import workdir
from local_servers import free_ports, stop_group
from test_ga_bundle import BUNDLE, _tiny
from test_site_cv import TINY

from pipelines.site_cv import main as site_cv_main
from ppi_med.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, server_problem


@dataclass
class Server:
    uri: str
    proc: subprocess.Popen
    store: Path


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[Server]:
    """``mlflow server`` on a free loopback port, SQLite store and served artifacts under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_ports()[0]
    store = root / "server.db"
    log = open(root / "server.log", "w")
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while server_problem(uri, timeout=1.0) is not None:
            assert proc.poll() is None, f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 180 s"
            time.sleep(0.5)
        yield Server(uri, proc, store)
    finally:
        stop_group(proc)
        log.close()


def _bundle(tmp: Path, uri: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE), *_tiny(tmp),
        "--batch_size", "4", "--max_epochs", "2", "--runs_dir", str(tmp / "runs"),
        "--linear_reference", "false", "--tracking_uri", uri, *overrides,
    ]  # fmt: skip
    run_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run_env.update(OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=workdir(tmp), capture_output=True, text=True, timeout=600, env=run_env)


def _local_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "metric":
            out.setdefault(rec["key"], {})[int(rec["step"] or 0)] = float(rec["value"])
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as srv:
        yield srv


@pytest.mark.server
def test_bundle_logs_run_metrics_and_artifacts_over_http(server, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    # an experiment made elsewhere without the kind tag (as MONAI's own handler makes it) gets the tag
    client.create_experiment("ga_ppi")
    done = _bundle(tmp_path, server.uri)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = client.get_experiment_by_name("ga_ppi")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "ppi_wbp"
    assert run.data.params["max_epochs"] == "2" and run.data.params["ppi.saliency"] == "wbp"
    # the datalist's parts reach the server as the run's dataset inputs
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted((i.dataset.name, i.tags[0].value) for i in inputs) == [
        ("synthetic-oct-ga", "training"), ("synthetic-oct-ga", "validation")
    ]  # fmt: skip
    for key in ("loss", "loss_cls", "loss_con", "val_auc"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    # artifacts travel through the server's artifact proxy; the checkpoint there is the one on disk
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_best.pt", "model_final.pt", "params.json", "train.json", "base.json", "metadata.json"} <= artifacts
    (run_dir,) = (tmp_path / "runs").iterdir()
    got = client.download_artifacts(run.info.run_id, "model_final.pt", str(tmp_path))
    assert Path(got).read_bytes() == (run_dir / "models" / "model_final.pt").read_bytes()
    # the same metrics are kept beside the run
    local = _local_metrics(run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_auc")}
    assert local["val_auc"] == pytest.approx(history)
    assert f"tracking store: {server.uri}" in done.stdout


@pytest.mark.server
def test_site_cv_logs_parent_and_nested_runs_over_http(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [
        "--config_file", str(BUNDLE), "--out", str(tmp_path / "cv"), "--tracking-uri", server.uri,
        "--methods", "baseline,ppi_wbp", "--train-sites", "A", "--no-progress", "--num-threads", "1",
        "--default_dataset_dir", str(tmp_path / "data"), "--dataset_dir", str(tmp_path / "data"), *TINY,
        "--linear_reference", "false",
    ]  # fmt: skip
    assert site_cv_main(argv) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("ga_site_cv")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and "mean_auc_ppi_wbp" in parent.data.metrics
    assert {"summary.md", "summary.json", "figures", "tables"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["cv_method"] for r in children) == ["baseline", "ppi_wbp"]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["train_site"] == "A"
        assert {"auc_A", "auc_B", "val_auc", "loss"} <= set(run.data.metrics)
        assert "model_best.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
        # a cell is a bundle run: its datalist's parts are its dataset inputs
        contexts = {i.tags[0].value for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
        assert {"training", "validation"} <= contexts, contexts


@pytest.mark.slow
def test_a_server_that_is_down_stops_before_any_training(tmp_path, monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_ports()[0]}"  # nothing listens there
    done = _bundle(tmp_path, uri)
    assert done.returncode != 0
    assert f"MLflow tracking server {uri} does not answer" in done.stderr
    assert not list((tmp_path / "runs").glob("*/models/*.pt")), "a checkpoint was written: training started"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = [
        "--config_file", str(BUNDLE), "--out", str(tmp_path / "cv"), "--tracking-uri", uri, "--no-progress",
        "--default_dataset_dir", str(tmp_path / "cv_data"), "--dataset_dir", str(tmp_path / "cv_data"), *TINY,
    ]  # fmt: skip
    assert site_cv_main(argv) == 2
    assert f"MLflow tracking server {uri} does not answer" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()


@pytest.mark.server
def test_a_server_lost_mid_run_leaves_training_finished_and_metrics_kept(tmp_path):
    with mlflow_server(tmp_path / "server") as srv:
        # the server dies (SIGKILL of its process group) when the first epoch has been logged
        kill = (  # ignite's Events as MONAI's handlers import it (the bundle does not import ignite itself)
            "$@train#trainer.add_event_handler(monai.handlers.mlflow_handler.Events.EPOCH_COMPLETED(once=1), "
            f"lambda engine: os.killpg({srv.proc.pid}, 9))"
        )
        done = _bundle(
            tmp_path,
            srv.uri,
            "--max_epochs", "3",
            "--initialize", json.dumps(["$monai.utils.set_determinism(seed=@seed)", kill]),
            # fail fast instead of MLflow's default retries (about 4 minutes for a refused connection)
            env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"},
        )  # fmt: skip
        srv.proc.wait(timeout=20)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.count("stopped answering during run") == 1  # warned once
    assert "was lost during the run" in done.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "models" / "model_final.pt").is_file() and (run_dir / "models" / "model_best.pt").is_file()
    local = _local_metrics(run_dir)
    for key in ("loss", "loss_cls", "val_auc"):
        assert sorted(local[key]) == [1, 2, 3], key  # every epoch, the ones after the loss included
    # what reached the server before it died is in its store, read directly
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{srv.store}")
    (run,) = client.search_runs([client.get_experiment_by_name("ga_ppi").experiment_id])
    assert run.info.status == "RUNNING"  # never finished there; the local record says what it lacks
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_auc")}
    assert history == pytest.approx({1: local["val_auc"][1]})
