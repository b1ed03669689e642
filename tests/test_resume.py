"""Resume after a kill: a real bundle process killed with SIGKILL mid-training, then resumed into the same run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from bundle_files import GA_BUNDLE as BUNDLE
from bundle_files import workdir
from ignite.engine import Engine

from ppi_med.resume import ResumeHandler, TrainingProgress, latest_epoch_checkpoint
from ppi_med.weight_average import WeightAverage

EPOCHS = 8


def _cmd(tmp: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE),
        "--default_dataset_dir", str(tmp / "data"), "--dataset_dir", str(tmp / "data"),
        "--synthetic#sites", "['A','B']", "--synthetic#subjects_per_site", "8", "--synthetic#n_bscans", "4",
        "--synthetic#height", "32", "--synthetic#width", "48", "--synthetic#cue_site", "B",
        "--spatial_size", "[4,32,48]", "--network_def#width", "4", "--batch_size", "4",
        "--max_epochs", str(EPOCHS), "--linear_reference", "false", "--weight_average", "1",
        "--runs_dir", str(tmp / "runs"), "--tracking_uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra,
    ]  # fmt: skip


def _kill_after_epoch(tmp: Path, epoch: int) -> Path:
    """Start a run, SIGKILL it once its checkpoint of ``epoch`` exists; returns the run folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cmd(tmp), cwd=workdir(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list((tmp / "runs").glob(f"*/models/checkpoint_epoch={epoch}.pt"))
            if found:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return found[0].parents[1]
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    pytest.fail(f"the run ended (exit {proc.returncode}) or timed out before its epoch-{epoch} checkpoint")


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    run_dir = _kill_after_epoch(tmp, 2)
    killed_at = latest_epoch_checkpoint(run_dir / "models")
    killed_average = torch.load(killed_at, map_location="cpu", weights_only=True)["weight_average"]["average"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ga_ppi")
    (before,) = client.search_runs([exp.experiment_id])
    # a write the kill interrupted leaves a temporary file beside the checkpoints: it must be ignored
    (run_dir / "models" / "tmpkilledwrite").write_bytes(b"\x80\x02partial")
    resumed = subprocess.run(
        _cmd(tmp, "--resume_from", str(run_dir)), cwd=workdir(tmp), capture_output=True, text=True, timeout=300
    )
    return dict(
        tmp=tmp,
        run_dir=run_dir,
        killed_at=killed_at,
        killed_average=killed_average,
        before=before,
        resumed=resumed,
        client=client,
    )


@pytest.mark.slow
def test_the_kill_left_an_unfinished_run_and_a_readable_checkpoint(killed_and_resumed):
    k = killed_and_resumed
    assert k["before"].info.status == "RUNNING"  # killed: MLflow never heard it end
    epoch = int(k["killed_at"].stem.split("=")[1])
    assert 2 <= epoch < EPOCHS
    state = torch.load(k["killed_at"], weights_only=True)  # written atomically, and weights only
    assert {"model", "optimizer", "lr_scheduler", "progress"} <= set(state)
    assert state["progress"]["epoch"] == epoch


@pytest.mark.slow
def test_resume_continues_the_same_run_without_repeating_or_losing_epochs(killed_and_resumed):
    k = killed_and_resumed
    res = k["resumed"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    client = k["client"]
    runs = client.search_runs([client.get_experiment_by_name("ga_ppi").experiment_id])
    assert [r.info.run_id for r in runs] == [k["before"].info.run_id]  # the same MLflow run, no second one
    run = client.get_run(k["before"].info.run_id)
    assert run.info.status == "FINISHED"
    for key in ("val_auc", "loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), f"{key} logged at epochs {sorted(steps)}"
    models = k["run_dir"] / "models"
    assert (models / "model_final.pt").is_file() and (models / "model_best.pt").is_file()
    assert latest_epoch_checkpoint(models).name == f"checkpoint_epoch={EPOCHS}.pt"
    assert not (models / "tmpkilledwrite").exists()  # the interrupted write's leftover is cleared
    # the killed run's weight average went on after the resume: the final checkpoint holds it, not the weights
    final = torch.load(models / "model_final.pt", map_location="cpu", weights_only=True)
    assert k["killed_average"] and set(final["weight_average"]["average"]) == set(final["model"])
    assert any(not torch.equal(final["weight_average"]["average"][n], v) for n, v in final["model"].items())


@pytest.mark.slow
def test_resume_without_a_checkpoint_names_the_folder(tmp_path):
    empty = tmp_path / "runs" / "ga-never-started"
    (empty / "models").mkdir(parents=True)
    res = subprocess.run(
        _cmd(tmp_path, "--resume_from", str(empty)), cwd=workdir(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert res.returncode != 0
    assert f"nothing to resume in {empty / 'models'}" in res.stderr


def test_training_progress_round_trip_restores_counters_best_and_random_state():
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    trainer.state.epoch, trainer.state.iteration = 5, 40
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.8, 4
    progress = TrainingProgress(evaluator)
    progress.attach(trainer)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    saved = progress.state_dict()
    draws = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    trainer.state.epoch = evaluator.state.best_metric = 0
    progress.load_state_dict(saved)
    assert (trainer.state.epoch, trainer.state.iteration, evaluator.state.best_metric) == (5, 40, 0.8)
    assert torch.equal(torch.rand(2), draws[0]) and np.array_equal(np.random.rand(2), draws[1])
    assert random.random() == draws[2]


def test_a_checkpoint_from_before_the_weight_average_resumes_and_the_average_starts_there(tmp_path):
    net = torch.nn.Linear(3, 2)
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"model": {k: v + 1 for k, v in net.state_dict().items()}}, models / "checkpoint_epoch=3.pt")
    trainer = Engine(lambda e, b: None)
    average = WeightAverage(net, epochs=1, steps_per_epoch=2)
    with pytest.raises(ValueError, match="weight_average"):  # without the allowance, ignite names the missing object
        ResumeHandler(models, {"model": net, "weight_average": average})(trainer)
    ResumeHandler(models, {"model": net, "weight_average": average}, optional=["weight_average"])(trainer)
    assert not average.average  # left as the run starts it: the average begins from the resumed weights
    torch.testing.assert_close(net.weight, torch.load(models / "checkpoint_epoch=3.pt")["model"]["weight"])
