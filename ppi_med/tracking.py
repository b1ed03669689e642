"""MLflow tracking for bundle runs: MONAI's handler plus tags, parameter files and a closing summary.

A tracking server (``http://...``) is checked before anything trains (:func:`check_tracking_uri`). If it
stops answering during a run, :class:`RunTracker` warns once and training goes on: every metric and param
the run logs is also written to ``<output_dir>/metrics.jsonl`` (always, not only then), so nothing measured
is lost, and the checkpoints stay in the run folder. Experiments are created as model-training experiments
(:func:`ensure_experiment`). The run's datalist is logged as MLflow dataset inputs, one per split part
(:func:`datalist_inputs`), so the UI's *Dataset* column names the data each run saw.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING_KIND",
    "TrackingServerError",
    "check_tracking_uri",
    "datalist_inputs",
    "default_tracking_uri",
    "ensure_experiment",
    "flatten_params",
    "git_commit",
    "latest_checkpoint",
    "log_batch",
    "metric_key",
    "monai_handlers_on_batch_output",
    "server_problem",
    "unique_run_name",
    "RunTracker",
]

#: MLflow 3's experiment tag that picks the UI's view: without it an experiment may open on the GenAI
#: traces overview instead of the runs table
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


class TrackingServerError(ConnectionError):
    """The MLflow tracking server does not answer."""


def _is_remote(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(("http://", "https://"))


def server_problem(uri: str, timeout: float = 5.0) -> str | None:
    """Why the MLflow server at ``uri`` does not answer its ``/health`` endpoint, or ``None`` when it does.

    One request, no retries (MLflow's own client retries a refused connection for minutes).

    Args:
        uri: an ``http(s)://`` tracking URI.
        timeout: seconds to wait for the answer.
    """
    url = f"{str(uri).rstrip('/')}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (the user's own tracking URI)
            return None if resp.status == 200 else f"{url} answered HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        return f"{url} answered HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def _create_sqlite_store(uri: str | None) -> None:
    """Create the SQLite store of ``uri`` (``sqlite:///path``) once, with the other processes waiting on a lock."""
    if not uri or not str(uri).startswith("sqlite:///"):
        return
    import fcntl

    from mlflow import MlflowClient

    path = Path(str(uri).removeprefix("sqlite:///"))
    if not path.is_absolute():  # sqlite:///relative/path
        path = Path.cwd() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".init-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=str(uri)).search_experiments(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_tracking_uri(uri: str | None, timeout: float = 5.0) -> None:
    """Stop early, naming the URI, when a tracking server (``http(s)://``) does not answer; local stores pass.

    Args:
        uri: the tracking URI (``None``: MLflow's default, not checked).
        timeout: seconds to wait for the server.

    A local SQLite store that does not exist yet is created here, under a file lock: MLflow builds its
    tables on first use, and two processes doing that at once (site CV shards started together on a fresh
    store) break the schema migration of one of them.

    Raises:
        TrackingServerError: the server does not answer ``/health``.
    """
    if not _is_remote(uri):
        _create_sqlite_store(uri)
        return
    problem = server_problem(str(uri), timeout)
    if problem is not None:
        raise TrackingServerError(
            f"MLflow tracking server {uri} does not answer ({problem}); nothing was trained. Start it (e.g. "
            "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db) or log to a "
            "local store instead (--tracking_uri sqlite:///$PWD/mlflow.db)"
        )


def ensure_experiment(client: Any, name: str, artifact_location: str | None = None) -> str:
    """The id of MLflow experiment ``name``, created if needed, tagged as a model-training experiment.

    The tag (:data:`EXPERIMENT_KIND_TAG` = :data:`MODEL_TRAINING_KIND`) is also added to an existing
    experiment that lacks it (e.g. one MONAI's handler created); a kind set otherwise is left as it is.

    Args:
        client: an ``mlflow.MlflowClient``.
        name: the experiment name.
        artifact_location: where a new experiment keeps its artifacts (``None``: the store decides).

    Raises:
        ValueError: the experiment exists but is deleted.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            )
        except MlflowException as err:  # created meanwhile by another process
            if "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage != "active":
        raise ValueError(f"MLflow experiment '{name}' is deleted; restore it or choose another name")
    if not exp.tags.get(EXPERIMENT_KIND_TAG):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def default_tracking_uri(folder: str | Path = ".") -> str:
    """A local SQLite store ``mlflow.db`` in ``folder`` (the working folder by default)."""
    return f"sqlite:///{Path(folder).resolve() / 'mlflow.db'}"


def metric_key(text: str) -> str:
    """``text`` as MLflow accepts it in a metric key: every other character (``+`` of ``ppi_wbp+dfr``,
    brackets, ``=``) becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", str(text))


def unique_run_name(prefix: str) -> str:
    """``prefix-YYYYmmdd-HHMMSS-pid``: never merges into an earlier run of the same name.

    The name is also a folder's, so characters other than letters, digits, ``_.+=,-`` and a path separator
    (a variant label's ``:``, as in ``lidc-ppi_wbp_partner_zero:mode=detached``) are written ``-``.
    """
    safe = re.sub(r"[^A-Za-z0-9_.+=,/\\-]", "-", prefix)
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


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


def _dataset_row(record: Mapping[str, Any], folder: str | None) -> dict[str, Any]:
    """A datalist record as a table row: lists and objects as JSON and, with ``folder``, paths as the datalist
    writes them.

    Reading a datalist (MONAI's decathlon loader) joins every value that names an existing file with the
    datalist's folder; with ``folder`` given, such a value is written relative to it again (``A/x.nii.gz``,
    ``../dicom/...``). Only path-like strings are considered: a bare identifier (site ``A``) is never a file.
    """
    row: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, (str, os.PathLike)):
            value = os.fspath(value)
            if folder is not None and (os.path.isabs(value) or "/" in value or os.sep in value):
                path = os.path.abspath(value)
                if path.startswith(folder + os.sep) or os.path.exists(path):
                    value = Path(os.path.relpath(path, folder)).as_posix()
        elif isinstance(value, (list, tuple, dict)):
            value = json.dumps(value, sort_keys=True, default=str)
        elif value is not None and not isinstance(value, (bool, int, float)):
            value = str(value)
        row[str(key)] = value
    return row


def _read_datalist(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read the datalist to log it as the run's dataset ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the datalist is a JSON {type(raw).__name__}, not an object")
    return raw


def _display_path(path: Path) -> str:
    """``path`` relative to the working folder (the project's root when a bundle runs) if inside it, else absolute."""
    absolute, cwd = os.path.abspath(path), os.getcwd()
    return Path(os.path.relpath(absolute, cwd)).as_posix() if absolute.startswith(cwd + os.sep) else absolute


def datalist_inputs(datalist: str | Path, parts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> list[Any]:
    """MLflow dataset inputs that name a run's datalist: one per split part, or one for the whole list.

    Each input is a table of the part's records as the datalist writes them (a pandas DataFrame; file paths
    relative to the datalist's folder again, so the same eyes give the same table wherever the data lives), named
    by the datalist's ``name``, with the datalist's path (relative to the working folder when inside it) as its
    source and a digest of the records (the first 8 hex digits of the SHA-256 of their JSON). Its context tag
    (``mlflow.data.context``) is the part's key, e.g. ``training``, ``validation``, ``test``; without ``parts``
    there is one input without a context, of the datalist's ``training`` list as written.

    Args:
        datalist: the datalist JSON.
        parts: context -> the records of that part, as the run uses them; empty parts are left out.

    Returns:
        ``mlflow.entities.DatasetInput`` entities for ``MlflowClient.log_inputs``.

    Raises:
        ValueError: the datalist cannot be read, or (without ``parts``) has no ``training`` list of records.
    """
    import mlflow.data
    import pandas as pd
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    path = Path(datalist)
    raw = _read_datalist(path)
    # the datalist's own name; its folder's (e.g. ga_synth) when it has none
    name = raw.get("name") if isinstance(raw.get("name"), str) and raw["name"].strip() else None
    name = name.strip() if name else Path(os.path.abspath(path)).parent.name
    folder = os.path.abspath(path.parent)
    if parts is None:
        records = raw.get("training")
        if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
            raise ValueError(f"{path}: no 'training' list of records to log as the run's dataset")
        chosen: dict[str | None, Sequence[Mapping[str, Any]]] = {None: records}
    else:
        chosen = {str(context): records for context, records in parts.items() if records}
    written = parts is None  # the file's records as they are; a run's parts hold paths joined with the folder
    source = get_dataset_source_from_json(json.dumps({"uri": _display_path(path)}), source_type="local")
    inputs = []
    for context, records in chosen.items():
        rows = [_dataset_row(r, None if written else folder) for r in records]
        digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:8]
        with warnings.catch_warnings():
            # MLflow's schema inference hints that integer columns cannot hold missing values: a model
            # signature's concern, not a datalist's
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(pd.DataFrame(rows), source=source, name=name, digest=digest)
            entity = Dataset(**dataset.to_dict())
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)] if context else []
        inputs.append(DatasetInput(entity, tags))
    return inputs


