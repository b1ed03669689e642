"""The LIDC table: each method's held-out predictions pooled over the fold rotations, DeLong against the baseline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ppi_med.stats import auc_ci

from ...comparisons import best_line
from ...formatting import mean_sd, p_value
from ..jobs import Job
from ..paths import BUNDLES
from ..scheduler import done_path
from ..templates import render
from .outputs import delong_p, file_metrics, fmt, predictions, run_metrics

__all__ = ["LIDC_PPI", "lidc_section", "pool_folds"]

#: the LIDC bundle's own PPI (WBP, soft mask), the row every other method is also tested against
LIDC_PPI = "ppi_wbp_soft"


def pool_folds(out: Path, jobs: Sequence[Job]) -> dict[str, tuple[pd.DataFrame, list[float], list[float]]]:
    """Each variant's held-out predictions pooled over its folds, where every fold finished.

    Args:
        out: the study folder.
        jobs: LIDC training jobs, each with ``variant`` and ``fold`` in its meta.

    Returns:
        Variant -> (pooled predictions, AUC per held-out fold, best validation AUC per fold), in job order.
    """
    pooled = {}
    for v in dict.fromkeys(j.meta["variant"] for j in jobs):
        mine = [j for j in jobs if j.meta["variant"] == v]
        if not all(done_path(out, j).is_file() for j in mine):  # pooled over some folds only: not comparable
            continue
        frames = [f for f in (predictions(out, j.name) for j in mine) if f is not None]
        if not frames:
            continue
        fold_aucs = [
            auc_ci(f["label"], f["prob"]).auc if f["label"].value_counts().min() >= 2 else np.nan for f in frames
        ]
        best_val = [(file_metrics(out, j.name) or {}).get("best_val_auc", np.nan) for j in mine]
        pooled[v] = (pd.concat(frames, ignore_index=True), fold_aucs, best_val)
    return pooled


def lidc_section(out: Path, jobs: Sequence[Job], client, goals: dict) -> list[str]:
    """One row per variant that finished every fold; leaves ``lidc_<variant>`` in ``goals``.

    Also writes ``results/lidc_pooled.csv``: one row per variant (pooled AUC with DeLong's CI, DeLong p against
    the baseline on the same nodules, the AUC per held-out fold).

    Args:
        out: the study folder.
        jobs: the study's jobs (those of part ``lidc`` are read, the attempts of section
            :func:`~.attempts.attempts_section` left out).
        client: an ``mlflow.MlflowClient`` of the study's store.
        goals: figures for the goals table, filled here.
    """
    lidc = [j for j in jobs if j.part == "lidc" and not j.meta.get("attempt")]
    pooled = pool_folds(out, lidc)
    if not pooled:
        return []
    ref = [
        run_metrics(out, client, "results_lidc", j.name).get("ref_test_auc", np.nan)
        for j in lidc
        if j.meta["variant"] == "baseline" and "baseline" in pooled
    ]
    base = pooled["baseline"][0] if "baseline" in pooled else None
    n_pat = base["patient_id"].nunique() if base is not None and "patient_id" in base else "?"
    lines = render(
        "lidc",
        "intro",
        bundle=BUNDLES["lidc"],
        nodules=len(base) if base is not None else "?",
        malignant=int(base["label"].sum()) if base is not None else "?",
        patients=n_pat,
    )
    ppi = pooled[LIDC_PPI][0] if LIDC_PPI in pooled else None
    rows = []
    for v, (frame, fold_aucs, _) in pooled.items():
        res = auc_ci(frame["label"], frame["prob"])
        p = np.nan if v == "baseline" else delong_p(base, frame)
        p_ppi = np.nan if v in ("baseline", LIDC_PPI) else delong_p(ppi, frame)
        shown = "" if v == "baseline" else p_value(p)
        shown_ppi = "" if v in ("baseline", LIDC_PPI) else p_value(p_ppi)
        folds = ", ".join(fmt(a, 2) for a in fold_aucs)
        lines.append(f"| {v} | {res.auc:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] | {shown} | {shown_ppi} | {folds} |")
        goals[f"lidc_{v}"] = (res.auc, res.ci_low, res.ci_high, len(frame), n_pat)
        rows.append({"variant": v, "nodules": len(frame), "auc": res.auc, "ci_low": res.ci_low,
                     "ci_high": res.ci_high, "p_vs_baseline": p, "p_vs_ppi": p_ppi, "fold_aucs": folds})  # fmt: skip
    (out / "results").mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "results" / "lidc_pooled.csv", index=False)
    # the sentence under the table reads the columns pipelines.comparisons' tables have
    ppi_auc = table.set_index("variant")["auc"].get(LIDC_PPI, np.nan)
    verdict = table.rename(columns={"variant": "method", "auc": "out_mean", "p_vs_ppi": f"out_p_{LIDC_PPI}"})
    verdict[f"out_diff_{LIDC_PPI}"] = verdict["out_mean"] - ppi_auc
    return [
        *lines,
        f"| linear reference (mean over folds) | {mean_sd(ref)} | | | {', '.join(fmt(a, 2) for a in ref)} |",
        "",
        best_line(verdict, "out", LIDC_PPI, "pooled held-out AUC"),
        "",
    ]
