"""Speed of the saliency methods and of one PPI training step, against their plain counterparts.

Not a test. Everything is measured in one process on one fixed batch: warm-up runs first, then the
candidates are timed round-robin (so a change in machine load hits all of them alike), every other round in
reverse order (so none always runs right after the same one), and the median of the repeats is reported in
milliseconds. The ratio to the baseline that the targets judge is paired: each round's time over the
baseline's in the same round, the median over the rounds, with the interquartile range of those per-round
ratios beside it (a wide range says the machine was too busy for the figure to mean much).

1. Saliency on a 3D MONAI ResNet-18 (``monai.networks.nets.resnet18``, 1 input channel, 2 classes): WBP,
   vanilla gradient, input x gradient, Grad-CAM and LRP through ``ppi_med.saliency.compute``, with the
   model in eval mode and in train mode. Baseline: the vanilla gradient.
   Also LRP against Captum's LRP (``captum.attr.LRP``, when Captum is installed) in the same process, on the
   same ResNet-18 (ReLUs not in place, which Captum's hooks need) and under the same rules: z-plus on the
   convolutions with batch norm folded in (for Captum on a folded copy, ``Alpha1_Beta0_Rule`` without bias;
   ours merges it itself), epsilon on the dense layer, on a non-negative input (where Captum's z-plus, which
   drops the ``a-`` term, is ours). Baseline: Captum.
2. One training step on the multi-view GA network (``ppi_med.networks.MVCNN``, a 2D MONAI ResNet-18 on
   every B-scan, max-pooled over views, linear head): PPI objective (detached and differentiable mode)
   + backward + optimizer step, against cross-entropy + backward + optimizer step.

Targets (docs/DESIGN.md sections 3 and 4): WBP <= 1.15 x the gradient; LRP <= 1.2 x Captum's LRP; a PPI
step <= 3.5 x a plain step in detached mode and <= 4.5 x in differentiable mode. Each prints PASS or FAIL,
judged on the paired wall-clock ratio.

Process CPU time is printed beside the wall-clock figures: on a shared machine, where other jobs take the
cores, it is the steadier of the two. ``--threads 1`` also steadies CPU figures there (torch's default of
one thread per core oversubscribes a busy machine); by default the thread count is left as torch sets it.
Where the load average at the start exceeds the cores left over, the run says so: with two threads on two
busy cores a call's time swings several-fold from one round to the next, and a ratio of two such calls
with it (docs/performance.md has the figures).

Usage:
    python benchmarks/bench_saliency_ppi.py [--device cpu|cuda] [--repeats 5] [--json OUT.json]
    python benchmarks/bench_saliency_ppi.py --phases      # also time each phase of the PPI step
    python benchmarks/bench_saliency_ppi.py --threads 1   # one intra-op thread
    python benchmarks/bench_saliency_ppi.py --keep-heap   # glibc keeps freed memory (fewer page faults)
    python benchmarks/bench_saliency_ppi.py --skip-ppi --lrp-repeats 31   # saliency and LRP only
    python -m benchmarks.bench_saliency_ppi --help
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import resnet18
from torch import nn
from tqdm import tqdm

from ppi_med.networks import MVCNN
from ppi_med.ppi import make_mask, normalize
from ppi_med.saliency import METHODS, compute, make_tracer

try:  # run as a script (benchmarks/ is on the path) or as python -m benchmarks.bench_saliency_ppi
    from profile_ppi_step import step_functions
except ImportError:
    from benchmarks.profile_ppi_step import step_functions

__all__ = [
    "main",
    "time_round_robin",
    "saliency_timings",
    "lrp_captum_timings",
    "ppi_step_timings",
    "ppi_phase_timings",
]

TARGETS = {
    "wbp_vs_gradient": 1.15,
    "lrp_vs_captum": 1.2,
    "ppi_detached_vs_plain": 3.5,
    "ppi_differentiable_vs_plain": 4.5,
}

DEFAULTS = {
    "cpu": {"batch3d": 2, "size3d": 32, "mv_batch": 4, "views": 8, "mv_size": 64},
    "cuda": {"batch3d": 8, "size3d": 96, "mv_batch": 16, "views": 16, "mv_size": 128},
}


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap instead of handing large blocks back to the system.

    By default every block above 32 MiB is mapped and unmapped on each use, so each step pays page faults
    in proportion to its peak memory; a PPI step allocates several times what a plain step does, and on
    a virtual machine those faults are dear. Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, desc: str
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every function, measured in interleaved rounds.

    Args:
        fns: name -> a function doing one complete unit of work.
        repeats: timed rounds.
        warmup: untimed rounds first (allocator, caches, lazy initialisation).
        device: synchronised before reading the clock.
        desc: progress bar label.

    Returns:
        name -> ``{"wall": [...], "cpu": [...]}``, ``repeats`` wall-clock and process-CPU durations, in the
        order of the rounds (so that round ``i`` of two candidates can be paired). CPU time is the steadier
        figure on a shared machine, where other jobs steal the cores.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in fns}
    for round_ in tqdm(range(repeats), desc=desc, leave=False):
        order = list(fns.items())
        for name, fn in order if round_ % 2 == 0 else order[::-1]:
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _summary(times: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, dict[str, float]]:
    """Medians, ratios of the medians and paired ratios (round by round) to ``baseline``.

    ``paired_ratio`` is the median over the rounds of the candidate's time over the baseline's in the same
    round, ``paired_q1``/``paired_q3`` the quartiles of those ratios; ``cpu_paired_ratio`` the same in CPU time.
    """
    base = statistics.median(times[baseline]["wall"])
    base_cpu = statistics.median(times[baseline]["cpu"])
    out = {}
    for name, ts in times.items():
        med, cpu = statistics.median(ts["wall"]), statistics.median(ts["cpu"])
        paired = [t / b for t, b in zip(ts["wall"], times[baseline]["wall"])]
        paired_cpu = [t / b for t, b in zip(ts["cpu"], times[baseline]["cpu"])]
        q1, q3 = _quartiles(paired)
        out[name] = {
            "median_ms": 1e3 * med,
            "min_ms": 1e3 * min(ts["wall"]),
            "ratio": med / base,
            "paired_ratio": statistics.median(paired),
            "paired_q1": q1,
            "paired_q3": q3,
            "cpu_median_ms": 1e3 * cpu,
            "cpu_ratio": cpu / base_cpu,
            "cpu_paired_ratio": statistics.median(paired_cpu),
        }
    return out


def saliency_timings(
    device: torch.device, batch: int, size: int, repeats: int, warmup: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Time every saliency method on a 3D ResNet-18, in eval and in train mode.

    Returns:
        ``{mode: {method: {median_ms, min_ms, ratio}}}`` with ratios to the vanilla gradient.
    """
    torch.manual_seed(0)
    model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).to(device)
    x = torch.randn(batch, 1, size, size, size, device=device)
    target = torch.arange(batch, device=device) % 2
    results = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        order = ["gradient"] + [m for m in METHODS if m != "gradient"]
        fns = {m: (lambda m=m: compute(m, model, x, target)) for m in order}
        times = time_round_robin(fns, repeats, warmup, device, f"saliency ({mode})")
        results[mode] = _summary(times, "gradient")
    return results


