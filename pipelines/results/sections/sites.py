"""The site studies: site-wise cross-validation and the confounded study, each with its verdict in words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..templates import render

__all__ = ["sites_section", "sites_verdict"]

#: the site studies' jobs, in report order; each has a block of that name (``-`` as ``_``) in templates/sites.md
SITE_STUDIES = ("sites", "sites-confounded")


def sites_verdict(cv: Path) -> list[str]:
    """What a site study's numbers say about PPI, in words, from its own output files (one paragraph).

    Args:
        cv: the study's ``pipelines.site_cv`` output folder.
    """
    pooled = cv / "pooled_offdiag.json"
    if not pooled.is_file():
        return []
    lines = []
    for method, r in json.loads(pooled.read_text()).items():
        verdict = "beats" if r["auc_diff"] > 0 and r["p_value"] < 0.05 else "does not beat"
        lines += render(
            "sites",
            "pooled",
            method=method,
            verdict=verdict,
            auc=f"{r['auc']:.3f}",
            reference=f"{r['auc_reference']:.3f}",
            cases=r["n_cases"],
            p=f"{r['p_value']:.2g}",
        )
    cue = cv / "cue_effect" / "cue_effect.csv"
    if cue.is_file():
        table = pd.read_csv(cue)
        by_seed = table.groupby(["method", "seed"]).apply(lambda g: np.average(g.effect, weights=g.n)).unstack(0)
        if "baseline" in by_seed:
            base = by_seed["baseline"]
            for method in [m for m in by_seed if m != "baseline"]:
                lines += render(
                    "sites",
                    "cue",
                    baseline=f"{base.mean():+.2f}",
                    effect=f"{by_seed[method].mean():+.2f}",
                    method=method,
                    lower=f"{base.mean() - by_seed[method].mean():.2f}",
                    seeds_lower=int((by_seed[method] < base).sum()),
                    seeds=len(by_seed),
                )
    return [" ".join(lines)]


def sites_section(out: Path, fig_dir: Path) -> list[str]:
    """Each site study that wrote its summary: intro, verdict, cue effect, its own summary and heatmaps.

    Args:
        out: the study folder.
        fig_dir: the report's figure folder (the heatmaps are copied there).
    """
    lines: list[str] = []
    for job in SITE_STUDIES:
        cv = out / "jobs" / job / "cv"
        summary = cv / "summary.md"
        if not summary.is_file():
            continue
        prefix = job.replace("-", "_")
        for png in sorted(cv.glob("heatmap_*.png")):
            shutil.copy2(png, fig_dir / f"{prefix}_{png.name}")
        # the summary's own title goes (the section has one), its sections become subsections; its figure list
        # goes too: it links files beside the summary, and the heatmaps are shown below from the figure folder
        text = _without_section(summary.read_text().splitlines(), "## Figures")
        body = [("#" + line) if line.startswith("#") else line for line in text if not line.startswith("# ")]
        # the summary's lines before its first section say how the study ran: under a heading of their own
        first = next((i for i, line in enumerate(body) if line.startswith("#")), len(body))
        design = [line for line in body[:first] if line.strip()]
        body = [*(["### How it ran", "", *design, ""] if design else []), *body[first:]]
        lines += [*render("sites", prefix), "", *sites_verdict(cv), ""]
        if job == "sites":  # the confounded study's method tables are the comparators section's
            lines += [*render("sites", "methods"), "", *_methods_table(cv, fig_dir)]  # it ends with a blank line
        cue = cv / "cue_effect" / "cue_effect.md"
        if cue.is_file():
            lines += [*render("sites", "cue_effect"), "", *cue.read_text().splitlines(), ""]
        lines += [*body, ""]
        lines += [f"![{p.stem}](results/{p.name})" for p in sorted(fig_dir.glob(f"{prefix}_heatmap_*.png"))]
        lines.append("")
    return lines


def _methods_table(cv: Path, fig_dir: Path) -> list[str]:
    """Every method of the site matrices against the baseline and PPI, pooled over training sites and seeds."""
    from ...comparisons import site_comparison, site_markdown

    preds = pd.read_csv(cv / "predictions.csv", dtype={"train_site": str, "test_site": str, "case": str})
    table = site_comparison(preds)
    table.to_csv(fig_dir / "sites_methods.csv", index=False)
    return site_markdown("", table)[2:]  # the template's heading stands for the table's


def _without_section(lines: list[str], heading: str) -> list[str]:
    """``lines`` less the section under ``heading``, up to the next heading of its level or above."""
    level = len(heading.split(" ")[0])
    kept, skipping = [], False
    for line in lines:
        if line.startswith("#"):
            skipping = line.strip() == heading or (skipping and len(line.split(" ")[0]) > level)
        if not skipping:
            kept.append(line)
    return kept
