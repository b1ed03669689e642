"""Where one PPI training step spends its time: ``torch.profiler`` tables of a plain and a PPI step.

Not a test. On the multi-view GA network of ``benchmarks/bench_saliency_ppi.py`` (``ppi_med.networks.MVCNN``,
a 2D MONAI ResNet-18 on every B-scan) and one fixed batch, it profiles one plain step (cross-entropy,
backward, optimizer step) and one PPI step in each mode (``detached``, ``differentiable``; the partner
form, so both contrasts run) after warm-up steps, and writes for each a table of the top operators by
self CPU time (``<step>.txt``), the same by total time including children (``<step>_total.txt``), and a
summary of the whole step (``summary.json``: wall-clock and self CPU milliseconds per step and the
operators' share) into the output folder.

Usage:
    python benchmarks/profile_ppi_step.py --out runs/profile_ppi [--threads 2] [--rows 30]
    python benchmarks/profile_ppi_step.py --out runs/profile_ppi --checkpoint   # MVCNN with checkpointing
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from ppi_med.networks import MVCNN
from ppi_med.ppi import PPIConfig, PPIObjective

__all__ = ["PPI_FORM", "main", "profile_steps", "step_functions"]

#: the PPI form profiled: the partner guide, so the step runs both contrasts (2N samples) as the method does
PPI_FORM = {"guide": "partner", "mask": "soft", "w_con": 1.0, "w_reg": 0.1, "w_ad": 1.0, "warmup_epochs": 0}


def step_functions(
    device: torch.device, batch: int, views: int, size: int, checkpoint: bool = False
) -> dict[str, Callable[[], None]]:
    """One plain step and one PPI step per mode on a fixed MVCNN batch, as functions of no argument.

    Args:
        device: where the model and batch live.
        batch: volumes per batch (two labels alternate, so every sample has a same-class partner from 4 on).
        views: B-scans per volume.
        size: B-scan side.
        checkpoint: build the MVCNN with activation checkpointing over its backbone.

    Returns:
        ``{"plain": ..., "ppi_detached": ..., "ppi_differentiable": ...}``.
    """
    torch.manual_seed(0)
    model = MVCNN(in_channels=1, num_classes=2, backbone="resnet18", width=64, checkpoint=checkpoint)
    model = model.to(device).train()
    x = torch.randn(batch, 1, views, size, size, device=device)
    y = torch.arange(batch, device=device) % 2
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    objectives = {mode: PPIObjective(PPIConfig(mode=mode, **PPI_FORM)) for mode in ("detached", "differentiable")}

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def ppi(mode: str) -> None:
        opt.zero_grad(set_to_none=True)
        objectives[mode](model, x, y, epoch=1).loss.backward()
        opt.step()

    return {
        "plain": plain,
        "ppi_detached": lambda: ppi("detached"),
        "ppi_differentiable": lambda: ppi("differentiable"),
    }


def profile_steps(
    fns: dict[str, Callable[[], None]], out: Path, device: torch.device, warmup: int, rows: int
) -> dict[str, dict[str, float]]:
    """Profile one call of each function after ``warmup`` calls and write its tables into ``out``.

    Returns:
        ``{step: {"wall_ms", "self_cpu_ms"}}``.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary: dict[str, dict[str, float]] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities, profile_memory=True) as prof:
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
        table = prof.key_averages()
        (out / f"{name}.txt").write_text(table.table(sort_by=sort, row_limit=rows) + "\n")
        total_sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        (out / f"{name}_total.txt").write_text(table.table(sort_by=total_sort, row_limit=rows) + "\n")
        self_cpu = sum(e.self_cpu_time_total for e in table) / 1e3
        top = sorted(table, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        summary[name] = {
            "wall_ms": 1e3 * wall,
            "self_cpu_ms": self_cpu,
            "top_self_cpu_ms": {e.key: e.self_cpu_time_total / 1e3 for e in top},
            "op_counts": {
                e.key: e.count for e in table if e.key in ("aten::convolution", "aten::convolution_backward")
            },
        }
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, profile the three steps and write the tables.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The summary written to ``summary.json``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; files in it are replaced)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch", type=int, default=4, help="volumes per batch (default 4)")
    parser.add_argument("--views", type=int, default=8, help="B-scans per volume (default 8)")
    parser.add_argument("--size", type=int, default=64, help="B-scan side (default 64)")
    parser.add_argument("--warmup", type=int, default=1, help="unprofiled steps before each profiled one (default 1)")
    parser.add_argument("--rows", type=int, default=30, help="operators per table (default 30)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--checkpoint", action="store_true", help="MVCNN with activation checkpointing")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.views < 1 or args.size < 8 or args.warmup < 0 or args.rows < 1:
        parser.error("--batch, --views and --rows must be at least 1, --size at least 8, --warmup at least 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    args.out.mkdir(parents=True, exist_ok=True)
    fns = step_functions(device, args.batch, args.views, args.size, checkpoint=args.checkpoint)
    summary = profile_steps(fns, args.out, device, args.warmup, args.rows)
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sizes": {"batch": args.batch, "views": args.views, "size": args.size},
        "checkpoint": args.checkpoint,
        "ppi_form": PPI_FORM,
        "steps": summary,
    }
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    plain = summary["plain"]
    for name, s in summary.items():
        print(
            f"{name:<20} wall {s['wall_ms']:8.1f} ms ({s['wall_ms'] / plain['wall_ms']:.2f} x plain), "
            f"self cpu {s['self_cpu_ms']:8.1f} ms ({s['self_cpu_ms'] / plain['self_cpu_ms']:.2f} x plain)"
        )
    print(f"tables written to {args.out}")
    return report


if __name__ == "__main__":
    main()
