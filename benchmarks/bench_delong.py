"""Time ``ppi_med.stats.delong_test`` on one million cases (two correlated score vectors).

Not a test: it prints the best wall-clock time over a few repeats. The target is under 2 s on the
project's 2-core CPU machine.

Usage:
    python -m benchmarks.bench_delong [--cases 1000000] [--repeats 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tqdm import tqdm

from ppi_med.stats import auc_ci, delong_test

__all__ = ["main", "make_data"]


def make_data(n_cases: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (30 % positive) and two scores sharing a latent signal (correlation about 0.7).

    Args:
        n_cases: Number of cases.
        seed: Seed of the random generator.

    Returns:
        ``(y_true, score_a, score_b)``; ``score_b`` is rounded to 3 decimals so it also has ties.
    """
    rng = np.random.default_rng(seed)
    y_true = rng.random(n_cases) < 0.3
    common = rng.standard_normal(n_cases)
    score_a = 0.9 * y_true + 0.8 * common + 0.6 * rng.standard_normal(n_cases)
    score_b = np.round(0.7 * y_true + 0.8 * common + 0.6 * rng.standard_normal(n_cases), 3)
    return y_true, score_a, score_b


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, run the timings and print them.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1_000_000, help="number of cases (default 1,000,000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the best is reported")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    args = parser.parse_args(argv)
    if args.cases < 4 or args.repeats < 1:
        parser.error("--cases must be at least 4 and --repeats at least 1")

    y_true, score_a, score_b = make_data(args.cases, args.seed)
    timings = {"delong_test": [], "auc_ci": []}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        start = time.perf_counter()
        result = delong_test(y_true, score_a, score_b)
        timings["delong_test"].append(time.perf_counter() - start)
        start = time.perf_counter()
        auc_ci(y_true, score_a)
        timings["auc_ci"].append(time.perf_counter() - start)

    print(f"cases: {args.cases:,} ({result.n_pos:,} positive, {result.n_neg:,} negative)")
    print(f"auc_a = {result.auc_a:.6f}, auc_b = {result.auc_b:.6f}, z = {result.z:.4f}, p = {result.p_value:.3g}")
    for name, seconds in timings.items():
        print(f"{name}: best {min(seconds):.3f} s over {args.repeats} repeats (median {np.median(seconds):.3f} s)")


if __name__ == "__main__":
    main()
