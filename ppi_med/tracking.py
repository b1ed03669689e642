"""MLflow tracking for bundle runs: MONAI's handler plus tags, parameter files and a closing summary."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

__all__ = [
    "default_tracking_uri",
    "flatten_params",
    "git_commit",
    "latest_checkpoint",
    "log_batch",
    "unique_run_name",
    "RunTracker",
]


def default_tracking_uri(folder: str | Path = ".") -> str:
    """A local SQLite store ``mlflow.db`` in ``folder`` (the working folder by default)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def unique_run_name(prefix: str) -> str:
    """``prefix-YYYYmmdd-HHMMSS-pid``: never merges into an earlier run of the same name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def latest_checkpoint(runs_dir: str | Path, prefix: str = "", name: str = "model_best.pt") -> str:
    """The most recent ``runs_dir/<prefix>*/models/<name>``.

    Raises:
        FileNotFoundError: no run folder holds such a checkpoint.
    """
    found = sorted(Path(runs_dir).glob(f"{prefix}*/models/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {name} under {runs_dir}/{prefix}*/models/; train first or pass --checkpoint PATH")
    return str(found[-1])


def git_commit(folder: str | Path = ".") -> str:
    """The checked-out commit of ``folder``'s repository, or ``unknown`` outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as flat ``a.b.c`` keys with string values, as MLflow stores them."""
    flat: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            flat.update(flatten_params(v, f"{key}."))
        elif isinstance(v, (list, tuple)):
            flat[key] = ",".join(map(str, v))
        else:
            flat[key] = str(v)
    return flat


def log_batch(
    client: Any, run_id: str, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None
) -> None:
    """Log params (as strings) and metrics (step 0, now) into one MLflow run in a single request.

    Args:
        client: an ``mlflow.MlflowClient``.
        run_id: the run.
        params: name -> value.
        metrics: name -> number.
    """
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
    )


class RunTracker(MLFlowHandler):
    """:class:`monai.handlers.MLFlowHandler` that also records what makes a run reproducible.

    On top of MONAI's handler it logs the hyper-parameters (flattened) as params, writes them in full to
    ``params.json`` as an artifact (long values do not fit MLflow params), sets tags (git commit, seed,
    method), logs the given files as artifacts when training ends, and prints where the run is and the
    command that opens the MLflow UI.

    Args:
        params: the hyper-parameters, possibly nested.
        tags: extra tags; ``git_commit`` is added.
        output_dir: where ``params.json`` is written.
        summary_metric: the evaluator metric reported in the closing summary (e.g. ``val_auc``).
        evaluator: the engine holding that metric (``best_metric`` is read from its state).
        reference_metric: a metric of the run printed beside the best one in the closing summary, e.g. the
            linear reference's ``ref_val_auc`` (:mod:`ppi_med.reference`); skipped when the run lacks it.
        **kwargs: passed to :class:`monai.handlers.MLFlowHandler`.
    """

    def __init__(
        self,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        output_dir: str | Path | None = None,
        summary_metric: str | None = None,
        evaluator: Engine | None = None,
        artifacts: str | Sequence[str | Path] | None = None,
        reference_metric: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.params = dict(params or {})
        # the commit of the code that runs, wherever the run is started from
        code = git_commit(Path(__file__).resolve().parent)
        self.tags = {"git_commit": code, **{k: str(v) for k, v in (tags or {}).items()}}
        self.output_dir = Path(output_dir) if output_dir else None
        self.summary_metric = summary_metric
        self.evaluator = evaluator
        self.reference_metric = reference_metric
        flat = flatten_params(self.params)
        # MLflow caps a param value at 6000 characters; the full values are in params.json
        short = {k: v for k, v in flat.items() if len(v) <= 500}
        super().__init__(experiment_param=short, artifacts=artifacts, **kwargs)

    def start(self, engine: Engine) -> None:
        super().start(engine)
        run_id = self.cur_run.info.run_id
        for k, v in self.tags.items():
            self.client.set_tag(run_id, k, v)
        if self.output_dir is not None and self.params:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "params.json"
            path.write_text(json.dumps(self.params, indent=2, default=str))
            self.client.log_artifact(run_id, str(path))

    def complete(self) -> None:
        super().complete()
        if self.cur_run is None:
            return
        run = self.client.get_run(self.cur_run.info.run_id)
        lines = [""]
        if self.summary_metric and self.evaluator is not None:
            best = getattr(self.evaluator.state, "best_metric", None)
            epoch = getattr(self.evaluator.state, "best_metric_epoch", None)
            if best is not None and best > -1:
                lines.append(f"best {self.summary_metric}: {best:.4f} (epoch {epoch})")
        ref = run.data.metrics.get(self.reference_metric) if self.reference_metric else None
        if ref is not None:
            model = run.data.params.get("ref.model", "reference model")
            lines.append(f"{self.reference_metric}: {ref:.4f} ({model}, same split)")
        lines += [
            f"MLflow run '{run.info.run_name}' ({run.info.run_id}) in experiment '{self.experiment_name}'",
            f"  tracking store: {self.client.tracking_uri}",
        ]
        if self.client.tracking_uri.startswith("sqlite:///"):
            lines.append(f"  open it with: mlflow ui --backend-store-uri {self.client.tracking_uri}")
        print("\n".join(lines), flush=True)
