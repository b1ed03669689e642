"""Tables and figures of a site-wise cross-validation: console and Markdown tables, CSV/JSON files, heatmaps, ROCs.

The heatmaps are laid out as table 2.3 of the method's text: rows are training sites, columns test sites,
then the row ``Mean`` and ``STD``; every method's heatmap uses the same colour scale so that they can be
compared by eye. Figures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .cv_tables import STAT_COLUMNS, SiteCVTables  # noqa: E402

__all__ = [
    "format_matrix",
    "markdown_matrix",
    "mean_sd",
    "method_title",
    "plot_auc_heatmaps",
    "plot_pvalue_heatmap",
    "plot_roc_grids",
    "console_report",
    "markdown_report",
    "write_tables",
]


def mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd`` (sample sd) of the finite values, three decimals; one value alone; ``n/a`` for none."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def method_title(method: str) -> str:
    """A human title in the words of table 2.3: ``No PPI`` for the baseline, ``With PPI`` for a PPI method; a
    control or comparator (``random_erasing``, ``groupdro``, ``ppi_wbp+dfr``) by its name."""
    if method == "baseline":
        return "No PPI (baseline)"
    return f"With PPI ({method})" if method.startswith("ppi_") and "+" not in method else method


def _fmt(value: float, digits: int = 3, p_value: bool = False) -> str:
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    if p_value and value < 10 ** (-digits):
        return f"<{10 ** (-digits):.{digits}f}"
    return f"{value:.{digits}f}"


def format_matrix(df: pd.DataFrame, title: str, digits: int = 3, p_value: bool = False) -> str:
    """A right-aligned plain-text table with the title in the corner cell, as in table 2.3.

    Args:
        df: the matrix (rows training sites).
        title: text of the top-left cell.
        digits: decimals shown.
        p_value: show values below ``10**-digits`` as ``<0.001``.

    Returns:
        The table, lines joined by newlines.
    """
    header = [title, *map(str, df.columns)]
    rows = [[str(r), *(_fmt(v, digits, p_value) for v in df.loc[r])] for r in df.index]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    return "\n".join(lines)


def markdown_matrix(df: pd.DataFrame, title: str, digits: int = 3, p_value: bool = False) -> str:
    """The matrix as a Markdown table, the title in the corner cell, diagonal values in bold."""
    header = f"| {title} | " + " | ".join(map(str, df.columns)) + " |"
    align = "| --- | " + " | ".join("---:" for _ in df.columns) + " |"
    lines = [header, align]
    for r in df.index:
        cells = []
        for c in df.columns:
            text = _fmt(df.loc[r, c], digits, p_value)
            cells.append(f"**{text}**" if str(r) == str(c) else text)
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _auc_range(tables: SiteCVTables) -> tuple[float, float]:
    """One colour scale for every method: from the lowest AUC (rounded down to 0.05, at most 0.5) to 1."""
    values = np.concatenate([df[tables.test_sites].to_numpy(dtype=float).ravel() for df in tables.auc.values()])
    values = values[np.isfinite(values)]
    low = math.floor((values.min() if values.size else 0.5) * 20) / 20
    return min(low, 0.5), 1.0


def plot_auc_heatmaps(tables: SiteCVTables, out_dir: str | Path) -> list[Path]:
    """One heatmap per method (``heatmap_auc_<method>.png``), all on the same colour scale.

    The test-site cells and ``Mean`` are coloured by AUC; ``STD`` is printed on grey, outside the scale.

    Returns:
        The PNG paths.
    """
    out_dir = Path(out_dir)
    vmin, vmax = _auc_range(tables)
    cmap = plt.get_cmap("Blues").with_extremes(bad="#eeeeee")
    paths = []
    for method, df in tables.auc.items():
        cols = [*tables.test_sites, *STAT_COLUMNS]
        values = df[cols].to_numpy(dtype=float)
        shown = values.copy()
        shown[:, -1] = np.nan  # STD is not an AUC
        n_rows, n_cols = values.shape
        fig, ax = plt.subplots(figsize=(1.0 * n_cols + 2.2, 0.62 * n_rows + 1.6))
        im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                dark = j < n_cols - 1 and math.isfinite(v) and (v - vmin) / (vmax - vmin) > 0.6
                weight = "bold" if j < len(tables.test_sites) and tables.train_sites[i] == cols[j] else "normal"
                ax.text(
                    j,
                    i,
                    _fmt(v),
                    ha="center",
                    va="center",
                    fontsize=9,
                    weight=weight,
                    color="white" if dark else "black",
                )
        ax.axvline(len(tables.test_sites) - 0.5, color="black", lw=1.2)
        ax.set_xticks(range(n_cols), cols)
        ax.set_yticks(range(n_rows), tables.train_sites)
        ax.xaxis.tick_top()
        ax.set_xlabel("test site")
        ax.set_ylabel("training site")
        n_seeds = len(tables.auc_by_seed.get(method, {})) or 1
        seeds = f", mean of {n_seeds} seeds" if n_seeds > 1 else ""
        ax.set_title(f"AUC: {method_title(method)}{seeds}", fontsize=10, pad=24)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="AUC")
        fig.tight_layout()
        path = out_dir / f"heatmap_auc_{method}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_pvalue_heatmap(tables: SiteCVTables, out_dir: str | Path) -> Path | None:
    """DeLong p-values of every tested method vs the baseline (``heatmap_pvalue.png``), one panel each.

    Colour is the p-value on a log scale (darker = smaller); each cell also shows the AUC difference.

    Returns:
        The PNG path, or ``None`` when no method was tested against the baseline.
    """
    if not tables.pvalues:
        return None
    tested = tables.tested
    n_rows, n_cols = len(tables.train_sites), len(tables.test_sites)
    fig, axes = plt.subplots(
        1, len(tested), figsize=(len(tested) * (1.05 * n_cols + 2.4), 0.7 * n_rows + 1.7), squeeze=False
    )
    cmap = plt.get_cmap("Reds_r").with_extremes(bad="#eeeeee")
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    im = None
    for ax, method in zip(axes[0], tested):
        p = tables.pvalues[method].to_numpy(dtype=float)
        d = tables.auc_diff[method][tables.test_sites].to_numpy(dtype=float)
        im = ax.imshow(np.ma.masked_invalid(np.clip(p, 1e-4, 1.0)), cmap=cmap, norm=norm, aspect="auto")
        for i in range(n_rows):
            for j in range(n_cols):
                sign = "" if not math.isfinite(d[i, j]) else ("+" if d[i, j] >= 0 else "")
                text = f"p={_fmt(p[i, j], 3, True)}\nΔ{sign}{_fmt(d[i, j])}"
                dark = math.isfinite(p[i, j]) and p[i, j] < 0.01
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
        ax.set_xticks(range(n_cols), tables.test_sites)
        ax.set_yticks(range(n_rows), tables.train_sites)
        ax.xaxis.tick_top()
        ax.set_xlabel("test site")
        ax.set_ylabel("training site")
        ax.set_title(f"DeLong p: {method} vs {tables.reference}\n(Δ = AUC difference)", fontsize=9, pad=22)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.046, pad=0.04, label="p-value (log scale)")
    path = Path(out_dir) / "heatmap_pvalue.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_roc_grids(preds: pd.DataFrame, tables: SiteCVTables, out_dir: str | Path) -> list[Path]:
    """ROC curves of every cell, one figure per method (``roc_<method>.png``).

    Rows are training sites and columns test sites; each seed's curve is drawn, and for a PPI method the
    baseline's curves of the same cell are drawn dashed in grey beside it.

    Args:
        preds: the checked prediction table (all methods and seeds).
        tables: the tables (for sites, methods and the cell AUCs).
        out_dir: where the PNGs go.

    Returns:
        The PNG paths.
    """
    out_dir = Path(out_dir)
    n_rows, n_cols = len(tables.train_sites), len(tables.test_sites)
    cells = {key: g for key, g in preds.groupby(["method", "train_site", "test_site"], sort=False)}
    paths = []
    for method in tables.methods:
        fig, axes = plt.subplots(
            n_rows, n_cols, figsize=(2.3 * n_cols + 0.4, 2.3 * n_rows + 0.6), squeeze=False, sharex=True, sharey=True
        )
        ref = tables.reference if tables.reference and method != tables.reference else None
        for i, train in enumerate(tables.train_sites):
            for j, test in enumerate(tables.test_sites):
                ax = axes[i, j]
                ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls=":")
                title = f"{train}→{test}  AUC {_fmt(tables.auc[method].loc[train, test])}"
                for name, style in ((ref, dict(color="#888888", ls="--", lw=1.0)), (method, dict(color="C0", lw=1.4))):
                    group = cells.get((name, train, test)) if name else None
                    if group is None:
                        continue
                    for _, g in group.groupby("seed"):
                        if g["label"].nunique() == 2:
                            fpr, tpr, _ = roc_curve(g["label"], g["score"])
                            ax.plot(fpr, tpr, alpha=0.85, **style)
                if ref is not None:
                    title += f"\n{ref} {_fmt(tables.auc[ref].loc[train, test])}"
                ax.set_title(title, fontsize=8, weight="bold" if train == test else "normal")
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1.02)
                ax.tick_params(labelsize=7)
                if i == n_rows - 1:
                    ax.set_xlabel("1 - specificity", fontsize=7)
                if j == 0:
                    ax.set_ylabel(f"trained on {train}\nsensitivity", fontsize=7)
        legend = f"{method} (solid)" + (f" vs {ref} (dashed)" if ref else "")
        fig.suptitle(f"ROC per cell: {legend}\nrows: training site, columns: test site", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"roc_{method}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _frame_json(df: pd.DataFrame) -> dict:
    return {
        str(r): {str(c): (None if not math.isfinite(float(df.loc[r, c])) else float(df.loc[r, c])) for c in df.columns}
        for r in df.index
    }


def write_tables(tables: SiteCVTables, out_dir: str | Path) -> list[Path]:
    """CSV and JSON of every matrix, and the pooled comparisons, in ``out_dir``.

    Files: ``auc_<method>.{csv,json}`` (seed mean with Mean/STD), ``auc_<method>_seed<s>.csv``,
    ``pvalue_<method>_vs_<ref>.{csv,json}``, ``aucdiff_<method>_vs_<ref>.csv``,
    ``pvalue_<method>_vs_<ref>_seed<s>.csv``, ``pooled_offdiag.{csv,json}``, ``tables.json`` (all of it).

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    written: list[Path] = []

    def save(df: pd.DataFrame, stem: str, with_json: bool = True) -> None:
        df.to_csv(out_dir / f"{stem}.csv")
        written.append(out_dir / f"{stem}.csv")
        if with_json:
            (out_dir / f"{stem}.json").write_text(json.dumps(_frame_json(df), indent=2))
            written.append(out_dir / f"{stem}.json")

    for m, df in tables.auc.items():
        save(df, f"auc_{m}")
        if len(tables.auc_by_seed[m]) > 1:
            for s, sdf in tables.auc_by_seed[m].items():
                save(sdf, f"auc_{m}_seed{s}", with_json=False)
    ref = tables.reference
    for m, df in tables.pvalues.items():
        save(df, f"pvalue_{m}_vs_{ref}")
        save(tables.auc_diff[m], f"aucdiff_{m}_vs_{ref}", with_json=False)
        if len(tables.pvalues_by_seed[m]) > 1:
            for s, sdf in tables.pvalues_by_seed[m].items():
                save(sdf, f"pvalue_{m}_vs_{ref}_seed{s}", with_json=False)
    if tables.pooled:
        pooled = pd.DataFrame([p.to_dict() for p in tables.pooled.values()]).set_index("method")
        pooled.to_csv(out_dir / "pooled_offdiag.csv")
        (out_dir / "pooled_offdiag.json").write_text(
            json.dumps({m: tables.to_dict()["pooled"][m] for m in tables.pooled}, indent=2)
        )
        written += [out_dir / "pooled_offdiag.csv", out_dir / "pooled_offdiag.json"]
    (out_dir / "tables.json").write_text(json.dumps(tables.to_dict(), indent=2))
    written.append(out_dir / "tables.json")
    return written


