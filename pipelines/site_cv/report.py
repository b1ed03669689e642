"""Site-CV report: the tables as files, on the console and in ``summary.md``, with the figures and the cells.

:func:`write_study_report` writes a study's whole report into its output folder (moving an earlier one to
``history/<time>/``) and into its MLflow parent run. A method's label enters file names through
:func:`pipelines.site_cv.text.file_stem`.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ppi_med.tracking import git_commit, metric_key

from ..portable import portable_path, portable_text
from .config import SiteCVConfig
from .figures import plot_auc_heatmaps, plot_pvalue_heatmap, plot_roc_grids
from .tables import SiteCVTables
from .text import file_stem, format_matrix, format_value, markdown_matrix, method_title

if TYPE_CHECKING:  # the study imports this module to write its report
    from .study import Study

__all__ = [
    "REPORT_MARKER",
    "archive_previous_report",
    "console_report",
    "design_lines",
    "markdown_report",
    "selection_line",
    "study_notes",
    "write_report",
    "write_study_report",
    "write_tables",
]

#: the report's record; its presence marks a finished report in an output folder
REPORT_MARKER = "summary.json"
_REPO = Path(__file__).resolve().parents[2]


def _frame_json(df: pd.DataFrame) -> dict:
    return {
        str(r): {str(c): (None if not math.isfinite(float(df.loc[r, c])) else float(df.loc[r, c])) for c in df.columns}
        for r in df.index
    }


def write_tables(tables: SiteCVTables, out_dir: str | Path) -> list[Path]:
    """CSV and JSON of every matrix, and the pooled comparisons, in ``out_dir``.

    Files: ``auc_<method>.{csv,json}`` (seed mean with Mean/STD), ``auc_<method>_seed<s>.csv``,
    ``pvalue_<method>_vs_<ref>.{csv,json}``, ``aucdiff_<method>_vs_<ref>.csv``,
    ``pvalue_<method>_vs_<ref>_seed<s>.csv``, ``pooled_offdiag.{csv,json}``, ``tables.json`` (all of it).

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []

    def save(df: pd.DataFrame, stem: str, with_json: bool = True) -> None:
        stem = file_stem(stem)
        df.to_csv(out_dir / f"{stem}.csv")
        written.append(out_dir / f"{stem}.csv")
        if with_json:
            (out_dir / f"{stem}.json").write_text(json.dumps(_frame_json(df), indent=2))
            written.append(out_dir / f"{stem}.json")

    for m, df in tables.auc.items():
        save(df, f"auc_{m}")
        if len(tables.auc_by_seed[m]) > 1:
            for s, sdf in tables.auc_by_seed[m].items():
                save(sdf, f"auc_{m}_seed{s}", with_json=False)
    ref = tables.reference
    for m, df in tables.pvalues.items():
        save(df, f"pvalue_{m}_vs_{ref}")
        save(tables.auc_diff[m], f"aucdiff_{m}_vs_{ref}", with_json=False)
        if len(tables.pvalues_by_seed[m]) > 1:
            for s, sdf in tables.pvalues_by_seed[m].items():
                save(sdf, f"pvalue_{m}_vs_{ref}_seed{s}", with_json=False)
    if tables.pooled:
        pooled = pd.DataFrame([p.to_dict() for p in tables.pooled.values()]).set_index("method")
        pooled.to_csv(out_dir / "pooled_offdiag.csv")
        (out_dir / "pooled_offdiag.json").write_text(
            json.dumps({m: tables.to_dict()["pooled"][m] for m in tables.pooled}, indent=2)
        )
        written += [out_dir / "pooled_offdiag.csv", out_dir / "pooled_offdiag.json"]
    (out_dir / "tables.json").write_text(json.dumps(tables.to_dict(), indent=2))
    written.append(out_dir / "tables.json")
    return written