def _captum_lrp(model: nn.Module, epsilon: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Captum's LRP under this project's rules, on a copy of a MONAI ResNet with its batch norms folded.

    Every ``convN``/``bnN`` pair (and a downsampling ``conv, bn``) becomes one convolution, the batch norm an
    identity Captum passes relevance through; Captum drops the rules after each call, so they are set anew.
    """
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule

    folded = copy.deepcopy(model)
    named = dict(folded.named_modules())
    for name, conv in list(named.items()):
        if not isinstance(conv, nn.Conv3d):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = named[parent_name]
        bn_name = {"conv1": "bn1", "conv2": "bn2", "0": "1"}[leaf]
        bn = getattr(parent, bn_name)
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        setattr(parent, bn_name, nn.Dropout(0.0))
    explainer = LRP(folded)

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        for m in folded.modules():
            if isinstance(m, nn.Conv3d):
                m.rule = Alpha1_Beta0_Rule(set_bias_to_zero=True)
            elif isinstance(m, (nn.Linear, nn.AdaptiveAvgPool3d, nn.MaxPool3d)):
                m.rule = EpsilonRule(epsilon=epsilon)
        return explainer.attribute(x, target=target)

    return attribute


def lrp_captum_timings(
    device: torch.device, batch: int, size: int, repeats: int, warmup: int
) -> dict[str, dict[str, float]] | None:
    """Time LRP against Captum's LRP on a 3D ResNet-18 in eval mode (same network, same rules).

    Returns:
        ``{method: {median_ms, min_ms, ratio, ...}}`` with ratios to Captum, or None without Captum.
    """
    try:
        import captum  # noqa: F401
    except ImportError:
        return None
    torch.manual_seed(0)
    model = resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, act=("relu", {"inplace": False}))
    model = model.to(device).eval()
    x = torch.randn(batch, 1, size, size, size, device=device)
    target = torch.arange(batch, device=device) % 2
    epsilon = 1e-9  # Captum's z-plus stabiliser, which it does not let one set
    captum_lrp = _captum_lrp(model, epsilon)
    fns = {
        "captum_lrp": lambda: captum_lrp(x.abs(), target),
        "lrp": lambda: compute("lrp", model, x.abs(), target, epsilon=epsilon),
        # a signed input: ours adds the a- convolution on the first layer (Captum has no such term)
        "lrp_signed_input": lambda: compute("lrp", model, x, target, epsilon=epsilon),
    }
    return _summary(time_round_robin(fns, repeats, warmup, device, "lrp vs captum"), "captum_lrp")


def _mv_setup(device: torch.device, batch: int, views: int, size: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MVCNN(in_channels=1, num_classes=2, backbone="resnet18", width=64).to(device).train()
    x = torch.randn(batch, 1, views, size, size, device=device)
    y = torch.arange(batch, device=device) % 2
    return model, x, y


def ppi_step_timings(
    device: torch.device, batch: int, views: int, size: int, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Time one plain and one PPI training step (both modes) on the MVCNN.

    Returns:
        ``{step: {median_ms, min_ms, ratio}}`` with ratios to the plain step.
    """
    # the partner form with warmup_epochs=0: both contrasts run at epoch 1 (profile_ppi_step.PPI_FORM)
    fns = step_functions(device, batch, views, size)
    return _summary(time_round_robin(fns, repeats, warmup, device, "training step"), "plain")


def ppi_phase_timings(
    device: torch.device, batch: int, views: int, size: int, repeats: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Where a PPI step's time goes: the objective's phases rebuilt step by step (soft mask, WBP).

    The phases follow :class:`ppi_med.ppi.PPIObjective`: traced forward of ``x``, the saliency backward,
    mask, one forward of both contrasts, then the backward of the total loss and the optimizer step.

    Returns:
        ``{mode: {phase: median_ms}}``.
    """
    model, x, y = _mv_setup(device, batch, views, size)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    n = x.shape[0]
    out: dict[str, dict[str, float]] = {}
    for mode in ("plain", "detached", "differentiable"):
        phases: dict[str, list[float]] = {}

        def mark(name: str, start: float, phases: dict[str, list[float]] = phases) -> float:
            _sync(device)
            now = time.perf_counter()
            phases.setdefault(name, []).append(now - start)
            return now

        for i in range(warmup + repeats):
            if i == warmup:
                phases.clear()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            t = time.perf_counter()
            if mode == "plain":
                loss = F.cross_entropy(model(x), y)
                t = mark("forward x", t)
            else:
                xg = x.detach().requires_grad_(True)
                tracer = make_tracer("wbp", model)
                tracer.input_gradient = False  # as the objective: no loss reads xg's gradient
                with tracer:
                    logits = model(xg)
                loss_cls = F.cross_entropy(logits, y)
                t = mark("forward x", t)
                s = tracer.saliency(logits, xg, y, create_graph=mode == "differentiable", retain_graph=True)
                t = mark("saliency backward", t)
                s_n = normalize(s)
                mask = make_mask("soft", s_n)
                contrasts = torch.cat([x - mask * x, x - mask.roll(1, dims=0) * x])
                t = mark("mask", t)
                logits2 = model(contrasts)
                t = mark("forward contrasts", t)
                loss = (
                    loss_cls
                    + F.cross_entropy(logits2[:n], 1 - y)
                    + 0.1 * s_n.abs().mean()
                    + F.cross_entropy(logits2[n:], y)
                )
            loss.backward()
            t = mark("backward", t)
            opt.step()
            mark("optimizer step", t)
        out[mode] = {k: 1e3 * statistics.median(v) for k, v in phases.items()}
    return out


def _print_table(title: str, rows: dict[str, dict[str, float]], baseline: str) -> None:
    print(f"\n{title}")
    head = (
        f"  {'':<22}{'median ms':>11}{'min ms':>10}{'x ' + baseline:>14}{'paired x':>10}{'quartiles':>13}"
        f"{'cpu ms':>10}{'cpu x':>8}"
    )
    print(head)
    for name, r in rows.items():
        quartiles = f"{r['paired_q1']:.2f}-{r['paired_q3']:.2f}"
        print(
            f"  {name:<22}{r['median_ms']:>11.1f}{r['min_ms']:>10.1f}{r['ratio']:>14.2f}{r['paired_ratio']:>10.2f}"
            f"{quartiles:>13}{r['cpu_median_ms']:>10.1f}{r['cpu_paired_ratio']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> dict:
    """Parse the arguments, run the measurements, print them and optionally write them as JSON.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The figures that ``--json`` writes.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds (default 2)")
    parser.add_argument(
        "--lrp-repeats",
        type=int,
        default=15,
        help="timed rounds of LRP against Captum's LRP (cheap calls, noisy ratio; default 15)",
    )
    parser.add_argument("--batch3d", type=int, help="3D batch size (default 2 on CPU, 8 on CUDA)")
    parser.add_argument("--size3d", type=int, help="3D volume side (default 32 on CPU, 96 on CUDA)")
    parser.add_argument("--mv-batch", type=int, help="multi-view batch N (default 4 on CPU, 16 on CUDA)")
    parser.add_argument("--views", type=int, help="views V per volume (default 8 on CPU, 16 on CUDA)")
    parser.add_argument("--mv-size", type=int, help="B-scan side (default 64 on CPU, 128 on CUDA)")
    parser.add_argument("--skip-saliency", action="store_true", help="skip part 1 (saliency methods)")
    parser.add_argument("--skip-ppi", action="store_true", help="skip part 2 (training steps)")
    parser.add_argument("--phases", action="store_true", help="also time each phase of the PPI step")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's own choice, left untouched)"
    )
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="glibc only: keep freed memory in the heap (no per-step mmap/munmap of large blocks)",
    )
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file (must not exist)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.lrp_repeats < 1 or args.warmup < 0:
        parser.error("--repeats and --lrp-repeats must be at least 1 and --warmup at least 0")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} already exists; choose a new file name")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.keep_heap and not keep_freed_memory():
        parser.error("--keep-heap needs glibc (mallopt failed or libc.so.6 not found)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    sizes = {k: getattr(args, k) or v for k, v in DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items()}

    report: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "repeats": args.repeats,
        "lrp_repeats": args.lrp_repeats,
        "warmup": args.warmup,
        "sizes": sizes,
        "keep_heap": args.keep_heap,
        "targets": {},
    }
    print(
        f"device {device} ({report['device_name']}), torch {torch.__version__}, {report['threads']} threads"
        + (", glibc keeps freed memory" if args.keep_heap else "")
    )
    if report["load_average"]:
        print(f"load average at start: {', '.join(f'{v:.2f}' for v in report['load_average'])}")
        spare = (os.cpu_count() or 1) - report["threads"]
        if report["load_average"][0] > spare + 0.5:
            print(
                f"  busy machine: load {report['load_average'][0]:.1f} on {os.cpu_count()} cores with "
                f"{report['threads']} thread(s) here; the ratios swing from round to round (see the quartiles)"
                + ("; --threads 1 steadies them" if report["threads"] > 1 else "")
            )

    # targets are judged on the paired wall-clock ratio (median over the rounds); the CPU-time one is printed beside it
    checks: list[tuple[str, float, float]] = []
    if not args.skip_saliency:
        b, s = sizes["batch3d"], sizes["size3d"]
        sal = saliency_timings(device, b, s, args.repeats, args.warmup)
        report["saliency"] = sal
        for mode, rows in sal.items():
            _print_table(f"saliency, 3D ResNet-18, batch {b} x 1 x {s}^3, {mode} mode", rows, "gradient")
            checks.append((f"wbp_vs_gradient ({mode})", rows["wbp"]["paired_ratio"], TARGETS["wbp_vs_gradient"]))
        lrp_rows = lrp_captum_timings(device, b, s, args.lrp_repeats, args.warmup)
        if lrp_rows is None:
            print("\nLRP vs Captum: skipped, Captum is not installed (pip install -e '.[dev]')")
        else:
            report["lrp_vs_captum"] = lrp_rows
            _print_table(f"LRP vs Captum, 3D ResNet-18, batch {b} x 1 x {s}^3, eval mode", lrp_rows, "captum_lrp")
            checks.append(("lrp_vs_captum", lrp_rows["lrp"]["paired_ratio"], TARGETS["lrp_vs_captum"]))
    if not args.skip_ppi:
        n, v, s = sizes["mv_batch"], sizes["views"], sizes["mv_size"]
        steps = ppi_step_timings(device, n, v, s, args.repeats, args.warmup)
        report["training_step"] = steps
        _print_table(f"training step, MVCNN (2D ResNet-18), batch {n} x 1 x {v} x {s} x {s}", steps, "plain")
        for mode in ("detached", "differentiable"):
            key = f"ppi_{mode}_vs_plain"
            checks.append((key, steps[f"ppi_{mode}"]["paired_ratio"], TARGETS[key]))
        if args.phases:
            phases = ppi_phase_timings(device, n, v, s, args.repeats, args.warmup)
            report["phases_ms"] = phases
            print("\nphases of one step (median ms)")
            for mode, rows in phases.items():
                total = sum(rows.values())
                cells = ", ".join(f"{k} {ms:.0f}" for k, ms in rows.items())
                print(f"  {mode:<15} total {total:.0f}: {cells}")

    print("\ntargets")
    for name, ratio, limit in checks:
        ok = ratio <= limit
        report["targets"][name] = {"ratio": ratio, "limit": limit, "pass": ok}
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {ratio:.2f} x (target <= {limit} x, paired wall-clock)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nfigures written to {args.json}")
    return report


if __name__ == "__main__":
    main()
