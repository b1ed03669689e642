"""The study's report: ``OUT/RESULTS.md`` and its figures, made from the finished jobs' outputs alone.

Jobs may come from several runs (the ledger, :mod:`.ledger`, keeps them across machines and days): the head says
when and where they ran and how many were restored, and every section ends with the commits its rows came from.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .jobs import Job
from .ledger import RESTORED
from .scheduler import done_path
from .sections import (
    attempts_section,
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


def _machine(done: dict) -> str:
    """A job's machine in words, from its ``done.json`` (``unknown`` for one written before it was recorded)."""
    m = done.get("machine")
    if not isinstance(m, dict):
        return "unknown"
    return f"{m.get('platform')}, {m.get('cpus')} CPU cores, torch {m.get('torch')}, {m.get('gpu') or 'no GPU'}"


def _accumulated(out: Path, jobs: Sequence[Job], done: list[dict]) -> list[str]:
    """When, at which commits and on which machines the jobs ran, and how many the ledger gave; empty for jobs
    all run in this folder at one commit."""
    restored = [j for j in jobs if (out / "jobs" / j.name / RESTORED).is_file() and done_path(out, j).is_file()]
    commits = {d["commit"] for d in done}
    if not restored and len(commits) <= 1:
        return []
    ledgers = sorted({json.loads((out / "jobs" / j.name / RESTORED).read_text()).get("ledger") for j in restored})
    days = sorted(str(d.get("finished", "?"))[:10] for d in done)
    machines = sorted({_machine(d) for d in done})
    return [
        *render(
            "report",
            "accumulated",
            jobs=len(done),
            when=f"on {days[0]}" if days[0] == days[-1] else f"between {days[0]} and {days[-1]}",
            commits=f"{len(commits)} commit{'s' if len(commits) > 1 else ''}",
            machines="; ".join(machines),
            restored=len(restored),
            ledger=", ".join(f"`{x}`" for x in ledgers) or "none",
        ),
        "",
    ]


def _sources(out: Path, jobs: Sequence[Job], pick: Callable[[Job], bool]) -> list[str]:
    """The commits the finished jobs that ``pick`` chooses ran at, with how many and when; empty for none."""
    by_commit: dict[str, list[str]] = {}
    for j in jobs:
        if pick(j) and done_path(out, j).is_file():
            d = json.loads(done_path(out, j).read_text())
            by_commit.setdefault(str(d.get("commit", "unknown"))[:12], []).append(str(d.get("finished", "?"))[:10])
    if not by_commit:
        return []
    parts = []
    for commit, days in sorted(by_commit.items(), key=lambda kv: min(kv[1])):
        when = min(days) if min(days) == max(days) else f"{min(days)} to {max(days)}"
        parts.append(f"{len(days)} job{'s' if len(days) > 1 else ''} at commit {commit} ({when})")
    return render("report", "sources", sources="; ".join(parts))


#: which jobs each section's rows come from (the goals table repeats figures of the others and has none)
SECTION_JOBS: dict[str, Callable[[Job], bool]] = {
    "ga": lambda j: j.ga_table,
    "sites": lambda j: j.name in ("sites", "sites-confounded", "sites-cue"),
    "lidc": lambda j: j.part == "lidc" and not j.meta.get("attempt"),
    "saliency": lambda j: j.part == "saliency",
    "shortcut": lambda j: j.name == "shortcut",
    "outlines": lambda j: j.name.startswith("shortcut-outlines-"),
    "comparators": lambda j: j.name.startswith(("sites-confounded", "sites-cue", "shortcut-comparators-", "ga-")),
    "cost": lambda j: j.ga_table or j.name == "cost",
    "attempts": lambda j: j.meta.get("attempt") or j.name.startswith("shortcut-attempts-"),
}


def _with_sources(lines: list[str], out: Path, jobs: Sequence[Job], section: str) -> list[str]:
    """A section's lines with the line naming the commits its rows came from at its end."""
    if not lines:
        return lines
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return [*lines, "", *_sources(out, jobs, SECTION_JOBS[section]), ""]


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
    lines = [*_head(jobs, done, profile_name, missing), *_accumulated(out, jobs, done)]
    goals: dict = {}  # the sections leave the figures the goals table measures; it goes before them
    at_goals = len(lines)
    sections = {
        "ga": lambda: ga_section(out, jobs, client, goals) if any(j.ga_table for j in jobs) else [],
        "sites": lambda: sites_section(out, fig_dir),
        "lidc": lambda: lidc_section(out, jobs, client, goals) if any(j.part == "lidc" for j in jobs) else [],
        "saliency": lambda: saliency_section(out, jobs, fig_dir, goals),
        "shortcut": lambda: shortcut_section(out, fig_dir),
        "outlines": lambda: outlines_section(out, jobs, goals),
        "comparators": lambda: comparators_section(out, fig_dir, goals),
        "cost": lambda: cost_section(out, jobs),
        "attempts": lambda: attempts_section(out, jobs, fig_dir),
    }
    for name, section in sections.items():
        lines += _with_sources(section(), out, jobs, name)
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