def _pooled_rows(tables: SiteCVTables) -> pd.DataFrame:
    rows = {
        m: {
            "cases": p.n_cases,
            f"AUC {m}": p.auc,
            f"AUC {p.reference}": p.auc_reference,
            "pooled diff": p.auc_diff,
            "mean cell diff": p.mean_cell_diff,
            "z": p.z,
            "p": p.p_value,
        }
        for m, p in tables.pooled.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def console_report(tables: SiteCVTables) -> str:
    """The AUC matrices, p-value matrices and pooled comparisons as aligned plain text."""
    parts = []
    seeds = (
        f" (mean of {len(tables.seeds)} seeds: {', '.join(map(str, tables.seeds))})" if len(tables.seeds) > 1 else ""
    )
    parts.append(f"AUC, rows = training site, columns = test site{seeds}")
    for m, df in tables.auc.items():
        parts += ["", format_matrix(df, method_title(m))]
    for m, df in tables.pvalues.items():
        parts += ["", f"DeLong p-values, {m} vs {tables.reference} (paired, same cases)"]
        parts.append(format_matrix(df, m, p_value=True))
    if tables.pooled:
        parts += ["", "Pooled off-diagonal comparison (all cross-site cases concatenated; paired DeLong)"]
        for m, p in tables.pooled.items():
            parts.append(
                f"  {m}: AUC {format_value(p.auc)} vs {p.reference} {format_value(p.auc_reference)} "
                f"over {p.n_cases} cases "
                f"(pooled diff {p.auc_diff:+.3f}, mean cell diff {p.mean_cell_diff:+.3f}), "
                f"z = {format_value(p.z, 2)}, p = {format_value(p.p_value, 4, True)}"
            )
    return "\n".join(parts)


def markdown_report(
    tables: SiteCVTables,
    header: Sequence[str],
    figures: Sequence[Path],
    cells: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
    base: Path | None = None,
) -> str:
    """``summary.md``: the run's context, the tables, the pooled comparison, figures and the cells.

    Args:
        tables: the tables.
        header: Markdown lines describing the invocation (put under the title).
        figures: figure paths, linked relative to ``base``.
        cells: one row per (method, site, seed) cell with its MLflow run and status.
        notes: remarks appended at the end.
        base: folder the summary lives in (for relative links).

    Returns:
        The Markdown text.
    """
    lines = ["# Site-wise cross-validation", "", *header, ""]
    seeds = f" Each cell is the mean over seeds {', '.join(map(str, tables.seeds))}." if len(tables.seeds) > 1 else ""
    lines += [
        "## AUC",
        "",
        "Rows: training site; columns: test site (diagonal, in bold: the training site's held-out subjects). "
        f"Mean and STD (sample, ddof = 1) along each row, as in table 2.3.{seeds}",
        "",
    ]
    for m, df in tables.auc.items():
        lines += [markdown_matrix(df, method_title(m)), ""]
    if tables.pvalues:
        lines += ["## DeLong tests against the baseline", ""]
        for m, df in tables.pvalues.items():
            lines += [f"p-values, {m} vs {tables.reference} (paired DeLong, same cases):", ""]
            lines += [markdown_matrix(df, m, p_value=True), ""]
            lines += [f"AUC difference, {m} - {tables.reference}:", ""]
            lines += [markdown_matrix(tables.auc_diff[m], m), ""]
    if tables.pooled:
        lines += [
            "## Pooled off-diagonal comparison",
            "",
            "All cross-site cases concatenated per method (a case counts once per model trained elsewhere); "
            "paired DeLong test; mean cell diff = mean over off-diagonal cells of the AUC difference.",
            "",
        ]
        pooled = _pooled_rows(tables)
        cols = list(pooled.columns)
        lines.append("| method | " + " | ".join(cols) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
        for m, row in pooled.iterrows():
            cells_txt = [
                str(int(row[c])) if c == "cases" else format_value(row[c], 4 if c == "p" else 3, c == "p") for c in cols
            ]
            lines.append(f"| {m} | " + " | ".join(cells_txt) + " |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            rel = f.relative_to(base) if base is not None and f.is_relative_to(base) else f
            lines.append(f"- [{f.name}]({rel})")
        lines.append("")
    if cells is not None and not cells.empty:
        lines += ["## Cells", "", "| " + " | ".join(cells.columns) + " |", "|" + " --- |" * len(cells.columns)]
        for _, row in cells.iterrows():
            lines.append("| " + " | ".join(str(v) for v in row.to_numpy()) + " |")
        lines.append("")
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def archive_previous_report(out_dir: Path) -> Path | None:
    """Move an earlier invocation's report files to ``history/<its time>/`` so nothing is overwritten.

    Returns:
        The folder they went to, or ``None`` when ``out_dir`` held no report.
    """
    marker = out_dir / REPORT_MARKER
    if not marker.is_file():
        return None
    try:
        old = json.loads(marker.read_text())
    except ValueError:
        old = {}
    base = out_dir / "history" / str(old.get("stamp", time.strftime("%Y%m%d-%H%M%S")))
    dest, k = base, 1
    while dest.exists():  # two invocations in the same second
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir(parents=True)
    names = set(old.get("files", [])) | {REPORT_MARKER}
    for name in sorted(names):
        src = out_dir / name
        if src.is_file() and src.parent == out_dir:
            shutil.move(str(src), dest / name)
    return dest


def study_notes(
    val_fraction: float, checkpoint: str, one_class: dict[str, str], extra: Sequence[str], tables: SiteCVTables
) -> list[str]:
    """Caveats for the summary: what the diagonal means, missing tests, undefined cells.

    Args:
        val_fraction: the bundle's validation share of a training site's subjects.
        checkpoint: the checkpoint scored (``best`` or ``final``).
        one_class: the sites with one class, each with its description.
        extra: the study's own notes (one-class sites and the like).
        tables: the matrices.
    """
    where = f"Diagonal cells use the training site's held-out subjects (val_fraction {val_fraction}); "
    if checkpoint == "best":
        notes = [
            where + "they also chose the best checkpoint (best validation AUC), so the diagonal is optimistic; "
            "--checkpoint final scores the last epoch's weights instead."
        ]
    else:
        notes = [where + "the final checkpoint is scored, so they did not select the model."]
    if tables.reference is None:
        notes.append("No 'baseline' among the methods: no DeLong tests.")
    notes += [n for n in extra if n not in notes]
    undefined: dict[str, list[str]] = {}
    for m, df in tables.auc.items():
        for r in df.index:
            for c in tables.test_sites:
                if not math.isfinite(float(df.loc[r, c])):
                    why = f"site {c} has {one_class[c]}" if c in one_class else "a class missing"
                    undefined.setdefault(why, []).append(f"{m} {r}->{c}")
    for why, cells in undefined.items():
        notes.append(f"AUC undefined ({why}; no DeLong test there) in: {', '.join(cells)}")
    return notes


def write_report(
    out_dir: Path,
    tables: SiteCVTables,
    preds: pd.DataFrame,
    cells: pd.DataFrame,
    header: Sequence[str],
    notes: Sequence[str],
    record: dict,
    client: Any,
    run_id: str,
) -> list[Path]:
    """Files, figures and summary in ``out_dir``, the same in the MLflow run ``run_id``, the tables on the console.

    Args:
        out_dir: the report's folder (an earlier report there moves to ``history/<its time>/``).
        tables: the matrices.
        preds: every case's score.
        cells: one row per (method, site, seed) cell, with its ``status`` and ``key``.
        header: Markdown lines describing the study (put under the title).
        notes: remarks appended at the end.
        record: what ``summary.json`` records of the study besides the tables and cells (``stamp`` first).
        client: MLflow client of the run's store.
        run_id: the MLflow run the files and summary metrics go to.

    Returns:
        The files written (also logged as the run's artifacts).
    """
    archived = archive_previous_report(out_dir)
    files = write_tables(tables, out_dir)
    preds.to_csv(out_dir / "predictions.csv", index=False)
    cells.to_csv(out_dir / "cells.csv", index=False)
    files += [out_dir / "predictions.csv", out_dir / "cells.csv"]
    figures = plot_auc_heatmaps(tables, out_dir)
    pfig = plot_pvalue_heatmap(tables, out_dir)
    figures += [pfig] if pfig is not None else []
    figures += plot_roc_grids(preds, tables, out_dir)
    files += figures
    md = markdown_report(tables, header, figures, cells.drop(columns=["key"]), notes, base=out_dir)
    (out_dir / "summary.md").write_text(md)
    files.append(out_dir / "summary.md")
    summary = {
        **record,
        "previous_report": str(archived) if archived else None,
        "summary_metrics": tables.to_dict()["summary_metrics"],
        "cells": cells.to_dict(orient="records"),
        "files": [f.name for f in files] + [REPORT_MARKER],
    }
    (out_dir / REPORT_MARKER).write_text(json.dumps(summary, indent=2, default=str))
    files.append(out_dir / REPORT_MARKER)

    for name, value in tables.summary_metrics().items():
        if math.isfinite(value):
            client.log_metric(run_id, metric_key(name), value)
    client.log_metric(run_id, "n_trained_cells", int(record.get("n_trained", 0)))
    client.log_metric(run_id, "wall_seconds", float(record.get("wall_seconds", 0.0)))
    for f in files:
        top = f.name in ("summary.md", REPORT_MARKER)
        client.log_artifact(
            run_id, str(f), artifact_path="figures" if f.suffix == ".png" else None if top else "tables"
        )
    print("\n" + console_report(tables))
    print(f"\nreport: {out_dir / 'summary.md'}")
    return files


def write_study_report(
    study: Study,
    cfg: SiteCVConfig,
    tables: SiteCVTables,
    preds: pd.DataFrame,
    cells: pd.DataFrame,
    t_start: float,
) -> list[Path]:
    """A study's report (:func:`write_report`) into its output folder and its MLflow parent run.

    Args:
        study: the study (its output folder, sites, methods and MLflow parent run).
        cfg: the invocation.
        tables: the matrices.
        preds: every case's score.
        cells: one row per cell.
        t_start: ``time.perf_counter()`` at the start of the invocation (for the wall time).

    Returns:
        The files written (also logged as the parent run's artifacts).
    """
    out_dir = study.out_dir
    seconds = time.perf_counter() - t_start
    n_trained = int((cells["status"] == "trained").sum())
    record = {
        "stamp": study.stamp,
        "command": sys.argv,
        "config_file": str(study.config_file),
        "bundle_sha256": study.bundle_sha,
        "datalist": str(study.datalist),
        "sites": study.sites,
        "train_sites": study.train_sites,
        "methods": study.methods,
        "seeds": study.seeds,
        "checkpoint": cfg.checkpoint,
        "selection": cfg.selection,
        "oracle_sites": list(cfg.oracle_sites or []),
        "val_fraction": study.val_fraction,
        "one_class": study.one_class,
        "study_notes": study.notes,
        "overrides": dict(cfg.overrides),
        "tracking_uri": study.tracking_uri,
        "experiment": cfg.experiment,
        "parent_run_id": study.parent_id,
        "n_trained": n_trained,
        "n_reused": len(cells) - n_trained,
        "wall_seconds": round(seconds, 2),
    }
    header = [
        *design_lines(record, portable_text(json.dumps(dict(cfg.overrides), default=str), out_dir), out_dir),
        f"- MLflow: experiment `{cfg.experiment}`, parent run `{study.parent_id}`, "
        f"store `{portable_text(study.tracking_uri, out_dir)}`",
        f"- cells: {len(cells)} ({n_trained} trained, {len(cells) - n_trained} reused); "
        f"wall time {seconds:.1f} s; git {git_commit(_REPO)[:12]}",
    ]
    notes = study_notes(study.val_fraction, cfg.checkpoint, study.one_class, study.notes, tables)
    files = write_report(out_dir, tables, preds, cells, header, notes, record, study.client, study.parent_id)
    if cfg.out_dir is None:
        print(f"  to resume or extend this study (more seeds, methods), run again with --out {out_dir}")
    print(f"MLflow parent run {study.parent_id} in experiment '{cfg.experiment}' ({study.tracking_uri})")
    if study.tracking_uri.startswith("sqlite:///"):
        print(f"  open it with: mlflow ui --backend-store-uri {study.tracking_uri}")
    return files


def design_lines(record: dict[str, Any], overrides: str, out_dir: Path) -> list[str]:
    """The header lines that say what a study ran (bundle, datalist, sites, methods, seeds, checkpoint, selection
    rule, bundle overrides), from its ``summary.json`` record; ``overrides`` as the report publishes them."""
    return [
        f"- bundle: `{portable_path(record['config_file'], out_dir)}`; "
        f"datalist: `{portable_path(record['datalist'], out_dir)}`",
        f"- sites: {', '.join(record['sites'])} (trained on {', '.join(record['train_sites'])}); "
        f"methods: {', '.join(record['methods'])}; seeds: {', '.join(map(str, record['seeds']))}; "
        f"checkpoint: {record['checkpoint']}",
        selection_line(record["selection"], record["oracle_sites"]),
        f"- bundle overrides: `{overrides}`",
    ]


def selection_line(selection: str, oracle_sites: Sequence[str] | None) -> str:
    """The summary's header line on checkpoint selection, the oracle named as such."""
    oracle = f" (an oracle: chosen on half of {', '.join(oracle_sites or [])}'s subjects, which are not scored)"
    return f"- checkpoint selection: **{selection}**" + (oracle if selection == "oracle" else "")
