"""What happens to validation AUC when PPI switches on: per-epoch curves and a table over bundle runs.

Every bundle run folder (``runs/<run>/``) keeps ``metrics.jsonl`` (each epoch's ``val_auc`` and the held-out
``test_auc``) and ``params.json`` (the PPI settings, among them ``warmup_epochs``). This reads groups of them,
one group per method, and writes

- ``switch_on.csv``: one row per run: the validation AUC at the last warm-up epoch, at the first PPI epoch,
  the lowest over the PPI epochs, the largest fall below the warm-up's last value, the best PPI-epoch value
  and the held-out test AUC;
- ``switch_on.md``: those rows as mean ± sd per group, with the test AUC's paired difference to the first
  group (the reference, e.g. the baseline) over the seeds both have and DeLong's paired p-value against it
  per seed (from the runs' ``test_predictions.csv``, the same held-out eyes);
- ``switch_on.png``: validation AUC per epoch, a panel per group, a line per seed, the switch marked.

CLI::

    python -m pipelines.switch_on --out docs/img/switch_on \\
        baseline='runs/study/base-s*/ga-*' default='runs/study/dflt-s*/ga-*'
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .formatting import mean_sd

__all__ = ["read_run", "summarise", "main"]


def read_run(folder: str | Path) -> dict:
    """The per-epoch validation AUC, the test AUC, seed and warm-up of one bundle run folder.

    Raises:
        FileNotFoundError: a folder without ``metrics.jsonl`` or ``params.json``.
    """
    folder = Path(folder)
    for name in ("metrics.jsonl", "params.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a bundle run folder: no {name}")
    val: dict[int, float] = {}
    test = np.nan
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "metric":
            continue
        if rec["key"] == "val_auc" and rec.get("step") is not None:
            val[int(rec["step"])] = float(rec["value"])
        elif rec["key"] == "test_auc":
            test = float(rec["value"])
    params = json.loads((folder / "params.json").read_text())
    preds = folder / "test_predictions.csv"
    return {
        "predictions": pd.read_csv(preds) if preds.is_file() else None,
        "run": folder.name,
        "seed": int(params.get("seed", 0)),
        # the bundles choose checkpoints from the first PPI epoch on, for the baseline too
        "warmup": int(params.get("checkpoint_from_epoch", 1)) - 1,
        "val": val,
        "test_auc": test,
    }


def _row(group: str, run: dict) -> dict:
    epochs = sorted(run["val"])
    w = run["warmup"]
    before = run["val"].get(w, np.nan)
    after = [run["val"][e] for e in epochs if e > w]
    return {
        "group": group,
        "seed": run["seed"],
        "run": run["run"],
        "warmup_epochs": w,
        "val_before": before,
        "val_first": after[0] if after else np.nan,
        "val_min_after": min(after) if after else np.nan,
        "largest_fall": (before - min(after)) if after else np.nan,
        "best_val": max(after) if after else np.nan,
        "test_auc": run["test_auc"],
    }


def _delong_p(ref: pd.DataFrame | None, other: pd.DataFrame | None) -> float:
    from ppi_med.stats import delong_test

    if ref is None or other is None:
        return float("nan")
    both = ref.merge(other, on=["image", "label"], suffixes=("_ref", ""))
    if len(both) != len(ref):
        return float("nan")  # not the same test eyes
    return delong_test(both["label"], both["prob_ref"], both["prob"]).p_value


def summarise(rows: pd.DataFrame, runs: dict[str, list[dict]] | None = None) -> pd.DataFrame:
    """Mean ± sd per group, the test AUC's paired difference to the first group over shared seeds and, with
    ``runs``, DeLong's paired p-value against the first group per seed (the same held-out eyes)."""
    ref_name = rows["group"].iloc[0]
    ref = rows[rows["group"] == ref_name].set_index("seed")["test_auc"]
    ref_preds = {r["seed"]: r.get("predictions") for r in (runs or {}).get(ref_name, [])}
    out = []
    for group, sub in rows.groupby("group", sort=False):
        paired = sub.set_index("seed")["test_auc"].sub(ref).dropna()
        rec = {"group": group, "seeds": len(sub)}
        for col in ("val_before", "val_first", "largest_fall", "best_val", "test_auc"):
            rec[col] = mean_sd(sub[col])
        rec["test_delta"] = f"{paired.mean():+.3f} ({len(paired)} seeds)" if group != ref_name else ""
        if runs is not None:
            ps = [
                _delong_p(ref_preds.get(r["seed"]), r.get("predictions"))
                for r in sorted(runs[group], key=lambda r: r["seed"])
                if r["seed"] in ref_preds
            ]
            rec["delong_p_per_seed"] = "" if group == ref_name else ", ".join(f"{p:.2f}" for p in ps)
        out.append(rec)
    return pd.DataFrame(out)


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), sharey=True, squeeze=False)
    for ax, (group, items) in zip(axes[0], runs.items()):
        for run in sorted(items, key=lambda r: r["seed"]):
            epochs = sorted(run["val"])
            ax.plot(
                epochs,
                [run["val"][e] for e in epochs],
                marker=".",
                lw=1,
                color=f"C{run['seed'] % 10}",
                label=f"seed {run['seed']}",
            )
        w = items[0]["warmup"] if items else 0
        if w:
            ax.axvline(w + 0.5, color="grey", ls="--", lw=1)
            ax.text(w + 0.7, 0.42, "PPI on", color="grey", fontsize=8)
        ax.set_title(group)
        ax.set_xlabel("epoch")
        ax.set_ylim(0.4, 1.01)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation AUC")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.switch_on", description=__doc__.split("\n\n")[0])
    p.add_argument("groups", nargs="+", help="LABEL=GLOB: the run folders of one method (quote the glob)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.csv, PREFIX.md and PREFIX.png")
    args = p.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    try:
        for spec in args.groups:
            label, eq, pattern = spec.partition("=")
            if not eq:
                raise ValueError(f"'{spec}' is not LABEL=GLOB")
            folders = sorted(glob.glob(pattern))
            if not folders:
                raise ValueError(f"no run folder matches {pattern} (group {label})")
            runs[label] = [read_run(f) for f in folders]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = pd.DataFrame([_row(g, r) for g, items in runs.items() for r in items])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(out.with_suffix(".csv"), index=False)
    table = summarise(rows, runs)
    text = _markdown(table)
    out.with_suffix(".md").write_text(text)
    _plot(runs, out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
