"""One report from site-CV studies run apart: the same study, its methods split over machines or sessions.

``--shard`` shares one study between workers that see one output folder and one MLflow store. Studies run
apart (one method per machine, a method added a month later in another store) are merged here instead: each
part is a finished study (its ``summary.json``, ``predictions.csv`` and ``cells.csv``) of the same bundle, sites,
seeds, selection and overrides, with methods of its own. Every part draws the same subject-level split for a
seed (the split depends on the seed alone), so the parts' models scored the same cases and the DeLong tests
pair them as in a one-process study; the merge checks that they did, and refuses parts that differ in anything
else, naming the part and the difference.

CLI::

    python -m pipelines.site_cv.merge --out runs/site_cv/all runs/site_cv/baseline runs/site_cv/dfr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ppi_med.tracking import TrackingServerError, check_tracking_uri, ensure_experiment, git_commit

from ..portable import portable_path, portable_text
from .config import SiteCVError
from .report import REPORT_MARKER, design_lines, study_notes, write_report
from .study import artifact_location
from .tables import site_cv_tables

__all__ = ["StudyPart", "main", "merge_studies", "read_part"]

#: what every part of a merge must share, as ``summary.json`` records it
SHARED = ("bundle_sha256", "sites", "train_sites", "seeds", "checkpoint", "selection", "oracle_sites", "val_fraction")
#: the columns that identify a scored case: two parts must score the same rows for every seed and training site
_CASE = ["train_site", "seed", "test_site", "case", "role", "label"]
_REPO = Path(__file__).resolve().parents[2]


class StudyPart:
    """A finished site-CV study read for merging.

    Args:
        folder: the study's output folder.
        record: its ``summary.json``.
        predictions: its ``predictions.csv``.
        cells: its ``cells.csv``.
    """

    def __init__(self, folder: Path, record: dict[str, Any], predictions: pd.DataFrame, cells: pd.DataFrame) -> None:
        self.folder = folder
        self.record = record
        self.predictions = predictions
        self.cells = cells

    @property
    def overrides(self) -> str:
        """The bundle overrides with every path written as a report publishes it (parts may lie apart)."""
        return portable_text(json.dumps(self.record.get("overrides", {}), sort_keys=True, default=str), self.folder)


def read_part(folder: str | Path) -> StudyPart:
    """Read a finished study from its output folder.

    Raises:
        SiteCVError: the folder holds no finished report, or a report older than the fields a merge checks.
    """
    folder = Path(folder)
    marker = folder / REPORT_MARKER
    if not marker.is_file():
        raise SiteCVError(f"{folder}: no finished site-CV study ({REPORT_MARKER} missing); run it to its report first")
    record = json.loads(marker.read_text())
    missing = [k for k in (*SHARED, "methods", "one_class") if k not in record]
    if missing:
        raise SiteCVError(
            f"{marker} lacks {', '.join(missing)}: written by an older version; run the study again into the same "
            "folder (its cells are reused) to rewrite its report"
        )
    files = {}
    for name in ("predictions.csv", "cells.csv"):
        if not (folder / name).is_file():
            raise SiteCVError(f"{folder}: {name} missing from a finished study")
        files[name] = pd.read_csv(
            folder / name, dtype={"train_site": str, "test_site": str, "case": str, "subject": str}
        )
    return StudyPart(folder, record, files["predictions.csv"], files["cells.csv"])


def _check_parts(parts: Sequence[StudyPart]) -> list[str]:
    """The merged methods, in part order, once every part is checked against the first.

    Raises:
        SiteCVError: fewer than two parts, a setting or the scored cases differing, a method in two parts.
    """
    if len(parts) < 2:
        raise SiteCVError("a merge needs two or more studies")
    first = parts[0]
    owner: dict[str, Path] = {}
    for part in parts:
        for key in SHARED:
            if part.record[key] != first.record[key]:
                raise SiteCVError(
                    f"{part.folder} differs from {first.folder} in {key}: {part.record[key]!r} against "
                    f"{first.record[key]!r}; only studies of the same design merge"
                )
        if part.overrides != first.overrides:
            raise SiteCVError(
                f"{part.folder} has other bundle overrides than {first.folder}: {part.overrides} against "
                f"{first.overrides}"
            )
        for method in part.record["methods"]:
            if method in owner:
                raise SiteCVError(f"method {method} is in both {owner[method]} and {part.folder}; keep it in one part")
            owner[method] = part.folder
    reference = _cases(first.predictions, first.record["methods"][0])
    for part in parts:
        for method in part.record["methods"]:
            cases = _cases(part.predictions, method)
            if not cases.equals(reference):
                extra = pd.concat([cases, reference]).drop_duplicates(keep=False)
                raise SiteCVError(
                    f"{part.folder}: {method} scored other cases than {first.record['methods'][0]} of "
                    f"{first.folder} ({len(extra)} rows differ, e.g. {extra.iloc[0].to_dict()}); the parts "
                    "did not split or score the same data"
                )
    return list(owner)


def _short(folder: Path, out_dir: Path) -> str:
    """A part's folder as the report names it: portable, and its parent named where that alone is ``.../cv``."""
    text = portable_path(folder.resolve(), out_dir)
    return f".../{folder.resolve().parent.name}/{folder.name}" if text.startswith(".../") else text


