"""The forms tried against the bars the defaults miss: the LIDC box mask and the digits' line cue."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ppi_med.stats import auc_ci

from ..jobs import Job
from ..templates import render
from .lidc import pool_folds
from .outputs import delong_p, fmt

__all__ = ["attempts_section"]

#: the LIDC table's own rows the attempts are read against: the baseline and the setting that misses the bar
_LIDC_REFERENCE = ("baseline", "ppi_wbp_box")


def _lidc_attempts(out: Path, jobs: Sequence[Job]) -> list[str]:
    """Each box-mask form pooled over its folds, beside the baseline and the table's own box row."""
    lidc = [j for j in jobs if j.part == "lidc"]
    pooled = pool_folds(out, [j for j in lidc if j.meta.get("attempt") or j.meta["variant"] in _LIDC_REFERENCE])
    tried = [v for v in pooled if v not in _LIDC_REFERENCE]
    if "baseline" not in pooled or not tried:
        return []
    base = pooled["baseline"][0]
    base_auc = auc_ci(base["label"], base["prob"]).auc
    lines = render("attempts", "lidc")
    diffs = {}
    for v, (frame, fold_aucs, best_val) in pooled.items():
        res = auc_ci(frame["label"], frame["prob"])
        diff, p = res.auc - base_auc, np.nan if v == "baseline" else delong_p(base, frame)
        if v != "baseline":
            diffs[v] = diff
        label = {"baseline": "baseline (the table's)", "ppi_wbp_box": "`ppi_wbp_box` (the table's: partner form, 1.2)"}
        lines.append(
            f"| {label.get(v, f'`{v}`')} | {res.auc:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] "
            f"| {'' if v == 'baseline' else f'{diff:+.3f}'} | {'' if v == 'baseline' else fmt(p)} "
            f"| {np.nanmean(best_val):.3f} | {', '.join(fmt(a, 2) for a in fold_aucs)} |"
        )
    best = max(tried, key=lambda v: diffs[v])
    where = "within 0.01 of it" if diffs[best] >= -0.01 else "more than 0.01 below it"
    return [*lines, "", *render("attempts", "lidc_best", name=best, figure=f"{diffs[best]:+.3f}", where=where), ""]


def _summary(out: Path, job: str) -> pd.DataFrame | None:
    """The line cue's summary of a shortcut job, by method."""
    path = out / "jobs" / job / "out" / "line" / "summary.csv"
    return pd.read_csv(path).set_index("method") if path.is_file() else None


def _digits_attempts(out: Path, fig_dir: Path) -> list[str]:
    """Each setting's gains on the line cue under ``train`` selection and at the last epoch."""
    train, last = _summary(out, "shortcut-attempts-train"), _summary(out, "shortcut-attempts-last")
    if train is None:
        return []
    lines = render("attempts", "digits")

    def cells(table: pd.DataFrame | None, method: str) -> str:
        if table is None or method not in table.index:
            return "| | | "
        r = table.loc[method]
        if method == "baseline":
            return f"| | | {r['aligned_auc_mean']:.3f} "
        return (
            f"| {r['reversed_auc_delta']:+.3f} ({fmt(r['reversed_auc_p'])}) | {r['free_auc_delta']:+.3f} "
            f"| {r['aligned_auc_mean']:.3f} "
        )

    for method in train.index:
        lines.append(f"| `{method}` {cells(train, method)}{cells(last, method)}|")
    tried = train.drop(index="baseline", errors="ignore")
    best = tried["reversed_auc_delta"].idxmax()
    r = tried.loc[best]
    met = "met" if r["reversed_auc_delta"] >= 0.30 and r["free_auc_delta"] >= -0.02 else "not met"
    figure = f"{r['reversed_auc_delta']:+.3f} reversed-cue AUC, cue-free {r['free_auc_delta']:+.3f}"
    lines += ["", *render("attempts", "digits_best", name=best, figure=figure, met=met)]
    png = out / "jobs" / "shortcut-attempts-train" / "out" / "line" / "epochs.png"
    if png.is_file():
        shutil.copy2(png, fig_dir / "attempts_line_epochs.png")
        lines += ["", "![each epoch of the line attempts under train selection](results/attempts_line_epochs.png)"]
    return [*lines, ""]


def attempts_section(out: Path, jobs: Sequence[Job], fig_dir: Path) -> list[str]:
    """The attempts' tables, each where its jobs finished; empty where none did.

    Args:
        out: the study folder.
        jobs: the study's jobs (the LIDC attempts and their reference rows, the ``shortcut-attempts-*`` jobs).
        fig_dir: the report's figure folder (the line attempts' per-epoch figure is copied there).
    """
    body = [*_lidc_attempts(out, jobs), *_digits_attempts(out, fig_dir)]
    return [*render("attempts", "intro"), "", *body] if body else []
