"""Site-CV figures: AUC heatmaps laid out as table 2.3, the DeLong p-value heatmap, and ROC curves per cell.

The heatmaps are laid out as table 2.3 of the method's text: rows are training sites, columns test sites,
then the row ``Mean`` and ``STD``; every method's heatmap uses the same colour scale so that they can be
compared by eye. Figures are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from .tables import STAT_COLUMNS, SiteCVTables  # noqa: E402
from .text import file_stem, format_value, method_title  # noqa: E402

__all__ = ["plot_auc_heatmaps", "plot_pvalue_heatmap", "plot_roc_grids"]


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
                    format_value(v),
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
        path = out_dir / f"heatmap_auc_{file_stem(method)}.png"
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
                text = f"p={format_value(p[i, j], 3, True)}\nΔ{sign}{format_value(d[i, j])}"
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
                title = f"{train}→{test}  AUC {format_value(tables.auc[method].loc[train, test])}"
                for name, style in ((ref, dict(color="#888888", ls="--", lw=1.0)), (method, dict(color="C0", lw=1.4))):
                    group = cells.get((name, train, test)) if name else None
                    if group is None:
                        continue
                    for _, g in group.groupby("seed"):
                        if g["label"].nunique() == 2:
                            fpr, tpr, _ = roc_curve(g["label"], g["score"])
                            ax.plot(fpr, tpr, alpha=0.85, **style)
                if ref is not None:
                    title += f"\n{ref} {format_value(tables.auc[ref].loc[train, test])}"
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
        path = out_dir / f"roc_{file_stem(method)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
