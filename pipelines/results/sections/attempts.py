"""The forms tried against the bars the defaults miss: the LIDC box mask and the digits' line cue."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ppi_med.stats import auc_ci

from ...formatting import p_value
from ..jobs import Job
from ..templates import render
from .lidc import pool_folds
from .outputs import delong_p, fmt

__all__ = ["attempts_section"]

#: how far below the baseline's aligned-cue AUC a digits model may fall and still count as reading the digit
_ALIGNED_MARGIN = 0.05
#: the mask of the LIDC table that misses the bar, whose forms the closing line weighs
_MISSING = "box"


def _lidc_attempts(out: Path, jobs: Sequence[Job]) -> list[str]:
    """Each form tried, pooled over its folds, under the table's row of its mask and beside the baseline."""
    lidc = [j for j in jobs if j.part == "lidc"]
    tried = [j for j in lidc if j.meta.get("attempt")]
    masks = list(dict.fromkeys(j.meta["mask"] for j in tried))
    reference = {"baseline", *(f"ppi_wbp_{m}" for m in masks)}
    pooled = pool_folds(out, [j for j in lidc if j.meta["variant"] in reference or j.meta.get("attempt")])
    if "baseline" not in pooled or not any(j.meta["variant"] in pooled for j in tried):
        return []
    base = pooled["baseline"][0]
    base_auc = auc_ci(base["label"], base["prob"]).auc
    mask_of = {j.meta["variant"]: j.meta["mask"] for j in tried}
    lines, diffs, val = render("attempts", "lidc"), {}, {}

    def row(variant: str, label: str) -> None:
        frame, fold_aucs, best_val = pooled[variant]
        res = auc_ci(frame["label"], frame["prob"])
        diff = diffs[variant] = res.auc - base_auc
        val[variant] = float(np.nanmean(best_val))
        shown = ("", "") if variant == "baseline" else (f"{diff:+.3f}", p_value(delong_p(base, frame)))
        lines.append(
            f"| {label} | {res.auc:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] | {shown[0]} | {shown[1]} "
            f"| {val[variant]:.3f} | {', '.join(fmt(a, 2) for a in fold_aucs)} |"
        )

    row("baseline", "baseline (the table's)")
    forms: dict[str, list[str]] = {}  # mask -> the table's row and its attempts that finished
    for mask in masks:
        forms[mask] = [v for v in (f"ppi_wbp_{mask}", *(v for v, m in mask_of.items() if m == mask)) if v in pooled]
        for v in forms[mask]:
            row(v, f"`{v}` (the table's: the bundle's partner form)" if v == f"ppi_wbp_{mask}" else f"`{v}`")
    lines.append("")
    on_box = [v for v in forms.get(_MISSING, []) if v in mask_of]
    if on_box:
        best = max(on_box, key=lambda v: diffs[v])
        where = "within 0.01 of it" if diffs[best] >= -0.01 else "more than 0.01 below it"
        lines += render("attempts", "lidc_best", name=best, figure=f"{diffs[best]:+.3f}", where=where)
    # what a user without the test folds would do: per mask, the form with the best validation AUC
    compared = {m: sorted(f, key=lambda v: -val[v]) for m, f in forms.items() if len(f) > 1}
    if compared:
        chosen = "; ".join(
            f"{m}: `{f[0]}` ({val[f[0]]:.3f} against {val[f[1]]:.3f}), {diffs[f[0]]:+.3f}" for m, f in compared.items()
        )
        worst = min(diffs[f[0]] for f in compared.values())
        margin = min(val[f[0]] - val[f[1]] for f in compared.values())
        lines += ["", *render("attempts", "lidc_by_validation", chosen=chosen, worst=f"{worst:+.3f}",
                              margin=f"{margin:.3f}")]  # fmt: skip
    return [*lines, ""]


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
            f"| {r['reversed_auc_delta']:+.3f} ({p_value(r['reversed_auc_p'])}) | {r['free_auc_delta']:+.3f} "
            f"| {r['aligned_auc_mean']:.3f} "
        )

    for method in train.index:
        lines.append(f"| `{method}` {cells(train, method)}{cells(last, method)}|")
    tried = train.drop(index="baseline", errors="ignore")
    # a model that reads the cue the other way gains on the reversed digits too, and is no fix: it is told
    # apart by its aligned-cue AUC falling far below the baseline's
    floor = train.loc["baseline", "aligned_auc_mean"] - _ALIGNED_MARGIN if "baseline" in train.index else -np.inf
    reads = tried[tried["aligned_auc_mean"] >= floor]
    if not reads.empty:
        best = reads["reversed_auc_delta"].idxmax()
        r = reads.loc[best]
        met = "met" if r["reversed_auc_delta"] >= 0.30 and r["free_auc_delta"] >= -0.02 else "not met"
        figure = f"{r['reversed_auc_delta']:+.3f} reversed-cue AUC, cue-free {r['free_auc_delta']:+.3f}"
        lines += ["", *render("attempts", "digits_best", name=best, figure=figure, met=met)]
    for name, r in tried[tried["aligned_auc_mean"] < floor].iterrows():
        lines += ["", *render("attempts", "digits_backwards", name=name, gain=f"{r['reversed_auc_delta']:+.3f}",
                              aligned=f"{r['aligned_auc_mean']:.3f}")]  # fmt: skip
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
