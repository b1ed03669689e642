"""A fresh local MLflow store opened by several processes at once (site CV shards started together)."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

pytestmark = pytest.mark.slow  # four Python processes that each import MLflow

SCRIPT = """
import sys
from mlflow import MlflowClient
from ppi_med.tracking import check_tracking_uri, ensure_experiment
uri = sys.argv[1]
check_tracking_uri(uri)
ensure_experiment(MlflowClient(tracking_uri=uri), "shards")
"""


def test_processes_creating_one_sqlite_store_together_all_succeed(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=240) + (p.returncode,) for p in procs]
    assert all(code == 0 for _, _, code in results), [err[-2000:] for _, err, code in results if code]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("shards") is not None
    assert len(client.search_experiments(filter_string="name = 'shards'")) == 1
