"""The study's MLflow store: where it is and the experiments its jobs log to."""

from __future__ import annotations

from pathlib import Path

from ppi_med.tracking import ensure_experiment

__all__ = ["EXPERIMENTS", "init_store", "tracking_uri"]

EXPERIMENTS = (
    "results_ga", "results_site_cv", "results_lidc", "results_lidc_attempts", "results_saliency", "results_shortcut",
)  # fmt: skip


def tracking_uri(out: Path, given: str | None = None) -> str:
    """``given``, or the study's own SQLite store ``OUT/mlflow.db``."""
    return given or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def init_store(uri: str) -> None:
    """Create the MLflow store and the study's experiments before jobs start.

    Two processes that create a new SQLite store at the same moment can both try to build its schema and one
    fails; parallel jobs therefore find it made.

    Args:
        uri: the MLflow tracking URI.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for name in EXPERIMENTS:
        ensure_experiment(client, name)