def _pooled_rows(tables: SiteCVTables) -> pd.DataFrame:
    rows = {
        m: {
            "cases": p.n_cases,
            f"AUC {m}": p.auc,
            f"AUC {p.reference}": p.auc_reference,
            "pooled diff": p.auc_diff,
            "mean cell diff": p.mean_cell_diff,
            "z": p.z,
            "p": p.p_value,
        }
        for m, p in tables.pooled.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def console_report(tables: SiteCVTables) -> str:
    """The AUC matrices, p-value matrices and pooled comparisons as aligned plain text."""
    parts = []
    seeds = (
        f" (mean of {len(tables.seeds)} seeds: {', '.join(map(str, tables.seeds))})" if len(tables.seeds) > 1 else ""
    )
    parts.append(f"AUC, rows = training site, columns = test site{seeds}")
    for m, df in tables.auc.items():
        parts += ["", format_matrix(df, method_title(m))]
    for m, df in tables.pvalues.items():
        parts += ["", f"DeLong p-values, {m} vs {tables.reference} (paired, same cases)"]
        parts.append(format_matrix(df, m, p_value=True))
    if tables.pooled:
        parts += ["", "Pooled off-diagonal comparison (all cross-site cases concatenated; paired DeLong)"]
        for m, p in tables.pooled.items():
            parts.append(
                f"  {m}: AUC {_fmt(p.auc)} vs {p.reference} {_fmt(p.auc_reference)} over {p.n_cases} cases "
                f"(pooled diff {p.auc_diff:+.3f}, mean cell diff {p.mean_cell_diff:+.3f}), "
                f"z = {_fmt(p.z, 2)}, p = {_fmt(p.p_value, 4, True)}"
            )
    return "\n".join(parts)


def markdown_report(
    tables: SiteCVTables,
    header: Sequence[str],
    figures: Sequence[Path],
    cells: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
    base: Path | None = None,
) -> str:
    """``summary.md``: the run's context, the tables, the pooled comparison, figures and the cells.

    Args:
        tables: the tables.
        header: Markdown lines describing the invocation (put under the title).
        figures: figure paths, linked relative to ``base``.
        cells: one row per (method, site, seed) cell with its MLflow run and status.
        notes: remarks appended at the end.
        base: folder the summary lives in (for relative links).

    Returns:
        The Markdown text.
    """
    lines = ["# Site-wise cross-validation", "", *header, ""]
    seeds = f" Each cell is the mean over seeds {', '.join(map(str, tables.seeds))}." if len(tables.seeds) > 1 else ""
    lines += [
        "## AUC",
        "",
        "Rows: training site; columns: test site (diagonal, in bold: the training site's held-out subjects). "
        f"Mean and STD (sample, ddof = 1) along each row, as in table 2.3.{seeds}",
        "",
    ]
    for m, df in tables.auc.items():
        lines += [markdown_matrix(df, method_title(m)), ""]
    if tables.pvalues:
        lines += ["## DeLong tests against the baseline", ""]
        for m, df in tables.pvalues.items():
            lines += [f"p-values, {m} vs {tables.reference} (paired DeLong, same cases):", ""]
            lines += [markdown_matrix(df, m, p_value=True), ""]
            lines += [f"AUC difference, {m} - {tables.reference}:", ""]
            lines += [markdown_matrix(tables.auc_diff[m], m), ""]
    if tables.pooled:
        lines += [
            "## Pooled off-diagonal comparison",
            "",
            "All cross-site cases concatenated per method (a case counts once per model trained elsewhere); "
            "paired DeLong test; mean cell diff = mean over off-diagonal cells of the AUC difference.",
            "",
        ]
        pooled = _pooled_rows(tables)
        cols = list(pooled.columns)
        lines.append("| method | " + " | ".join(cols) + " |")
        lines.append("| --- | " + " | ".join("---:" for _ in cols) + " |")
        for m, row in pooled.iterrows():
            cells_txt = [
                str(int(row[c])) if c == "cases" else _fmt(row[c], 4 if c == "p" else 3, c == "p") for c in cols
            ]
            lines.append(f"| {m} | " + " | ".join(cells_txt) + " |")
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for f in figures:
            rel = f.relative_to(base) if base is not None and f.is_relative_to(base) else f
            lines.append(f"- [{f.name}]({rel})")
        lines.append("")
    if cells is not None and not cells.empty:
        lines += ["## Cells", "", "| " + " | ".join(cells.columns) + " |", "|" + " --- |" * len(cells.columns)]
        for _, row in cells.iterrows():
            lines.append("| " + " | ".join(str(v) for v in row.to_numpy()) + " |")
        lines.append("")
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)