class _GuardedClient:
    """An ``MlflowClient`` whose calls go through :meth:`RunTracker._send`, metrics and params copied locally."""

    def __init__(self, client: Any, tracker: RunTracker) -> None:
        self._client = client
        self._tracker = tracker

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if name == "log_batch":
                self._tracker._keep(kwargs.get("metrics", args[1] if len(args) > 1 else ()), "metric")
                self._tracker._keep(kwargs.get("params", args[2] if len(args) > 2 else ()), "param")
            elif name in ("log_metric", "log_param"):
                names = ("run_id", "key", "value", "timestamp", "step")
                rec = {**dict(zip(names, args)), **kwargs}
                self._tracker._write({"kind": name[len("log_") :], **{k: rec.get(k) for k in ("key", "value", "step")}})
            return self._tracker._send(attr, *args, **kwargs)

        return call


def _single(transform: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def unwrapped(output: Any) -> Any:
        value = transform(output)
        return value[0] if isinstance(value, tuple) and len(value) == 1 else value

    return unwrapped


def monai_handlers_on_batch_output(handlers: Sequence[Any]) -> list[Any]:
    """``handlers``, with MONAI's own MLflow handlers made to read the trainers' one-dict-per-batch output.

    The bundles' trainers do not decollate (``decollate: false``): ``state.output`` is one dict for the batch.
    MONAI's ``--tracking mlflow`` appends an :class:`~monai.handlers.MLFlowHandler` whose ``output_transform`` is
    ``from_engine(["loss"], first=True)``, written for decollated lists; on a dict it returns a 1-tuple, which
    MLflow cannot log as a number, and the run stopped at its first iteration. The transform is kept and its
    1-tuple unwrapped. The project's own :class:`RunTracker` logs no iterations and is left alone; nested lists
    are spliced as :func:`ppi_med.distributed.for_this_rank` does.
    """
    flat: list[Any] = []
    for h in handlers:
        flat.extend(h if isinstance(h, (list, tuple)) else [h])
    for h in flat:
        if isinstance(h, MLFlowHandler) and not isinstance(h, RunTracker):
            h.output_transform = _single(h.output_transform)
    return flat


class RunTracker(MLFlowHandler):
    """:class:`monai.handlers.MLFlowHandler` that also records what makes a run reproducible.

    On top of MONAI's handler it logs the hyper-parameters (flattened) as params, writes them in full to
    ``params.json`` as an artifact (long values do not fit MLflow params), sets tags (git commit, seed,
    method), logs the given files as artifacts when training ends, and prints where the run is and the
    command that opens the MLflow UI. The experiment is created as a model-training experiment
    (:func:`ensure_experiment`). The datalist is logged as the run's dataset inputs, one per split part
    (:func:`datalist_inputs`).

    A tracking server is checked when the tracker is built, before any training (:func:`check_tracking_uri`).
    Every metric and param sent to MLflow is also appended to ``<output_dir>/metrics.jsonl``. If the server
    stops answering during the run, the tracker warns once, stops sending, and training goes on. The tracker
    logs the evaluator's metrics of each epoch itself (after the epoch's checkpoint is written, see
    :mod:`ppi_med.resume`); a plain ``MLFlowHandler`` that MONAI's ``--tracking mlflow`` or a user puts on
    ``evaluator``, logging into the same run, is made to keep going as well (its events are re-registered
    behind the same guard), so a lost server cannot stop training from the validation side either.

    Args:
        params: the hyper-parameters, possibly nested.
        tags: extra tags; ``git_commit`` is added.
        output_dir: where ``params.json`` and ``metrics.jsonl`` are written.
        summary_metric: the evaluator metric reported in the closing summary (e.g. ``val_auc``).
        evaluator: the engine holding that metric (``best_metric`` is read from its state).
        reference_metric: a metric of the run printed beside the best one in the closing summary, e.g. the
            linear reference's ``ref_val_auc`` (:mod:`ppi_med.reference`); skipped when the run lacks it.
        datalist: the datalist JSON the run reads; logged as the run's MLflow dataset (``None``: none logged).
        datasets: MLflow context (``training``, ``validation``, ``test``) -> the records of that split part, as
            the run uses them; ``None`` logs the whole datalist as one input.
        **kwargs: passed to :class:`monai.handlers.MLFlowHandler`.

    Raises:
        TrackingServerError: the tracking server does not answer when the tracker is built.
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
        datalist: str | Path | None = None,
        datasets: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        **kwargs: Any,
    ) -> None:
        # MONAI's handler lets MLFLOW_TRACKING_URI win over its argument; check the one it will use
        self.tracking_target = os.environ.get("MLFLOW_TRACKING_URI") or kwargs.get("tracking_uri")
        check_tracking_uri(self.tracking_target)
        self.params = dict(params or {})
        # the commit of the code that runs, wherever the run is started from
        code = git_commit(Path(__file__).resolve().parent)
        self.tags = {"git_commit": code, **{k: str(v) for k, v in (tags or {}).items()}}
        self.output_dir = Path(output_dir) if output_dir else None
        self.summary_metric = summary_metric
        self.evaluator = evaluator
        self.reference_metric = reference_metric
        self.datalist = datalist
        self.datasets = datasets
        flat = flatten_params(self.params)
        # MLflow caps a param value at 6000 characters; the full values are in params.json
        short = {k: v for k, v in flat.items() if len(v) <= 500}
        super().__init__(experiment_param=short, artifacts=artifacts, **kwargs)
        self.client = _GuardedClient(self.client, self)
        self.metrics_file = self.output_dir / "metrics.jsonl" if self.output_dir else None
        #: why the tracking server was given up on during the run (``None`` while it answers)
        self.offline: str | None = None
        self._adopted = False

    # ----- keeping going without the server -----------------------------------------------------------------

    def _write(self, record: Mapping[str, Any]) -> None:
        if self.metrics_file is None:
            return
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3), **record}, default=str) + "\n")

    def _keep(self, entries: Any, kind: str) -> None:
        """Append MLflow ``Metric``/``Param`` entities (or ``name -> value`` at a step) to ``metrics.jsonl``."""
        for e in entries or ():
            self._write({"kind": kind, "key": e.key, "value": e.value, "step": getattr(e, "step", None)})

    def _send(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(...)`` unless the server was lost; a failure because it is gone is warned once and swallowed."""
        if self.offline is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if self.offline is None and not self._lost(err):
                raise
            return None

    def _lost(self, err: BaseException) -> bool:
        """Whether ``err`` means the tracking server is gone (it no longer answers); if so, warn once."""
        if not _is_remote(self.tracking_target):
            return False
        problem = server_problem(str(self.tracking_target), timeout=3.0)
        if problem is None:
            return False
        self.offline = problem
        kept = f"{self.metrics_file}" if self.metrics_file else "the console log"
        warnings.warn(
            f"MLflow tracking server {self.tracking_target} stopped answering during run '{self.run_name}' "
            f"({problem}; the failed call: {type(err).__name__}). Training goes on without it: every metric and "
            f"param is kept in {kept}, the checkpoints in the run folder; the MLflow run stays unfinished.",
            RuntimeWarning,
            stacklevel=2,
        )
        return True

    def _guarded(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # ignite reads the signature through __wrapped__
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._send(fn, *args, **kwargs)

        return call

    def _adopt_evaluator_handlers(self) -> None:
        """Put MONAI ``MLFlowHandler``s on the evaluator that log into this run behind this tracker's guard.

        Such a handler (MONAI's ``--tracking mlflow`` adds one; same store, same run name) would otherwise raise
        from inside validation when the server is lost, and stop training.
        """
        engine = self.evaluator
        if engine is None or self._adopted:
            return
        self._adopted = True
        # ignite offers no public listing of an engine's handlers
        for event, entries in list(getattr(engine, "_event_handlers", {}).items()):
            for func, _args, _kwargs in list(entries):
                owner = getattr(func, "__self__", None)
                if not isinstance(owner, MLFlowHandler) or owner is self or owner.run_name != self.run_name:
                    continue
                if not isinstance(owner.client, _GuardedClient):
                    owner.client = _GuardedClient(owner.client, self)
                    owner._log_metrics = self._local_when_offline(owner, owner._log_metrics)
                # these use what the client returns; the per-epoch logging only sends (and keeps) metrics
                if func.__name__ in ("start", "complete", "close"):
                    engine.remove_event_handler(func, event)
                    engine.add_event_handler(event, self._guarded(func))

    def _local_when_offline(self, handler: MLFlowHandler, log: Callable[..., Any]) -> Callable[..., Any]:
        """``handler._log_metrics`` that, with no MLflow run open (the server was lost), writes locally only."""

        def call(metrics: dict[str, Any], step: int | None = None) -> None:
            if handler.cur_run is None and self.offline is not None:
                for k, v in metrics.items():
                    self._write({"kind": "metric", "key": k, "value": v, "step": step or 0})
                return
            log(metrics, step)

        return call

    # ----- MONAI's handler events ------------------------------------------------------------------------

    def _set_experiment(self) -> None:
        if not self.experiment:
            ensure_experiment(self.client, self.experiment_name, self.artifact_location)
        super()._set_experiment()

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self._local_when_offline(self, super()._log_metrics)(metrics, step)

    def _default_epoch_log(self, engine: Engine) -> None:
        # the evaluator's metrics of this epoch too: one handler logs an epoch, after its checkpoint is written
        from .engine import epoch_metrics

        step = self.global_epoch_transform(engine.state.epoch)
        merged = epoch_metrics(engine, self.evaluator)
        if merged:
            self._log_metrics(merged, step=step)
        if self.state_attributes is not None:  # as MONAI's handler does
            self._log_metrics({a: getattr(engine.state, a, None) for a in self.state_attributes}, step=step)

    def log_missing(self, metrics: Mapping[str, float], step: int) -> None:
        """Log those of ``metrics`` that the run has no value of at ``step`` (a resumed run's last epoch)."""
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        missing = {
            k: v
            for k, v in metrics.items()
            if not any(m.step == step for m in (self._send(self.client.get_metric_history, run_id, k) or []))
        }
        if missing:
            self._log_metrics(missing, step=step)

    def start(self, engine: Engine) -> None:
        self._adopt_evaluator_handlers()
        if self.output_dir is not None and self.params:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "params.json").write_text(json.dumps(self.params, indent=2, default=str))
        self._send(self._start_run, engine)

    def _start_run(self, engine: Engine) -> None:
        super().start(engine)
        run_id = self.cur_run.info.run_id
        for k, v in self.tags.items():
            self.client.set_tag(run_id, k, v)
        if self.output_dir is not None and self.params:
            self.client.log_artifact(run_id, str(self.output_dir / "params.json"))
        if self.datalist is not None:
            # logged again on a resumed run: MLflow keeps one input per dataset and context
            self.client.log_inputs(run_id, datasets=datalist_inputs(self.datalist, self.datasets))

    def close(self) -> None:
        self._send(super().close)

    def complete(self) -> None:
        self._send(super().complete)
        lines = [""]
        if self.summary_metric and self.evaluator is not None:
            best = getattr(self.evaluator.state, "best_metric", None)
            epoch = getattr(self.evaluator.state, "best_metric_epoch", None)
            # the metric that chose the checkpoint (``val_worst_group_acc`` under worst_site selection)
            name = getattr(self.evaluator.state, "key_metric_name", None) or self.summary_metric
            if best is not None and best > -1:
                lines.append(f"best {name}: {best:.4f} (epoch {epoch})")
        if self.cur_run is None and self.offline is None:
            return
        run = self.client.get_run(self.cur_run.info.run_id) if self.cur_run is not None else None
        if self.offline is not None or run is None:
            lines += [
                f"MLflow tracking server {self.tracking_target} was lost during the run ({self.offline}); "
                f"run '{self.run_name}' there is unfinished",
                f"  the run's metrics and params: {self.metrics_file}",
            ]
            print("\n".join(lines), flush=True)
            return
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
