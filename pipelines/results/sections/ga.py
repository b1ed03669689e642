"""The GA pooled-training table: test AUC per method over seeds, DeLong against the baseline, the reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ppi_med.stats import auc_ci

from ...formatting import mean_sd
from ...switch_on import read_run
from ..jobs import Job
from ..paths import BUNDLES
from ..templates import render
from .outputs import delong_p, fmt, predictions, run_metrics

__all__ = ["ga_section"]


def ga_section(out: Path, jobs: Sequence[Job], client, goals: dict) -> list[str]:
    """The table of the GA jobs, one row per method; leaves ``ga_<method>``, ``ga_reference`` and
    ``ga_switch_fall`` (the default PPI's largest validation fall after the switch-on, seeds) in ``goals``.

    Also writes ``results/ga_runs.csv``: one row per job (method, seed, held-out test AUC, DeLong p against the
    baseline's same eyes, best validation AUC, the largest validation fall after the switch-on).

    Args:
        out: the study folder.
        jobs: the study's jobs (those of the pooled table, ``Job.ga_table``, are read).
        client: an ``mlflow.MlflowClient`` of the study's store.
        goals: figures for the goals table, filled here.
    """
    ga = [j for j in jobs if j.ga_table]
    seeds = sorted({j.meta["seed"] for j in ga})
    methods = list(dict.fromkeys(j.meta["method"] for j in ga))
    names = {(j.meta["method"], j.meta["seed"]): j.name for j in ga}
    preds = {key: predictions(out, name) for key, name in names.items()}
    metrics = {(j.meta["method"], j.meta["seed"]): run_metrics(out, client, "results_ga", j.name) for j in ga}
    lines = render("ga", "intro", bundle=BUNDLES["ga"])
    rows = []
    for m in methods:
        aucs, ps, vals = [], [], []
        for s in seeds:
            p = preds.get((m, s))
            aucs.append(auc_ci(p["label"], p["prob"]).auc if p is not None and p["label"].nunique() == 2 else np.nan)
            ps.append(np.nan if m == "baseline" else delong_p(preds.get(("baseline", s)), p))
            vals.append(metrics[(m, s)].get("best_val_auc", np.nan))
            fall = _switch_fall(out / "jobs" / names[(m, s)]) if (m, s) in names else None
            rows.append({"method": m, "seed": s, "test_auc": aucs[-1], "p_vs_baseline": ps[-1],
                         "best_val_auc": vals[-1], "switch_fall": np.nan if fall is None else fall})  # fmt: skip
        pcol = "" if m == "baseline" else ", ".join(fmt(x) for x in ps)
        goals[f"ga_{m}"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else np.nan
        lines.append(f"| {m} | {mean_sd(aucs)} | {', '.join(fmt(a) for a in aucs)} | {pcol} | {mean_sd(vals)} |")
    table = pd.DataFrame(rows)
    (out / "results").mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results" / "ga_runs.csv", index=False)
    falls = table[table["method"] == "ppi_wbp"]["switch_fall"].dropna()
    if len(falls):
        goals["ga_switch_fall"] = (float(falls.max()), len(falls))
    ref = [metrics[("baseline", s)].get("ref_test_auc", np.nan) for s in seeds if ("baseline", s) in metrics]
    goals["ga_reference"] = float(np.nanmean(ref)) if np.isfinite(ref).any() else np.nan
    n = [len(preds[("baseline", s)]) for s in seeds if preds.get(("baseline", s)) is not None]
    return [
        *lines,
        f"| linear reference | {mean_sd(ref)} | {', '.join(fmt(a) for a in ref)} | | |",
        "",
        *render("ga", "test_eyes", counts=", ".join(map(str, n))),
        "",
    ]


def _switch_fall(job_dir: Path) -> float | None:
    """How far the validation AUC of a job's run fell below the warm-up's last value after the switch-on at
    most (0 when it never fell; ``None`` without a finished run)."""
    runs = sorted((job_dir / "runs").glob("*/metrics.jsonl"))
    if not runs:
        return None
    run = read_run(runs[-1].parent)
    before = run["val"].get(run["warmup"])
    after = [v for e, v in run["val"].items() if e > run["warmup"]]
    if before is None or not after:
        return None
    return max(0.0, before - min(after))
