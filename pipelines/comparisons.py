"""Which fix works on my data? Every method of a study beside the baseline and PPI, per model-selection rule.

Reads what the studies wrote and tests each method against both references:

- a shortcut benchmark folder (``pipelines.shortcut --out DIR``: ``DIR/<cue>/results.csv``): reversed-cue and
  cue-free AUC, mean +- sd over seeds, paired t-tests across seeds;
- ``make results``' GA jobs (``--ga OUT``): held-out test AUC, DeLong per seed, per selection rule the jobs ran
  under;
- a site-CV folder (``pipelines.site_cv --out DIR``: ``DIR/predictions.csv``, and ``DIR/cue_effect/cue_effect.csv``
  when :mod:`pipelines.cue_effect` has run): the training site's own held-out AUC and the pooled out-of-site
  AUC (every other site's records in one ROC) per seed, mean +- sd, with DeLong's paired test on the
  seed-averaged scores of the same records; the cue effect per method when known.

Each table ends with the line that says which method measured best and whether PPI beat each comparator.

CLI::

    python -m pipelines.comparisons --shortcut train=runs/shortcut/a --shortcut oracle=runs/shortcut/b \\
        --sites train=runs/site_cv/c --out docs/comparators
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import ttest_rel

from ppi_med.stats import delong_test

from .formatting import p_value
from .portable import portable_path, portable_text

__all__ = [
    "best_line",
    "ga_comparison",
    "ga_selections",
    "main",
    "shortcut_comparison",
    "site_comparison",
    "site_markdown",
    "write_comparisons",
]

#: the shortcut benchmark names its methods by their labels (``ppi`` is reported as ``ppi_wbp``)
SHORTCUT_REFERENCES = ("baseline", "ppi_wbp")
SITE_REFERENCES = ("baseline", "ppi_wbp")


def _paired_t(a: pd.Series, b: pd.Series) -> float:
    a, b = a.align(b, join="inner")
    diff = (a - b).dropna()
    if len(diff) < 2:
        return math.nan
    if np.allclose(diff, diff.iloc[0]):
        return 0.0 if diff.iloc[0] != 0 else 1.0
    return float(ttest_rel(a[diff.index], b[diff.index]).pvalue)


def _ms(mean: float, sd: float) -> str:
    return f"{mean:.3f}" if not math.isfinite(sd) else f"{mean:.3f} ± {sd:.3f}"


def _vs(row: pd.Series, delta: str, p: str) -> str:
    d = row.get(delta, math.nan)
    return "" if not math.isfinite(d) else f"{d:+.3f} ({p_value(row[p])})"


def _sd(values: Sequence[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else math.nan


def shortcut_comparison(results: pd.DataFrame, references: Sequence[str] = SHORTCUT_REFERENCES) -> pd.DataFrame:
    """One row per method of a cue's ``results.csv``: AUC per test set (mean, sd) and paired p-values against
    each reference on the reversed-cue and cue-free AUC."""
    wide = results.pivot_table(index=["method", "seed"], columns="test", values="auc")
    rows = []
    for method in dict.fromkeys(results["method"]):
        sub = wide.loc[method]
        row = {"method": method, "seeds": len(sub)}
        for test in ("aligned", "reversed", "free"):
            row[f"{test}_mean"], row[f"{test}_sd"] = sub[test].mean(), _sd(sub[test].tolist())
        for ref in references:
            if ref in wide.index.get_level_values(0) and method != ref:
                for test in ("reversed", "free"):
                    row[f"{test}_delta_{ref}"] = float((sub[test] - wide.loc[ref][test]).mean())
                    row[f"{test}_p_{ref}"] = _paired_t(sub[test], wide.loc[ref][test])
        rows.append(row)
    return pd.DataFrame(rows)


def _pooled_auc(rows: pd.DataFrame) -> float:
    from sklearn.metrics import roc_auc_score

    y = rows["label"].to_numpy()
    return float(roc_auc_score(y, rows["score"])) if 0 < y.sum() < len(y) else math.nan


def site_comparison(
    preds: pd.DataFrame, cue: pd.DataFrame | None = None, references: Sequence[str] = SITE_REFERENCES
) -> pd.DataFrame:
    """One row per method of a site-CV study's predictions.

    Columns: ``own`` (the training site's held-out records) and ``out`` (every other site pooled) AUC, mean and
    sd over seeds; per test site the seed-mean AUC (``site_<X>``); DeLong p of ``out`` against each reference
    on the seed-averaged scores of the same records (``out_p_<ref>``), with the AUC difference; the cue effect
    (mean over seeds and sites without the watermark at training, ``cue_effect``) when ``cue`` is given. Where
    several sites were trained on, a record counts once per model trained elsewhere, as in the site matrices'
    pooled off-diagonal test.
    """
    rows = []
    out_rows = preds[preds["role"] == "site"]
    averaged = out_rows.groupby(["method", "train_site", "test_site", "case"], sort=False).agg(
        label=("label", "first"), score=("score", "mean")
    )
    for method in dict.fromkeys(preds["method"]):
        sub = preds[preds["method"] == method]
        row = {"method": method, "seeds": sub["seed"].nunique()}
        for role, name in (("heldout", "own"), ("site", "out")):
            per_seed = [_pooled_auc(g) for _, g in sub[sub["role"] == role].groupby("seed")]
            row[f"{name}_mean"], row[f"{name}_sd"] = float(np.nanmean(per_seed)), _sd(per_seed)
        for site, g in sub[sub["role"] == "site"].groupby("test_site"):
            row[f"site_{site}"] = float(np.nanmean([_pooled_auc(s) for _, s in g.groupby("seed")]))
        for ref in references:
            if ref == method or ref not in set(preds["method"]):
                continue
            a, b = averaged.loc[method], averaged.loc[ref]
            a, b = a.align(b, join="inner", axis=0)
            try:
                res = delong_test(a["label"].to_numpy(), a["score"].to_numpy(), b["score"].to_numpy())
                row[f"out_diff_{ref}"], row[f"out_p_{ref}"] = res.auc_a - res.auc_b, res.p_value
            except ValueError:
                row[f"out_diff_{ref}"] = row[f"out_p_{ref}"] = math.nan
        if cue is not None and method in set(cue["method"]):
            row["cue_effect"] = float(cue[cue["method"] == method].groupby("seed")["effect"].mean().mean())
        rows.append(row)
    return pd.DataFrame(rows)


#: a GA job's folder: ``ga-<method>-s<seed>``, under a selection rule other than ``train`` ``...-<rule>``
_GA_JOB = re.compile(r"ga-(.+?)-s(\d+)(?:-([a-z_]+))?")


def _ga_job(folder: str) -> tuple[str, int, str] | None:
    """(method, seed, selection rule) of a GA job's folder name; ``None`` for any other folder."""
    m = _GA_JOB.fullmatch(folder)
    return (m.group(1), int(m.group(2)), m.group(3) or "train") if m else None


def ga_selections(jobs_dir: Path) -> list[str]:
    """The selection rules ``make results``' GA jobs in ``jobs_dir`` ran under, ``train`` first."""
    found = {job[2] for p in jobs_dir.glob("ga-*-s*") if (job := _ga_job(p.name))}
    return sorted(found, key=lambda s: (s != "train", s))


def ga_comparison(
    jobs_dir: Path, references: Sequence[str] = SITE_REFERENCES, selection: str = "train"
) -> pd.DataFrame:
    """One row per method of ``make results``' GA jobs under ``selection`` (``jobs_dir/ga-<method>-s<seed>`` for
    ``train``, ``...-<selection>`` otherwise; ``runs/*/test_predictions.csv`` in each): held-out test AUC (``out``:
    mean, sd over seeds), the mean paired difference against each reference under the same rule and the largest
    of the seeds' DeLong p (``out_p_<ref>``: every seed must show the difference)."""
    found: dict[str, dict[int, pd.DataFrame]] = {}
    for path in sorted(jobs_dir.glob("ga-*-s*/runs/*/test_predictions.csv")):
        job = _ga_job(path.parents[2].name)
        if job and job[2] == selection:
            found.setdefault(job[0], {})[job[1]] = pd.read_csv(path)
    rows = []
    for method, seeds in found.items():
        aucs = [_pooled_auc(d.rename(columns={"prob": "score"})) for d in seeds.values()]
        row = {"method": method, "seeds": len(seeds), "out_mean": float(np.mean(aucs)), "out_sd": _sd(aucs)}
        for ref in references:
            if ref == method or ref not in found:
                continue
            diffs, ps = [], []
            for seed, d in seeds.items():
                r = found[ref].get(seed)
                if r is None:
                    continue
                both = d.merge(r, on="image", suffixes=("", "_ref"))
                res = delong_test(both["label"].to_numpy(), both["prob"].to_numpy(), both["prob_ref"].to_numpy())
                diffs.append(res.auc_a - res.auc_b)
                ps.append(res.p_value)
            if diffs:
                row[f"out_diff_{ref}"], row[f"out_p_{ref}"] = float(np.mean(diffs)), float(max(ps))
        rows.append(row)
    return pd.DataFrame(rows)


def _ga_markdown(table: pd.DataFrame) -> list[str]:
    lines = [
        "Held-out test AUC (the bundle's `test_fraction` 0.25), mean ± sd over seeds; against a reference: the "
        "mean paired difference over seeds and the largest of the seeds' DeLong p.",
        "",
        "| method | test AUC | vs baseline (largest p) | vs `ppi_wbp` (largest p) |",
        "|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        cells = [f"`{r['method']}`", _ms(r["out_mean"], r["out_sd"])]
        cells += [_vs(r, f"out_diff_{ref}", f"out_p_{ref}") for ref in ("baseline", "ppi_wbp")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", best_line(table, "out", "ppi_wbp", "held-out test AUC"), ""]
    return lines


def best_line(table: pd.DataFrame, metric: str, ppi: str, what: str) -> str:
    """The sentence under a table: the best method by ``metric`` and PPI against each other method.

    PPI "beats" or "loses to" a method only where the table's test of the two gives p < 0.05, in the direction
    of the difference that test measured; otherwise they do not differ significantly.
    """
    best = table.loc[table[f"{metric}_mean"].idxmax()]
    line = f"Best {what}: `{best['method']}` ({best[f'{metric}_mean']:.3f})."
    if ppi in set(table["method"]):
        p_ref = table.set_index("method")
        ppi_value = p_ref.loc[ppi, f"{metric}_mean"]
        verdicts = []
        for m, r in p_ref.iterrows():
            if m in (ppi, "baseline"):
                continue
            test = "reversed" if metric == "reversed" else "out"
            p = r.get(f"{test}_p_{ppi}", math.nan)
            # the sign of the difference the p-value tests (other method minus PPI), where the table has it
            diff = r.get(f"{test}_diff_{ppi}", r.get(f"{test}_delta_{ppi}", math.nan))
            if not np.isfinite(diff):
                diff = r[f"{metric}_mean"] - ppi_value
            if np.isfinite(p) and p < 0.05:
                word = "beats" if diff < 0 else "loses to"
            else:
                word = "does not differ significantly from"
            verdicts.append(f"{word} `{m}` ({ppi_value:.3f} against {r[f'{metric}_mean']:.3f}, p {p_value(p)})")
        if verdicts:
            line += f" `{ppi}` " + "; ".join(verdicts) + "."
    return line


def _shortcut_markdown(label: str, cue: str, table: pd.DataFrame) -> list[str]:
    lines = [
        f"#### Cue `{cue}`, selection `{label}`" + (" (an oracle)" if label == "oracle" else ""),
        "",
        "AUC mean ± sd over seeds; against a reference: the mean paired difference and the paired t-test's p.",
        "",
        "| method | aligned AUC | reversed AUC | cue-free AUC | reversed vs baseline (p) | reversed vs `ppi_wbp` (p) "
        "| cue-free vs baseline (p) |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        cells = [f"`{r['method']}`"] + [_ms(r[f"{t}_mean"], r[f"{t}_sd"]) for t in ("aligned", "reversed", "free")]
        cells += [
            _vs(r, f"{t}_delta_{ref}", f"{t}_p_{ref}") for t, ref in (("reversed", "baseline"), ("reversed", "ppi_wbp"))
        ]
        cells.append(_vs(r, "free_delta_baseline", "free_p_baseline"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", best_line(table, "reversed", "ppi_wbp", "reversed-cue AUC"), ""]
    return lines


def site_markdown(heading: str, table: pd.DataFrame) -> list[str]:
    """A site study's comparison (:func:`site_comparison`) as Markdown under ``heading``, with its best line."""
    sites = sorted(c.removeprefix("site_") for c in table.columns if c.startswith("site_"))
    has_cue = "cue_effect" in table.columns
    head = ["method", "own held-out AUC", "out-of-site AUC (pooled)", *(f"site {s}" for s in sites)]
    head += ["out vs baseline (DeLong p)", "out vs `ppi_wbp` (DeLong p)"] + (["cue effect"] if has_cue else [])
    lines = [
        heading,
        "",
        "AUC columns: mean (± sd) over seeds of each seed's AUC; the site columns the seed mean. The columns "
        "against a reference are the AUC difference of the scores averaged over seeds per record, with DeLong's "
        "paired p on those records"
        + ("; cue effect: the watermark's mean pull on P(GA) (`pipelines.cue_effect`)." if has_cue else "."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for _, r in table.iterrows():
        cells = [f"`{r['method']}`", _ms(r["own_mean"], r["own_sd"]), _ms(r["out_mean"], r["out_sd"])]
        cells += [f"{r[f'site_{s}']:.3f}" for s in sites]
        cells += [_vs(r, f"out_diff_{ref}", f"out_p_{ref}") for ref in ("baseline", "ppi_wbp")]
        if has_cue:
            cells.append(f"{r['cue_effect']:+.3f}" if math.isfinite(r.get("cue_effect", math.nan)) else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", best_line(table, "out", "ppi_wbp", "pooled out-of-site AUC"), ""]
    return lines


def _plot(tables: dict[str, pd.DataFrame], metric: str, ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for t in tables.values() for m in t["method"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods) + 2), 3.6))
    width = 0.8 / max(1, len(tables))
    for k, (label, t) in enumerate(tables.items()):
        t = t.set_index("method").reindex(methods)
        x = np.arange(len(methods)) + (k - (len(tables) - 1) / 2) * width
        ax.bar(x, t[f"{metric}_mean"], width, yerr=t[f"{metric}_sd"], label=label, alpha=0.8, capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(title="selection", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _provenance(shortcut: dict[str, Path], sites: dict[str, Path], out: Path, ga: Path | None = None) -> list[str]:
    """What made each folder: the benchmark's command line, the site study's header (bundle, methods, git), the
    GA jobs' commits; paths as :func:`~pipelines.portable.portable_path` writes them, relative to ``out``."""
    import json

    lines = ["Made by `python -m pipelines.comparisons` from:", ""]
    if ga is not None:
        done = [json.loads(p.read_text()) for p in sorted((ga / "jobs").glob("ga-*-s*/done.json"))]
        commits = sorted({d.get("commit", "?")[:12] for d in done})
        rules = ", ".join(f"`{r}`" for r in ga_selections(ga / "jobs"))
        lines.append(
            f"- GA pooled (`{portable_path(ga, out)}`): {len(done)} `make results` GA jobs (selection {rules}) at "
            "commit(s) " + ", ".join(commits)
        )
    for label, folder in sites.items():
        head = (folder / "summary.md").read_text().splitlines()[:9] if (folder / "summary.md").is_file() else []
        facts = [x.removeprefix("- ") for x in head if x.startswith("- ") and not x.startswith("- MLflow")]
        where = portable_path(folder, out)
        lines.append(f"- site study `{label}` (`{where}`): " + portable_text("; ".join(facts), out))
    for label, folder in shortcut.items():
        report = folder / "report.md"
        made = [x for x in report.read_text().splitlines() if x.startswith("Produced by")] if report.is_file() else []
        made_by = portable_text(made[0], out).split(". Digits")[0] if made else "no report.md"
        lines.append(f"- shortcut `{label}` (`{portable_path(folder, out)}`): " + made_by)
    return lines


def write_comparisons(shortcut: dict[str, Path], sites: dict[str, Path], out: Path, ga: Path | None = None) -> Path:
    """``out/README.md`` with every table, the CSVs beside it and one figure per study.

    Args:
        shortcut: selection label -> shortcut benchmark folder.
        sites: selection label -> site-CV folder.
        out: where the report goes.
        ga: a ``make results`` folder whose GA jobs give the pooled GA table.

    Raises:
        FileNotFoundError: a folder without the results it should hold (named).
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Which fix works here: the comparators beside PPI", "", *_provenance(shortcut, sites, out, ga), ""]
    if ga is not None:
        lines += ["## GA, pooled training", ""]
        rules = ga_selections(ga / "jobs")
        tables = {sel: ga_comparison(ga / "jobs", selection=sel) for sel in rules}
        tables = {sel: t for sel, t in tables.items() if not t.empty}
        if not tables:
            raise FileNotFoundError(f"{ga}: no jobs/ga-<method>-s<seed>/runs/*/test_predictions.csv")
        for sel, table in tables.items():
            table.to_csv(out / ("ga_pooled.csv" if sel == "train" else f"ga_pooled_{sel}.csv"), index=False)
            lines += [f"#### Selection `{sel}`", ""] if len(tables) > 1 else []
            lines += _ga_markdown(table)
        if len(tables) > 1:
            _plot(tables, "out", "held-out test AUC", out / "ga_pooled_test_auc.png")
            lines += ["![held-out test AUC per method and selection rule](ga_pooled_test_auc.png)", ""]
    if sites:
        lines += ["## Site study", ""]
        tables = {}
        for label, folder in sites.items():
            path = folder / "predictions.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{folder}: no predictions.csv (not a finished site-CV study)")
            cue_path = folder / "cue_effect" / "cue_effect.csv"
            cue = pd.read_csv(cue_path) if cue_path.is_file() else None
            table = site_comparison(pd.read_csv(path), cue)
            table.to_csv(out / f"sites_{label}.csv", index=False)
            tables[label] = table
            lines += site_markdown(f"#### Selection `{label}`" + (" (an oracle)" if label == "oracle" else ""), table)
        _plot(tables, "out", "pooled out-of-site AUC", out / "sites_out_of_site_auc.png")
        lines += ["![pooled out-of-site AUC per method](sites_out_of_site_auc.png)", ""]
    if shortcut:
        lines += ["## Shortcut benchmark (digits)", ""]
        by_cue: dict[str, dict[str, pd.DataFrame]] = {}
        for label, folder in shortcut.items():
            found = sorted(folder.glob("*/results.csv"))
            if not found:
                raise FileNotFoundError(f"{folder}: no <cue>/results.csv (not a finished shortcut benchmark)")
            for path in found:
                cue = path.parent.name
                table = shortcut_comparison(pd.read_csv(path))
                table.to_csv(out / f"shortcut_{cue}_{label}.csv", index=False)
                by_cue.setdefault(cue, {})[label] = table
                lines += _shortcut_markdown(label, cue, table)
        for cue, tables in by_cue.items():
            _plot(tables, "reversed", "reversed-cue AUC", out / f"shortcut_{cue}_reversed_auc.png")
            lines += [f"![reversed-cue AUC, cue {cue}](shortcut_{cue}_reversed_auc.png)", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def _labelled(items: Sequence[str] | None, flag: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for item in items or []:
        label, eq, folder = item.partition("=")
        if not eq or not label or not folder:
            raise SystemExit(f"{flag} takes SELECTION=FOLDER, got '{item}'")
        found[label] = Path(folder)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.comparisons", description=__doc__.split("\n\n")[0])
    p.add_argument("--shortcut", action="append", help="SELECTION=FOLDER of a shortcut benchmark (repeatable)")
    p.add_argument("--sites", action="append", help="SELECTION=FOLDER of a site-CV study (repeatable)")
    p.add_argument("--ga", type=Path, help="a make-results folder: its GA jobs' held-out test predictions")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    args = p.parse_args(argv)
    shortcut, sites = _labelled(args.shortcut, "--shortcut"), _labelled(args.sites, "--sites")
    if not shortcut and not sites and args.ga is None:
        p.error("give at least one --ga, --shortcut or --sites folder")
    try:
        path = write_comparisons(shortcut, sites, args.out, args.ga)
    except FileNotFoundError as err:
        print(f"{p.prog}: error: {err}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
