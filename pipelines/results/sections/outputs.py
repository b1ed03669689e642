"""Reading a finished job's outputs for the report: held-out predictions, run metrics; number formatting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ppi_med.stats import delong_test

__all__ = ["delong_p", "file_metrics", "fmt", "predictions", "run_metrics"]


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, ``n/a`` for none or a non-finite one."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def predictions(out: Path, job: str) -> pd.DataFrame | None:
    """The held-out predictions (``test_predictions.csv``) of a training job's newest run, if it wrote them."""
    found = sorted((out / "jobs" / job / "runs").glob("*/test_predictions.csv"))
    return pd.read_csv(found[-1]) if found else None


def file_metrics(out: Path, job: str) -> dict[str, float] | None:
    """The metrics of a job's newest run from its ``metrics.jsonl``, with ``best_val_auc`` as :func:`run_metrics`.

    The run keeps every metric and param it sends to MLflow in ``metrics.jsonl`` beside its predictions, so a
    job restored from the ledger, whose MLflow runs are in another machine's store, reads the same figures.

    Args:
        out: the study folder.
        job: the job's name.

    Returns:
        Each metric's value at its last step, or ``None`` where the run wrote no ``metrics.jsonl``.
    """
    found = sorted((out / "jobs" / job / "runs").glob("*/metrics.jsonl"))
    if not found:
        return None
    latest: dict[str, tuple[int, float, float]] = {}
    params: dict[str, str] = {}
    history: list[tuple[int, float]] = []
    for line in found[-1].read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("kind") == "param":
            params[rec["key"]] = rec["value"]
        elif rec.get("kind") == "metric" and rec.get("value") is not None:
            step, value = int(rec.get("step") or 0), float(rec["value"])
            # MLflow's latest value: the highest step, the later one at the same step
            if (step, rec.get("time", 0)) >= latest.get(rec["key"], (-1, 0, 0))[:2]:
                latest[rec["key"]] = (step, rec.get("time", 0), value)
            if rec["key"] == "val_auc":
                history.append((step, value))
    metrics = {k: v for k, (_, _, v) in latest.items()}
    first = int(params.get("checkpoint_from_epoch", 1))
    metrics["best_val_auc"] = max((v for step, v in history if step >= first), default=float("nan"))
    return metrics


def run_metrics(out: Path, client, experiment: str, job: str) -> dict[str, float]:
    """The metrics of a job's run, with ``best_val_auc``: the best validation AUC it chose from.

    Read from the run's own ``metrics.jsonl`` (:func:`file_metrics`); from the study's MLflow store only for a
    run that has none.

    Args:
        out: the study folder.
        client: an ``mlflow.MlflowClient`` of the study's store.
        experiment: the experiment the job logs to.
        job: the job's name (its run's ``results_job`` tag).

    Returns:
        The metrics, empty where the job has no run.
    """
    found = file_metrics(out, job)
    if found is not None:
        return found
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.results_job = '{job}'", max_results=1)
    if not runs:
        return {}
    metrics = dict(runs[0].data.metrics)
    # the run's val_auc is the last epoch's; the chosen checkpoint's is the best of the epochs it was chosen from
    first = int(runs[0].data.params.get("checkpoint_from_epoch", 1))
    history = client.get_metric_history(runs[0].info.run_id, "val_auc")
    metrics["best_val_auc"] = max((m.value for m in history if m.step >= first), default=float("nan"))
    return metrics


def delong_p(base: pd.DataFrame | None, other: pd.DataFrame | None) -> float:
    """DeLong's paired p-value of ``other`` against ``base`` on the same cases; NaN where they differ."""
    if base is None or other is None:
        return float("nan")
    merged = base.merge(other, on=["image", "label"], suffixes=("_a", "_b"))
    if len(merged) != len(base) or merged["label"].nunique() < 2:
        return float("nan")
    return delong_test(merged["label"], merged["prob_b"], merged["prob_a"]).p_value
