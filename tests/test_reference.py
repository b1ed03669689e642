"""The linear reference: a fair fit (C chosen inside the training part), and its record in a real MLflow run."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from ignite.engine import Engine

from ppi_med.reference import REFERENCE_MODEL, LinearReferenceHandler, linear_reference, voxel_matrix
from ppi_med.tracking import RunTracker


def _records(n: int, seed: int, signal: float) -> list[dict]:
    """Records whose 'image' is a (1, 4, 6) array; class 1 is brighter in one voxel by ``signal``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 2
        img = rng.normal(size=(1, 4, 6)).astype(np.float32)
        img[0, 1, 2] += signal * label
        out.append({"image": img, "label": label})
    return out


def _identity(rec: dict) -> dict:
    return rec


def test_voxel_matrix_flattens_preprocessed_images():
    x, y = voxel_matrix(_records(6, 0, 0.0), lambda r: {**r, "image": r["image"][:, :2]})
    assert x.shape == (6, 12) and x.dtype == np.float32
    assert y.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="no records"):
        voxel_matrix([], _identity)


def test_reference_separates_a_linear_signal_and_not_noise():
    res = linear_reference(_records(40, 0, 5.0), _records(20, 1, 5.0), _identity)
    assert res.val_auc > 0.95 and res.n_features == 24 and (res.n_train, res.n_val) == (40, 20)
    assert res.C in tuple(10.0 ** np.arange(-4, 5))
    noise = linear_reference(_records(40, 2, 0.0), _records(200, 3, 0.0), _identity)
    assert 0.3 < noise.val_auc < 0.7


def test_reference_never_sees_validation_labels():
    train, val = _records(40, 0, 3.0), _records(20, 1, 3.0)
    flipped = [{**r, "label": 1 - r["label"]} for r in val]
    a, b = linear_reference(train, val, _identity), linear_reference(train, flipped, _identity)
    # the same fitted model scores both; only the AUC's reading of the labels differs
    assert a.C == b.C and a.cv_auc == b.cv_auc
    assert a.val_auc == pytest.approx(1.0 - b.val_auc)


def test_reference_needs_both_classes():
    one_class = [r for r in _records(20, 0, 1.0) if r["label"] == 1]
    with pytest.raises(ValueError, match="per class"):
        linear_reference(one_class, _records(4, 1, 1.0), _identity)


@pytest.mark.slow
def test_handler_logs_into_the_trainer_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(
        tracking_uri=uri,
        experiment_name="ref_test",
        run_name="ref-run",
        params={"lr": 0.1},
        reference_metric="ref_val_auc",
        iteration_log=False,
        close_on_complete=True,
    )
    ref = LinearReferenceHandler(_records(30, 0, 3.0), _records(10, 1, 3.0), _identity, tracker=tracker)
    engine = Engine(lambda e, b: None)
    tracker.attach(engine)
    ref.attach(engine)
    engine.run([0], max_epochs=1)

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("ref_test").experiment_id])
    assert run.data.metrics["ref_val_auc"] == pytest.approx(ref.result.val_auc)
    assert {"ref_cv_auc", "ref_seconds"} <= set(run.data.metrics)
    assert run.data.params["ref.model"] == REFERENCE_MODEL
    assert run.data.params["ref.C"] == str(ref.result.C) and run.data.params["ref.n_features"] == "24"
    out = capsys.readouterr().out
    assert f"ref_val_auc: {ref.result.val_auc:.4f}" in out and REFERENCE_MODEL in out


def test_disabled_handler_does_nothing():
    ref = LinearReferenceHandler([], [], _identity, enabled=False)
    engine = Engine(lambda e, b: None)
    ref.attach(engine)
    engine.run([0], max_epochs=1)
    assert ref.result is None
