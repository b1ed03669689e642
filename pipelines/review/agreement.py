"""Readers' grades folded into figures per saliency method, and logged to MLflow.

Per method (``method`` or ``method/target`` when an export has several targets):

- ``n_cases``, ``n_readers``, ``n_grades`` (overlays with a coverage answer);
- ``share_yes``, ``share_partly``, ``share_no``: of the grades where the reader saw a finding (coverage not
  ``no finding``), the share whose answer was yes / partly / no; ``share_no_finding`` of all grades;
- ``share_agrees``: of the answers to "do you agree with the prediction", the share of yes;
- between readers, over the overlays two readers both graded: ``pair_agreement`` (share of equal coverage
  answers, mean over reader pairs), ``kappa`` (Cohen's kappa of the coverage answers, mean over the pairs where
  it is defined; with two readers it is their kappa), ``n_paired`` (overlays graded by two or more readers).

MLflow: the run of the export, found by ``export.json`` (the export's checkpoint lies in
``runs/<run name>/models/``, and ``<run name>`` is the training run's MLflow name), or ``--run-id``, or a new run
in the experiment ``review``; metrics ``review/<method>/<figure>``, the summary and the grade files as artifacts.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from .cases import ReviewInputError, load_cases, overlay_keys
from .grades import COVERAGE, GRADE_COLUMNS, read_grades

__all__ = ["cohen_kappa", "load_all_grades", "summarise", "find_export_run", "log_summary", "summarise_export"]


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two readers' answers to the same items; ``nan`` where chance agreement is 1.

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two equally long, non-empty answer lists, got {len(a)} and {len(b)}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    cats = set(a) | set(b)
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    if expected >= 1.0:
        return math.nan  # both readers gave one and the same answer throughout: kappa is undefined
    return (observed - expected) / (1.0 - expected)


def load_all_grades(export_dir: str | Path) -> tuple[Path, pd.DataFrame]:
    """Every reader's grades of an export that match its index, as one table.

    Returns:
        The export folder and a table with :data:`GRADE_COLUMNS` (rows of cases no longer in the index are left
        out with a warning).

    Raises:
        ReviewInputError: no index, no ``review/`` folder or no grade file in it, or a grade file without the
            grade columns (named).
    """
    root, cases = load_cases(export_dir)
    keys = overlay_keys(cases)
    review = root / "review"
    files = sorted(review.glob("*.csv")) if review.is_dir() else []
    if not files:
        raise ReviewInputError(f"{review}: no grades yet; readers grade with: python -m pipelines.review {root}")
    rows = []
    for f in files:
        for r in read_grades(f):
            if (r["method"], r["target"]) in keys.get(r["case_id"], set()):
                rows.append({**r, "reader": f.stem})
            else:
                warnings.warn(
                    f"{f}: case {r['case_id']} ({r['method']}, {r['target']}) is not in the index; left out",
                    stacklevel=2,
                )
    return root, pd.DataFrame(rows, columns=list(GRADE_COLUMNS))


def _group_names(grades: pd.DataFrame) -> pd.Series:
    several = grades.groupby("method")["target"].nunique()
    return grades.apply(lambda r: r["method"] if several[r["method"]] == 1 else f"{r['method']}/{r['target']}", axis=1)


def summarise(grades: pd.DataFrame) -> pd.DataFrame:
    """The figures per method (see the module's text), one row each, sorted by method.

    Args:
        grades: the table of :func:`load_all_grades`.
    """
    if grades.empty:
        return pd.DataFrame(columns=["method"])
    grades = grades.assign(group=_group_names(grades))
    out = []
    for name, g in grades.groupby("group", sort=True):
        cov = g[g["coverage"].isin(COVERAGE)]
        finding = cov[cov["coverage"] != "no finding"]
        agrees = g[g["agrees"].isin(("yes", "no"))]
        row: dict[str, Any] = {
            "method": name,
            "n_cases": int(g["case_id"].nunique()),
            "n_readers": int(g["reader"].nunique()),
            "n_grades": len(cov),
            "share_yes": _share(finding["coverage"] == "yes"),
            "share_partly": _share(finding["coverage"] == "partly"),
            "share_no": _share(finding["coverage"] == "no"),
            "share_no_finding": _share(cov["coverage"] == "no finding"),
            "share_agrees": _share(agrees["agrees"] == "yes"),
        }
        by_item = cov.pivot_table(
            index=["case_id", "target"], columns="reader", values="coverage", aggfunc="first"
        )  # one answer per overlay and reader
        row["n_paired"] = int((by_item.notna().sum(axis=1) >= 2).sum())
        agreements, kappas = [], []
        for r1, r2 in itertools.combinations(by_item.columns, 2):
            both = by_item[[r1, r2]].dropna()
            if both.empty:
                continue
            a, b = both[r1].tolist(), both[r2].tolist()
            agreements.append(sum(x == y for x, y in zip(a, b)) / len(a))
            k = cohen_kappa(a, b)
            if not math.isnan(k):
                kappas.append(k)
        row["pair_agreement"] = sum(agreements) / len(agreements) if agreements else math.nan
        row["kappa"] = sum(kappas) / len(kappas) if kappas else math.nan
        out.append(row)
    return pd.DataFrame(out)


def _share(mask: pd.Series) -> float:
    return float(mask.mean()) if len(mask) else math.nan


def find_export_run(root: Path, client: Any) -> str | None:
    """The MLflow run of the model an export explains: ``export.json``'s checkpoint is in
    ``runs/<run name>/models/``; the run of that name in the store. ``None`` when there is none, or several.
    """
    meta = root / "export.json"
    if not meta.is_file():
        return None
    try:
        checkpoint = json.loads(meta.read_text()).get("checkpoint")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not checkpoint:
        return None
    ckpt = Path(checkpoint)
    if ckpt.parent.name != "models":
        return None
    name = ckpt.parent.parent.name
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    found = client.search_runs(exps, filter_string=f"attributes.run_name = '{name}'", max_results=2)
    return found[0].info.run_id if len(found) == 1 else None


def log_summary(
    root: Path,
    summary: pd.DataFrame,
    *,
    tracking_uri: str,
    run_id: str | None = None,
    experiment: str = "review",
) -> tuple[str, str]:
    """Log the figures as ``review/<method>/<figure>`` metrics and the grade files and summary as artifacts.

    Args:
        root: the export folder.
        summary: the table of :func:`summarise`.
        tracking_uri: the MLflow store (given explicitly: the process-wide URI is left alone).
        run_id: the run to log into; ``None``: the export's run (:func:`find_export_run`), else a new run.
        experiment: the experiment of a new run.

    Returns:
        The run id and how it was chosen (``given``, ``export``, ``new``).

    Raises:
        ReviewInputError: ``run_id`` is not a run of that store.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ppi_med.tracking import git_commit, log_batch

    client = MlflowClient(tracking_uri=tracking_uri)
    how = "given"
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException as err:
            raise ReviewInputError(f"MLflow run {run_id} not found in {tracking_uri}: {err}") from err
    else:
        run_id, how = find_export_run(root, client), "export"
        if run_id is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
            run = client.create_run(
                exp_id,
                run_name=f"review-{root.name}",
                tags={"kind": "review", "export_dir": str(root), "git_commit": git_commit()},
            )
            run_id, how = run.info.run_id, "new"
    metrics = {}
    for _, r in summary.iterrows():
        for col, value in r.items():
            if col != "method" and value is not None and not (isinstance(value, float) and math.isnan(value)):
                metrics[f"review/{r['method']}/{col}"] = float(value)
    log_batch(client, run_id, metrics=metrics)
    client.set_tag(run_id, "review.export_dir", str(root))
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "review_summary.csv"
        summary.to_csv(table, index=False)
        client.log_artifact(run_id, str(table), "review")
    for f in sorted((root / "review").glob("*.csv")):
        client.log_artifact(run_id, str(f), "review/grades")
    if how == "new":
        client.set_terminated(run_id)
    return run_id, how


def summarise_export(
    export_dir: str | Path, *, tracking_uri: str, run_id: str | None = None, experiment: str = "review"
) -> tuple[pd.DataFrame, str, str]:
    """Summarise an export's grades, write ``review/summaries/summary-<time>.csv`` and log to MLflow.

    Returns:
        The summary, the MLflow run id and how the run was chosen.

    Raises:
        ReviewInputError: see :func:`load_all_grades` and :func:`log_summary`.
    """
    root, grades = load_all_grades(export_dir)
    summary = summarise(grades)
    out = root / "review" / "summaries"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"summary-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    n = 1
    while path.exists():  # never replace an earlier summary
        n += 1
        path = out / f"summary-{time.strftime('%Y%m%d-%H%M%S')}-{n}.csv"
    with open(path, "x", newline="") as fh:
        summary.to_csv(fh, index=False)
    rid, how = log_summary(root, summary, tracking_uri=tracking_uri, run_id=run_id, experiment=experiment)
    return summary, rid, how
