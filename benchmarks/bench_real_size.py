"""Step time and peak memory of the GA bundle's trainer at the real OCT size (100 x 512 x 1000 per eye).

Not a test. The bundle's own network (``network_def``), optimiser settings and PPI configuration are read from
``bundles/ga_ppi.json`` and run through MONAI's :class:`~monai.engines.SupervisedTrainer` with
:class:`ppi_med.engine.PPIIteration`, exactly as ``train#trainer`` runs them, on batches of the real size:
``batch x 1 x 100 B-scans x 512 x 1000``. The voxels are random (timing does not depend on them; the labels
alternate so every batch has both classes for PPI's same-class partners). The batches are collated once in
pinned host memory, so each step pays the host-to-device copy a pinned loader pays, but not the disk.

For every precision (``bf16`` autocast, ``fp32``) and every method (plain cross-entropy, PPI ``detached``,
PPI ``differentiable``) it tries the batch sizes from the largest down and keeps the first that fits, then
reports the median step time (each configuration in a process of its own, so a batch that does not fit
leaves nothing behind) over the timed steps, the peak memory the allocator handed out
(``torch.cuda.max_memory_allocated``) and the step's loss, which must be finite.

Usage:
    python benchmarks/bench_real_size.py --json real_size.json --markdown real_size.md
    python benchmarks/bench_real_size.py --views 8 --height 64 --width 128 --device cpu   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer

from ppi_med.engine import PPIIteration
from ppi_med.ppi import PPIConfig

__all__ = ["main", "measure"]

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("plain", "ppi_detached", "ppi_differentiable")


def _bundle() -> dict:
    """The bundle's raw ids (read as JSON, so its imports, data and tracking stay out of a bare GPU machine)."""
    return json.loads((ROOT / "bundles" / "ga_ppi.json").read_text())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    method: str,
    precision: str,
    batch: int,
    shape: tuple[int, int, int],
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict:
    """One configuration: ``warmup + steps`` iterations of the bundle's trainer; returns its figures.

    Raises:
        torch.OutOfMemoryError: the configuration does not fit on the device.
    """
    bundle = _bundle()
    net = ConfigParser({"network_def": bundle["network_def"]}).get_parsed_content("network_def").to(device)
    ppi = dict(bundle["ppi"], warmup_epochs=0)
    if method == "plain":
        ppi["enabled"] = False
    else:
        ppi["mode"] = method.removeprefix("ppi_")
    opt = torch.optim.AdamW(net.parameters(), lr=bundle["learning_rate"], weight_decay=bundle["weight_decay"])
    views, height, width = shape
    image = torch.randn(batch, 1, views, height, width)
    label = torch.arange(batch) % 2
    if device.type == "cuda":
        image, label = image.pin_memory(), label.pin_memory()
    data = [{"image": image, "label": label}] * (warmup + steps)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=data,
        epoch_length=len(data),
        network=net,
        optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(),
        iteration_update=PPIIteration(PPIConfig(**ppi)),
        amp=precision == "bf16",
        non_blocking=True,
        decollate=False,
    )
    times: list[float] = []
    losses: list[float] = []
    clock: dict[str, float] = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _start(engine):
        _sync(device)
        clock["t"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(engine):
        _sync(device)
        times.append(time.perf_counter() - clock["t"])
        losses.append(float(engine.state.output["loss"]))

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    trainer.run()
    timed = times[warmup:]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "method": method,
        "precision": precision,
        "batch": batch,
        "step_ms": 1e3 * statistics.median(timed),
        "step_ms_min": 1e3 * min(timed),
        "eyes_per_s": batch / statistics.median(timed),
        "peak_gib": None if peak is None else peak / 2**30,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "last_loss": losses[-1],
    }


def _table(rows: list[dict], meta: dict) -> str:
    shape = "x".join(str(s) for s in meta["shape"])
    lines = [
        f"GA bundle trainer at {shape} per eye on {meta['device_name']} (torch {meta['torch']}, cudnn.benchmark "
        f"{meta['cudnn_benchmark']}); network {meta['network']}; median of {meta['steps']} steps after "
        f"{meta['warmup']} untimed.",
        "",
        "| precision | method | batch (eyes) | step (ms) | eyes / s | peak memory (GiB) | vs plain | loss finite |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    plain = {(r["precision"], r["batch"]): r["step_ms"] for r in rows if r["method"] == "plain" and "step_ms" in r}
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"| {r['precision']} | {r['method']} | - | {r['error']} | | | | |")
            continue
        base = plain.get((r["precision"], r["batch"]))
        ratio = f"{r['step_ms'] / base:.2f} x" if base else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['precision']} | {r['method']} | {r['batch']} | {r['step_ms']:.0f} | {r['eyes_per_s']:.1f} | "
            f"{peak} | {ratio} | {r['loss_finite']} |"
        )
    return "\n".join(lines) + "\n"


def _run_isolated(method: str, precision: str, batch: int, args: argparse.Namespace) -> dict | None:
    """One configuration in a child process, so an out-of-memory failure leaves nothing behind for the next.

    Returns:
        Its figures, or ``None`` when it ran out of device memory.

    Raises:
        RuntimeError: the child failed for another reason (its output is in the message).
    """
    cmd = [
        sys.executable,
        __file__,
        "--one",
        f"{method},{precision},{batch}",
        *("--views", str(args.views), "--height", str(args.height), "--width", str(args.width)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    if "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr:
        return None
    raise RuntimeError(f"{method} {precision} batch {batch} failed:\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--views", type=int, default=100, help="B-scans per eye")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--batches", default="8,4,2,1", help="batch sizes tried, largest first, until one fits")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # METHOD,PRECISION,BATCH: one configuration, in this process
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    shape = (args.views, args.height, args.width)
    if args.one:
        method, precision, batch = args.one.split(",")
        row = measure(method, precision, int(batch), shape, device, args.steps, args.warmup)
        print(json.dumps(row), flush=True)
        return [row]
    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict] = []
    for precision in args.precisions.split(","):
        for method in args.methods.split(","):
            for batch in batches:
                row = _run_isolated(method, precision, batch, args)
                if row is None:
                    print(f"{precision} {method}: batch {batch} does not fit", flush=True)
                    continue
                print(json.dumps(row), flush=True)
                rows.append(row)
                break
            else:
                rows.append({"method": method, "precision": precision, "error": f"no batch of {batches} fits"})
    meta = {
        "shape": shape,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "network": json.dumps(_bundle()["network_def"]),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    table = _table(rows, meta)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(table)
    return rows


if __name__ == "__main__":
    main()
