"""The study's report: ``OUT/RESULTS.md`` and its figures, made from the finished jobs' outputs alone."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from .jobs import Job
from .scheduler import done_path
from .sections import (
    comparators_section,
    cost_section,
    ga_section,
    goals_section,
    lidc_section,
    outlines_section,
    saliency_section,
    shortcut_section,
    sites_section,
)
from .store import EXPERIMENTS, tracking_uri
from .templates import render

__all__ = ["write_report"]


def _head(jobs: Sequence[Job], done: list[dict], profile_name: str, missing: list[Job]) -> list[str]:
    """Who made the report, where and when, the time per part, and the jobs it lacks."""
    import torch

    commits = sorted({d["commit"] for d in done})
    part_wall: dict[str, float] = {}
    for d in done:
        part_wall[d["part"]] = part_wall.get(d["part"], 0.0) + d["wall_s"]
    lines = render(
        "report",
        "header",
        profile=profile_name,
        jobs=len(done),
        commits=f"commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}",
        written=time.strftime("%Y-%m-%d %H:%M"),
        machine=platform.machine(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        device=f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU",
        experiments=", ".join(f"`{e}`" for e in EXPERIMENTS),
        part_times=", ".join(f"{p} {w / 60:.0f} min" for p, w in part_wall.items()),
    )
    lines.append("")
    if profile_name != "full":
        lines += [*render("report", "profile", profile=profile_name), ""]
    if missing:
        by_part: dict[str, list[str]] = {}
        for j in missing:
            by_part.setdefault(j.part, []).append(j.name)
        listed = "; ".join(f"{p}: {', '.join(names)}" for p, names in by_part.items())
        lines += [*render("report", "not_run", missing=len(missing), total=len(jobs), by_part=listed), ""]
    return lines


def write_report(out: Path, jobs: Sequence[Job], profile_name: str, publish: Path | None = None) -> Path:
    """Write ``OUT/RESULTS.md`` and ``OUT/results/*.png`` from the finished jobs (and copy them to ``publish``).

    Args:
        out: the study folder.
        jobs: every job of the chosen parts; those not finished are listed as not run.
        profile_name: the profile the jobs were built with.
        publish: a folder that also gets ``RESULTS.md`` and ``results/`` (the latter replaced).

    Returns:
        The report's path.
    """
    from mlflow import MlflowClient

    fig_dir = out / "results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri(out))
    done = [json.loads(done_path(out, j).read_text()) for j in jobs if done_path(out, j).is_file()]
    missing = [j for j in jobs if not done_path(out, j).is_file()]
    lines = _head(jobs, done, profile_name, missing)
    goals: dict = {}  # the sections leave the figures the goals table measures; it goes before them
    at_goals = len(lines)
    lines += ga_section(out, jobs, client, goals) if any(j.part == "ga" for j in jobs) else []
    lines += sites_section(out, fig_dir)
    lines += lidc_section(out, jobs, client, goals) if any(j.part == "lidc" for j in jobs) else []
    lines += saliency_section(out, jobs, fig_dir, goals)
    lines += shortcut_section(out, fig_dir)
    lines += outlines_section(out, jobs)
    lines += comparators_section(out, fig_dir)
    lines += cost_section(out, jobs)
    lines[at_goals:at_goals] = goals_section(goals)
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, publish / "RESULTS.md")
        target = publish / "results"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fig_dir, target)
    return path
