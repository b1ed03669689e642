"""Which fix works where: :mod:`pipelines.comparisons` over the confounded study and the shortcut comparators."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..profiles import SELECTIONS
from ..templates import render

__all__ = ["comparators_section"]


def comparators_section(out: Path, fig_dir: Path, goals: dict) -> list[str]:
    """One table per selection rule (the oracle labelled as such); empty where no comparator job finished.

    Leaves ``confounded`` (the default PPI against the baseline, trained on the watermarked site alone,
    ``train`` selection: out-of-site AUC difference and DeLong p, cue effects, own held-out AUCs) in ``goals``.

    Args:
        out: the study folder.
        fig_dir: the report's figure folder (the comparisons go to its ``comparators/``).
        goals: figures for the goals table, filled here.
    """
    from ...comparisons import write_comparisons

    sites = {
        sel: out / "jobs" / ("sites-confounded" if sel == "train" else f"sites-confounded-{sel}") / "cv"
        for sel in SELECTIONS
    }
    shortcut = {sel: out / "jobs" / f"shortcut-comparators-{sel}" / "out" for sel in SELECTIONS}
    sites = {k: v for k, v in sites.items() if (v / "predictions.csv").is_file()}
    shortcut = {k: v for k, v in shortcut.items() if any(v.glob("*/results.csv"))}
    ga = out if any((out / "jobs").glob("ga-*-s*/runs/*/test_predictions.csv")) else None
    if not sites and not shortcut:
        return []
    report = write_comparisons(shortcut, sites, fig_dir / "comparators", ga).read_text().splitlines()
    table = fig_dir / "comparators" / "sites_train.csv"
    if table.is_file():
        rows = pd.read_csv(table).set_index("method")
        if {"baseline", "ppi_wbp"} <= set(rows.index):
            base, ppi = rows.loc["baseline"], rows.loc["ppi_wbp"]
            goals["confounded"] = {
                "out_diff": float(ppi["out_diff_baseline"]),
                "out_p": float(ppi["out_p_baseline"]),
                "cue": float(ppi["cue_effect"]),
                "cue_base": float(base["cue_effect"]),
                "own": float(ppi["own_mean"]),
                "own_base": float(base["own_mean"]),
            }
    body = [line.replace("](", "](results/comparators/") if line.startswith("![") else line for line in report[1:]]
    return [*render("comparators", "intro"), "", *["#" + x if x.startswith("#") else x for x in body], ""]
