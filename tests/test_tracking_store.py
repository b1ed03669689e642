"""Local MLflow stores: a fresh one opened by several processes at once (site CV shards started together), and the
datalist logged into one as a run's dataset inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import mlflow
import pytest
from ignite.engine import Engine

from ppi_med.data import load_datalist
from ppi_med.tracking import RunTracker, datalist_inputs

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


def _datalist(folder, name: str | None = "eyes") -> tuple:
    """A datalist as the data tools write it (paths relative to its folder, one outside it) and its records as the
    bundle reads them (``load_datalist``, which joins the paths with the folder)."""
    written = [
        {
            "image": f"A/A-{i:03d}_img.nii.gz",
            "scan": f"../scans/A-{i:03d}.nii.gz",
            "label": i % 2,
            "site": "A",
            "subject": f"A-{i:03d}",
            "ratings": [3, i],
        }
        for i in range(6)
    ]
    for record in written:
        for key in ("image", "scan"):
            (folder / record[key]).parent.mkdir(parents=True, exist_ok=True)
            (folder / record[key]).touch()  # the reader checks that they exist, not what they hold
    raw = {"training": written, **({"name": name} if name else {})}
    (folder / "datalist.json").write_text(json.dumps(raw))
    read = load_datalist(folder / "datalist.json", ndim=None)
    assert read[0]["scan"] != written[0]["scan"]  # as a run holds them
    return folder / "datalist.json", written, read


def _digest(records) -> str:
    rows = [{**r, "ratings": json.dumps(r["ratings"])} for r in records]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:8]


def test_a_run_logs_its_datalist_parts_as_dataset_inputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path, written, read = _datalist(tmp_path / "data" / "eyes")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(
        tracking_uri=uri,
        experiment_name="ga_ppi",
        run_name="ga-ppi_wbp-1",
        datalist=path,
        datasets={"training": read[:4], "validation": read[4:], "test": []},
        iteration_log=False,
        close_on_complete=True,
    )
    engine = Engine(lambda e, b: None)
    tracker.attach(engine)
    engine.run([0], max_epochs=1)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ga_ppi").experiment_id])
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]  # an empty part is left out
    for context, records in (("training", written[:4]), ("validation", written[4:])):
        data = inputs[context]
        assert data.name == "eyes" and json.loads(data.source) == {"uri": "data/eyes/datalist.json"}
        # the digest is of the records as the datalist writes them, not of where the data lies now
        assert data.digest == _digest(records)
        assert json.loads(data.profile)["num_rows"] == len(records)
        columns = {c["name"]: c["type"] for c in json.loads(data.schema)["mlflow_colspec"]}
        assert columns == {
            "image": "string",
            "scan": "string",
            "label": "long",
            "site": "string",
            "subject": "string",
            "ratings": "string",
        }


def test_without_parts_the_whole_datalist_is_one_input(tmp_path, monkeypatch):
    path, written, _ = _datalist(tmp_path / "ga_mine", name=None)
    monkeypatch.chdir(tmp_path)
    (one,) = datalist_inputs(path)
    assert one.tags == [] and one.dataset.name == "ga_mine"  # no context; named by its folder without a name
    assert one.dataset.digest == _digest(written)
    assert json.loads(one.dataset.source)["uri"] == "ga_mine/datalist.json"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a datalist outside the working folder is named absolutely
    assert json.loads(datalist_inputs(path)[0].dataset.source)["uri"] == str(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("{not json", "cannot read the datalist"), ("[1, 2]", "not an object"), ('{"name": "x"}', "no 'training' list")],
)
def test_a_bad_datalist_is_named_with_its_problem(tmp_path, text, problem):
    path = tmp_path / "datalist.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as err:
        datalist_inputs(path)
    assert str(path) in str(err.value)
