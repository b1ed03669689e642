"""What the methods cost: epoch time and memory of the GA jobs, the benchmark script, the committed GPU figures."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..jobs import Job
from ..paths import GPU_FIGURES
from ..scheduler import done_path
from ..templates import render
from .outputs import fmt

__all__ = ["bench_lines", "cost_section", "epoch_seconds", "gpu_lines"]

# the bundle console's line per epoch (ppi_med.console.EpochSummary), which ends with the epoch's seconds
# (training, precise batch norm and validation); a progress bar's remains may precede it on the same line
_EPOCH = re.compile(r"epoch +(\d+)/\d+  .*?  ([\d.]+) s$", re.M)


def epoch_seconds(log: Path, after: int = 0, until: int | None = None) -> float:
    """Median epoch time in a bundle log over the epochs ``after < epoch <= until``; NaN for none."""
    times = [
        float(m.group(2))
        for m in _EPOCH.finditer(log.read_text(errors="replace"))
        if after < int(m.group(1)) <= (until if until is not None else 1 << 30)
    ]
    return float(np.median(times)) if times else float("nan")


def _warmup_epochs(job_dir: Path) -> int:
    """The PPI warm-up of a bundle job: its run's ``checkpoint_from_epoch`` param (``params.json``) minus one."""
    found = sorted(job_dir.glob("runs/*/params.json"))
    if not found:
        return 0
    return int(json.loads(found[-1].read_text()).get("checkpoint_from_epoch", 1)) - 1


def cost_section(out: Path, jobs: Sequence[Job]) -> list[str]:
    """The GA jobs' costs and the benchmark's tables, then the GPU figures; empty where neither ran.

    Args:
        out: the study folder.
        jobs: the study's jobs (the finished GA jobs of the pooled table, ``Job.ga_table``, are read).
    """
    lines: list[str] = []
    ga = [j for j in jobs if j.ga_table and done_path(out, j).is_file()]
    if ga:
        lines += render("cost", "ga")
        for method in dict.fromkeys(j.meta["method"] for j in ga):
            mine = [j for j in ga if j.meta["method"] == method]
            done = [json.loads(done_path(out, j).read_text()) for j in mine]
            dirs = [out / "jobs" / j.name for j in mine]
            warm = np.nanmedian([epoch_seconds(d / "log.txt", until=_warmup_epochs(d)) for d in dirs])
            ppi = np.nanmedian([epoch_seconds(d / "log.txt", after=_warmup_epochs(d)) for d in dirs])
            lines.append(
                f"| {method} | {fmt(warm, 2)} | {fmt(ppi, 2)} | {max(d['max_rss_mb'] for d in done):.0f} "
                f"| {np.median([d['wall_s'] for d in done]):.0f} |"
            )
        lines.append("")
    bench = out / "jobs" / "cost" / "bench.json"
    if bench.is_file():
        lines += bench_lines(json.loads(bench.read_text()))
    if not lines:  # GPU figures only beside the CPU ones, never in a report of other parts
        return []
    return [*render("cost", "heading"), "", *lines, *gpu_lines(GPU_FIGURES)]


def gpu_lines(folder: Path) -> list[str]:
    """The GPU measurements committed under ``folder``: made on a GPU machine by the two benchmark scripts,
    not by ``make results``, which runs on CPU.

    Args:
        folder: holds ``real_size_h200.json`` and ``bench_saliency_ppi_h200.json`` (either may be missing).
    """
    real = folder / "real_size_h200.json"
    bench = folder / "bench_saliency_ppi_h200.json"
    if not real.is_file() and not bench.is_file():
        return []
    lines = [*render("cost", "gpu", folder=folder.name), ""]
    if real.is_file():
        data = json.loads(real.read_text())
        meta = data["meta"]
        shape = " x ".join(str(s) for s in meta["shape"])
        lines += render("cost", "real_size", shape=shape, card=meta["card"], torch=meta["torch"], date=meta["date"])
        for r in data["rows"]:
            if "step_ms" in r:
                lines.append(
                    f"| {r['precision']} | {r['method']} | {r['batch']} | {r['step_ms']:.0f} | "
                    f"{r['step_ms'] / r['batch']:.0f} | {r['peak_gib']:.1f} |"
                )
            else:
                lines.append(f"| {r['precision']} | {r['method']} | {r['batch']} | {r['error']} | | |")
        lines += ["", *render("cost", "not_measured", what=meta["not_measured"]), ""]
    if bench.is_file():
        lines += bench_lines(json.loads(bench.read_text()))
    return lines


def bench_lines(bench: dict) -> list[str]:
    """The benchmark's JSON as two tables: saliency time per method, PPI step against a plain step.

    Args:
        bench: what ``benchmarks/bench_saliency_ppi.py --json`` wrote.
    """
    sizes = bench.get("sizes", {})
    lines = render(
        "cost",
        "bench",
        device=bench.get("device_name") or bench.get("device"),
        threads=bench.get("threads"),
        load=", ".join(f"{x:.1f}" for x in bench.get("load_average", [])),
        repeats=bench.get("repeats"),
        batch=sizes.get("batch3d"),
        size=sizes.get("size3d"),
    )
    sal = bench.get("saliency", {})
    for method, ev in sal.get("eval", {}).items():
        tr = sal.get("train", {}).get(method, {})
        lines.append(
            f"| {method} | {ev['median_ms']:.0f} | {fmt(tr.get('median_ms', np.nan), 0)} | {ev['ratio']:.2f} |"
        )
    lines += [
        "",
        *render("cost", "step", batch=sizes.get("mv_batch"), views=sizes.get("views"), size=sizes.get("mv_size")),
    ]
    for name, t in bench.get("training_step", {}).items():
        lines.append(f"| {name} | {t['median_ms']:.0f} | {t['ratio']:.2f} |")
    targets = "; ".join(
        f"{k} {v['ratio']:.2f} (limit {v['limit']}: {'met' if v['pass'] else 'not met'})"
        for k, v in bench.get("targets", {}).items()
    )
    return [*lines, "", *render("cost", "targets", targets=targets), ""]
