"""The shortcut benchmark's own summaries, and the outline study's table per share of outlined digits."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..jobs import Job
from ..templates import render
from .outputs import fmt

__all__ = ["outlines_section", "shortcut_section"]


def shortcut_section(out: Path, fig_dir: Path) -> list[str]:
    """The benchmark job's summaries, one per cue, with their figures; empty where it has not run.

    Args:
        out: the study folder.
        fig_dir: the report's figure folder (the figures are copied there).
    """
    root = out / "jobs" / "shortcut" / "out"
    summaries = sorted(root.glob("*/summary.md")) or sorted(root.glob("summary.md"))
    if not summaries:
        return []
    lines = [*render("shortcut", "intro"), ""]
    for path in summaries:
        lines += [("##" + x) if x.startswith("#") else x for x in path.read_text().splitlines()]
        for png in sorted(path.parent.glob("*.png")):
            target = fig_dir / f"shortcut_{path.parent.name}_{png.name}"
            shutil.copy2(png, target)
            lines += ["", f"![{png.stem}](results/{target.name})"]
    return [*lines, ""]


def outlines_section(out: Path, jobs: Sequence[Job], goals: dict) -> list[str]:
    """Reversed-cue and cue-free AUC of the outline study, per share of outlined training digits.

    Leaves ``digits`` (cue -> the default's reversed-cue and cue-free AUC gains over the baseline with every
    training digit outlined) in ``goals``.

    Args:
        out: the study folder.
        jobs: the study's jobs (the ``shortcut-outlines-*`` ones are read).
        goals: figures for the goals table, filled here.
    """
    rows = []
    for job in (j for j in jobs if j.name.startswith("shortcut-outlines-")):
        for path in sorted((out / "jobs" / job.name / "out").glob("*/summary.csv")):
            for _, r in pd.read_csv(path).iterrows():
                rows.append({"share": job.meta["share"], "cue": path.parent.name, **r.to_dict()})
    if not rows:
        return []
    table = pd.DataFrame(rows)
    full = table[(table["share"] == 1.0) & (table["method"] == "ppi_wbp")]
    goals["digits"] = {r["cue"]: (r["reversed_auc_delta"], r["free_auc_delta"]) for _, r in full.iterrows()}
    lines = render("shortcut", "outlines")
    for _, r in table.sort_values(["cue", "share"], kind="stable").iterrows():
        lines.append(
            f"| {r['cue']} | {r['share']:g} | `{r['method']}` "
            f"| {r['reversed_auc_mean']:.3f} ± {r['reversed_auc_sd']:.3f} "
            f"| {r['reversed_auc_delta']:+.3f} | {fmt(r['reversed_auc_p'])} | {r['free_auc_mean']:.3f} ± "
            f"{r['free_auc_sd']:.3f} | {r['free_auc_delta']:+.3f} |"
        )
    return [*lines, ""]