def _cases(preds: pd.DataFrame, method: str) -> pd.DataFrame:
    rows = preds.loc[preds["method"] == method, _CASE]
    return rows.sort_values(_CASE).reset_index(drop=True)


def merge_studies(
    folders: Sequence[str | Path],
    out_dir: str | Path,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> list[Path]:
    """Merge finished studies of the same design into one report, as if one process had run every method.

    Args:
        folders: the studies' output folders; their methods in this order.
        out_dir: the merged report's folder (an earlier report there moves to ``history/<its time>/``).
        tracking_uri: MLflow store of the merged report's run (default: the first part's).
        experiment: its experiment (default: the first part's).

    Returns:
        The files written (also the MLflow run's artifacts).

    Raises:
        SiteCVError: a part that is not a finished study, or parts that differ (see :func:`_check_parts`).
    """
    import mlflow

    t_start = time.perf_counter()
    parts = [read_part(f) for f in folders]
    methods = _check_parts(parts)
    first = parts[0].record
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == p.folder.resolve() for p in parts):
        raise SiteCVError(f"--out {out_dir} is one of the parts; the merged report goes into a folder of its own")
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = pd.concat([p.predictions for p in parts], ignore_index=True)
    cells = pd.concat([p.cells for p in parts], ignore_index=True)
    tables = site_cv_tables(preds, methods, first["train_sites"], first["sites"])

    uri = tracking_uri or first["tracking_uri"]
    experiment = experiment or first["experiment"]
    check_tracking_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        exp_id = ensure_experiment(client, experiment, artifact_location=artifact_location(uri))
    except ValueError as err:  # a deleted experiment
        raise SiteCVError(str(err)) from err
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = client.create_run(exp_id, run_name=f"site-cv-merge-{stamp}", tags={"cv_kind": "site_cv_merge"})
    run_id = run.info.run_id
    for k, v in {"parts": ",".join(str(p.folder) for p in parts), "methods": ",".join(methods)}.items():
        client.log_param(run_id, k, v[:500])
    status = "FAILED"
    try:
        n_trained = int(sum(p.record.get("n_trained", 0) for p in parts))
        extra = [n for p in parts for n in p.record.get("study_notes", [])]
        notes = study_notes(first["val_fraction"], first["checkpoint"], first["one_class"], extra, tables)
        record = {
            **{k: first[k] for k in ("config_file", "datalist", *SHARED, "one_class", "overrides")},
            "stamp": stamp,
            "command": sys.argv,
            "methods": methods,
            "study_notes": list(dict.fromkeys(extra)),
            "tracking_uri": uri,
            "experiment": experiment,
            "parent_run_id": run_id,
            "parts": [str(p.folder) for p in parts],
            "n_trained": n_trained,
            "n_reused": len(cells) - n_trained,
            "wall_seconds": round(time.perf_counter() - t_start, 2),
        }
        header = [
            f"- merged from {len(parts)} studies run apart: "
            + "; ".join(f"{', '.join(p.record['methods'])} (`{_short(p.folder, out_dir)}`)" for p in parts),
            *design_lines(record, parts[0].overrides, out_dir),
            f"- MLflow: experiment `{experiment}`, merge run `{run_id}`, store `{portable_text(uri, out_dir)}`; "
            "the parts' parent runs: " + ", ".join(f"`{p.record.get('parent_run_id')}`" for p in parts),
            f"- cells: {len(cells)} (trained in their parts); merged in {record['wall_seconds']:.1f} s; "
            f"git {git_commit(_REPO)[:12]}",
        ]
        files = write_report(out_dir, tables, preds, cells, header, notes, record, client, run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    print(f"MLflow merge run {run_id} in experiment '{experiment}' ({uri})")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pipelines.site_cv.merge --out OUT PART PART [...]``.

    Returns:
        0 on success, 2 on a bad request (message on stderr).
    """
    p = argparse.ArgumentParser(
        prog="python -m pipelines.site_cv.merge",
        description="Merge finished site-CV studies of the same design, each with methods of its own (run on other "
        "machines or in other MLflow stores), into one report with the DeLong tests across all their methods.",
    )
    p.add_argument("parts", nargs="+", help="the studies' output folders (their methods in this order)")
    p.add_argument("--out", required=True, help="the merged report's folder")
    p.add_argument("--tracking-uri", default=None, help="MLflow store of the merge run (default: the first part's)")
    p.add_argument("--experiment", default=None, help="its experiment (default: the first part's)")
    args = p.parse_args(argv)
    try:
        merge_studies(args.parts, args.out, args.tracking_uri, args.experiment)
    except (SiteCVError, TrackingServerError) as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
