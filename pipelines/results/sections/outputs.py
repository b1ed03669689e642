"""Reading a finished job's outputs for the report: held-out predictions, MLflow metrics; number formatting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ppi_med.stats import delong_test

__all__ = ["delong_p", "fmt", "predictions", "run_metrics"]


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, ``n/a`` for none or a non-finite one."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def predictions(out: Path, job: str) -> pd.DataFrame | None:
    """The held-out predictions (``test_predictions.csv``) of a training job's newest run, if it wrote them."""
    found = sorted((out / "jobs" / job / "runs").glob("*/test_predictions.csv"))
    return pd.read_csv(found[-1]) if found else None


def run_metrics(client, experiment: str, job: str) -> dict[str, float]:
    """The MLflow metrics of a job's run, with ``best_val_auc``: the best validation AUC it chose from.

    Args:
        client: an ``mlflow.MlflowClient`` of the study's store.
        experiment: the experiment the job logs to.
        job: the job's name (its run's ``results_job`` tag).

    Returns:
        The metrics, empty where the job has no run.
    """
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
