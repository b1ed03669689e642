"""Deletion and localisation of every saliency method on the seed-0 GA models, with the deletion curves."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..jobs import Job
from ..templates import render
from .outputs import fmt

__all__ = ["saliency_section"]


def saliency_section(out: Path, jobs: Sequence[Job], fig_dir: Path, goals: dict) -> list[str]:
    """Tables per model, ``deletion_curves.png`` and the localisation figures; empty where none evaluated.

    Leaves ``wbp_tp_<model>`` (WBP's share inside the lesion, pointing game, eyes) in ``goals``.

    Args:
        out: the study folder.
        jobs: the study's jobs (those of part ``saliency`` are read).
        fig_dir: the report's figure folder.
        goals: figures for the goals table, filled here.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = {j.meta["method"]: out / "jobs" / j.name / "eval" for j in jobs if j.part == "saliency"}
    evals = {m: d for m, d in evals.items() if (d / "summary.csv").is_file()}
    if not evals:
        return []
    lines = [*render("saliency", "intro"), ""]
    fig, axes = plt.subplots(1, len(evals), figsize=(5.5 * len(evals), 4), squeeze=False, sharey=True)
    for ax, (model, folder) in zip(axes[0], evals.items()):
        summary = pd.read_csv(folder / "summary.csv")
        deletion = pd.read_csv(folder / "deletion.csv")
        cols = [c for c in summary.columns if c.startswith("drop_k")]
        lines += [
            f"**{model}**",
            "",
            "| saliency | " + " | ".join(cols) + " | share inside | pointing | best Dice |",
            "|---" * (len(cols) + 4) + "|",
        ]
        for _, r in summary.iterrows():
            cells = " | ".join(fmt(r[c]) for c in cols)
            lines.append(
                f"| {r['method']} | {cells} | {fmt(r['share_inside'])} | {fmt(r['pointing_acc'])} "
                f"| {fmt(r['dice_best'])} |"
            )
        loc = pd.read_csv(folder / "localisation.csv")
        tp_ids = set(deletion.loc[(deletion["target_class"] == 1) & (deletion["prob_before"] > 0.5), "case_id"])
        wbp = loc[(loc["method"] == "wbp") & loc["case_id"].isin(tp_ids)]
        goals[f"wbp_tp_{model}"] = (wbp["share_inside"].mean(), wbp["pointing_hit"].mean(), wbp["case_id"].nunique())
        lines += [
            "",
            *render(
                "saliency",
                "true_positives",
                n=wbp["case_id"].nunique(),
                share=fmt(wbp["share_inside"].mean()),
                lesion=fmt(wbp["mask_fraction"].mean(), 4),
                pointing=fmt(wbp["pointing_hit"].mean()),
            ),
            "",
        ]
        for method, g in deletion.groupby("method"):
            curve = g.groupby("n_deleted")["drop"].mean()
            ax.plot(curve.index, curve.values, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_title(f"GA {model}")
        ax.set_xlabel("voxels deleted")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("drop of the label's probability")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "deletion_curves.png", dpi=110)
    plt.close(fig)
    for model, folder in evals.items():
        if (folder / "localisation.png").is_file():
            shutil.copy2(folder / "localisation.png", fig_dir / f"localisation_{model}.png")
    lines += ["![deletion curves](results/deletion_curves.png)", ""]
    lines += [f"![localisation {m}](results/localisation_{m}.png)" for m in evals]
    return [*lines, ""]
