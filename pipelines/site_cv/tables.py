"""Site-wise cross-validation tables from per-case predictions: AUC matrices, DeLong p-values, pooled test.

Everything here works on one long table of predictions with the columns of :data:`PREDICTION_COLUMNS`:
one row per (method, training site, seed, test site, case), ``score`` being the predicted probability of
class 1. A cell of a matrix is (training site = row, test site = column); the diagonal holds the training
site's held-out subjects, the other cells every case of the test site.

Conventions (those of table 2.3 of the method's text):

* ``Mean`` and ``STD`` are taken along each row over the test sites; ``STD`` is the sample standard
  deviation (``ddof = 1``), which reproduces the table's numbers.
* With several seeds, a cell's AUC is the mean of the per-seed AUCs, and ``Mean``/``STD`` are then taken
  over that seed-averaged row.
* A PPI method is compared with the reference (the baseline) by DeLong's paired test on the same cases.
  With one seed that is the test of the two models' scores. With several seeds, each case's score is
  averaged over the seeds in which the case was in the cell's test set (the same seeds for both methods,
  since a seed fixes the split), and the averaged scores are tested; the per-seed tests are kept as well.
* The pooled off-diagonal comparison concatenates, per method, the (seed-averaged) scores of every
  off-diagonal cell, and tests the two concatenations with DeLong's paired test; a case of site Y appears
  once per model trained elsewhere. It also reports the mean over off-diagonal cells of the AUC difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ppi_med.stats import DeLongResult, delong_test

__all__ = [
    "PREDICTION_COLUMNS",
    "STAT_COLUMNS",
    "PooledComparison",
    "SiteCVTables",
    "add_row_stats",
    "auc_block",
    "cell_auc",
    "check_predictions",
    "delong_matrix",
    "pooled_offdiag",
    "seed_averaged",
    "site_cv_tables",
]

PREDICTION_COLUMNS = ("method", "train_site", "seed", "test_site", "case", "subject", "label", "score")
STAT_COLUMNS = ("Mean", "STD")
_CELL_KEYS = ["train_site", "test_site", "case"]


def check_predictions(preds: pd.DataFrame) -> pd.DataFrame:
    """Validate a prediction table and return it with normalised dtypes.

    Args:
        preds: a table with the columns of :data:`PREDICTION_COLUMNS`.

    Returns:
        A copy with string sites, methods and cases, integer seeds and labels, float scores.

    Raises:
        ValueError: a column is missing, a label is not 0/1, a score is not finite, or a case appears twice
            in one (method, training site, seed, test site) cell.
    """
    missing = [c for c in PREDICTION_COLUMNS if c not in preds.columns]
    if missing:
        raise ValueError(f"predictions lack the column(s) {missing}; expected {list(PREDICTION_COLUMNS)}")
    out = preds.loc[:, list(PREDICTION_COLUMNS)].copy()
    for col in ("method", "train_site", "test_site", "case", "subject"):
        out[col] = out[col].astype(str)
    out["seed"] = out["seed"].astype(int)
    labels = out["label"].to_numpy()
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        row = out.loc[bad].iloc[0]
        raise ValueError(f"case {row['case']} has label {_plain(row['label'])!r}; expected 0 or 1")
    out["label"] = out["label"].astype(int)
    out["score"] = out["score"].astype(float)
    if not np.isfinite(out["score"].to_numpy()).all():
        row = out.loc[~np.isfinite(out["score"].to_numpy())].iloc[0]
        raise ValueError(
            f"case {row['case']} (method {row['method']}, trained on {row['train_site']}, seed {row['seed']}) "
            f"has a non-finite score {_plain(row['score'])!r}"
        )
    dup = out.duplicated(["method", "train_site", "seed", "test_site", "case"])
    if dup.any():
        row = out.loc[dup].iloc[0]
        raise ValueError(
            f"case {row['case']} appears twice in the cell (method {row['method']}, trained on "
            f"{row['train_site']}, seed {row['seed']}, tested on {row['test_site']})"
        )
    return out


def cell_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC of one cell, or NaN when the cell lacks a class (AUC is undefined there)."""
    labels = np.asarray(labels)
    if labels.size == 0 or np.unique(labels).size < 2:
        return math.nan
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))


def auc_block(preds: pd.DataFrame, train_sites: Sequence[str], test_sites: Sequence[str]) -> pd.DataFrame:
    """AUC of every (training site, test site) cell of one method and one seed (or seed-averaged scores).

    Args:
        preds: predictions of a single method and seed (columns ``train_site``, ``test_site``, ``label``,
            ``score``).
        train_sites: the rows, in order.
        test_sites: the columns, in order.

    Returns:
        ``len(train_sites) x len(test_sites)`` AUCs; NaN where a cell has no cases or a single class.
    """
    block = pd.DataFrame(np.nan, index=list(train_sites), columns=list(test_sites), dtype=float)
    for (train, test), group in preds.groupby(["train_site", "test_site"], sort=False):
        if train in block.index and test in block.columns:
            block.loc[train, test] = cell_auc(group["label"].to_numpy(), group["score"].to_numpy())
    block.index.name = "train_site"
    block.columns.name = "test_site"
    return block


def add_row_stats(block: pd.DataFrame) -> pd.DataFrame:
    """The block with ``Mean`` and ``STD`` (sample std, ddof = 1) of each row appended, ignoring NaN cells."""
    values = block.to_numpy(dtype=float)
    out = block.copy()
    with np.errstate(all="ignore"):
        finite = np.isfinite(values)
        counts = finite.sum(axis=1)
        sums = np.where(finite, values, 0.0).sum(axis=1)
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        sq = np.where(finite, (values - means[:, None]) ** 2, 0.0).sum(axis=1)
        stds = np.where(counts > 1, np.sqrt(sq / np.maximum(counts - 1, 1)), np.nan)
    out["Mean"] = means
    out["STD"] = stds
    return out


def seed_averaged(preds: pd.DataFrame) -> pd.DataFrame:
    """Each case's score averaged over the seeds in which it is in the cell's test set.

    Returns:
        One row per (method, training site, test site, case) with ``subject``, ``label``, ``score`` (the mean)
        and ``n_seeds``.
    """
    keys = ["method", *_CELL_KEYS]
    grouped = preds.groupby(keys, sort=False)
    out = grouped.agg(subject=("subject", "first"), label=("label", "first"), score=("score", "mean"))
    out["n_seeds"] = grouped["seed"].nunique()
    return out.reset_index()


def _paired(preds: pd.DataFrame, method: str, reference: str) -> pd.DataFrame:
    """Rows of ``method`` joined case by case with those of ``reference``; raises if the cases differ."""
    keys = [k for k in ("seed", *_CELL_KEYS) if k in preds.columns]
    a = preds.loc[preds["method"] == method, [*keys, "label", "score"]]
    b = preds.loc[preds["method"] == reference, [*keys, "label", "score"]]
    merged = a.merge(b, on=keys, how="outer", suffixes=("", "_ref"), indicator=True)
    unpaired = merged[merged["_merge"] != "both"]
    if not unpaired.empty:
        row = unpaired.iloc[0]
        side = method if row["_merge"] == "left_only" else reference
        raise ValueError(
            f"{method} and {reference} were not tested on the same cases: case {row['case']} (trained on "
            f"{row['train_site']}, tested on {row['test_site']}) only has a prediction from {side}; "
            f"{len(unpaired)} unpaired row(s) in all"
        )
    if (merged["label"] != merged["label_ref"]).any():
        row = merged[merged["label"] != merged["label_ref"]].iloc[0]
        raise ValueError(
            f"case {row['case']} has label {row['label']} for {method} but {row['label_ref']} for {reference}"
        )
    return merged.drop(columns=["_merge", "label_ref"])


def _delong_p(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(p, AUC difference) of DeLong's paired test, NaN where it is undefined (fewer than 2 per class)."""
    try:
        res = delong_test(labels, a, b)
    except ValueError:
        return math.nan, cell_auc(labels, a) - cell_auc(labels, b)
    return res.p_value, res.auc_diff


def delong_matrix(
    preds: pd.DataFrame, method: str, reference: str, train_sites: Sequence[str], test_sites: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """DeLong p-value and AUC difference (method - reference) of every cell.

    Args:
        preds: predictions of both methods, either of one seed or seed-averaged (:func:`seed_averaged`).
        method: the method tested.
        reference: the method it is compared with (the baseline).
        train_sites: the rows.
        test_sites: the columns.

    Returns:
        ``(p_values, auc_differences)``, both ``len(train_sites) x len(test_sites)``; NaN p where a cell has
        fewer than 2 cases of a class.

    Raises:
        ValueError: the two methods' cases differ in some cell (the test is paired).
    """
    merged = _paired(preds, method, reference)
    p = pd.DataFrame(np.nan, index=list(train_sites), columns=list(test_sites), dtype=float)
    diff = p.copy()
    for (train, test), group in merged.groupby(["train_site", "test_site"], sort=False):
        if train in p.index and test in p.columns:
            p.loc[train, test], diff.loc[train, test] = _delong_p(
                group["label"].to_numpy(), group["score"].to_numpy(), group["score_ref"].to_numpy()
            )
    for frame in (p, diff):
        frame.index.name, frame.columns.name = "train_site", "test_site"
    return p, diff


@dataclass(frozen=True)
class PooledComparison:
    """Paired DeLong comparison of a method with the reference on all off-diagonal cases together.

    Attributes:
        method: the method tested.
        reference: the method compared against.
        n_pos: positives among the concatenated off-diagonal cases (a case counts once per model that
            predicted it).
        n_neg: negatives among them.
        auc: AUC of the method's concatenated scores.
        auc_reference: AUC of the reference's concatenated scores.
        test: DeLong's paired test of ``auc`` against ``auc_reference`` (``None`` where it is undefined, e.g.
            one class only).
        mean_cell_diff: mean over off-diagonal cells of the (seed-averaged) cell AUC difference.
    """

    method: str
    reference: str
    n_pos: int
    n_neg: int
    auc: float
    auc_reference: float
    test: DeLongResult | None
    mean_cell_diff: float

    @property
    def n_cases(self) -> int:
        return self.n_pos + self.n_neg

    @property
    def z(self) -> float:
        return self.test.z if self.test is not None else math.nan

    @property
    def p_value(self) -> float:
        return self.test.p_value if self.test is not None else math.nan

    @property
    def auc_diff(self) -> float:
        """Pooled ``auc - auc_reference``."""
        return self.auc - self.auc_reference

    def to_dict(self) -> dict[str, Any]:
        """Plain values: the counts, both AUCs and their difference, DeLong's z and p, the mean cell difference."""
        keys = ("method", "reference", "n_cases", "n_pos", "n_neg", "auc", "auc_reference", "auc_diff", "z")
        return {**{k: getattr(self, k) for k in keys}, "p_value": self.p_value, "mean_cell_diff": self.mean_cell_diff}


def pooled_offdiag(
    preds: pd.DataFrame,
    method: str,
    reference: str,
    train_sites: Sequence[str],
    test_sites: Sequence[str],
    cell_diff: pd.DataFrame | None = None,
) -> PooledComparison:
    """Pooled off-diagonal comparison of ``method`` with ``reference`` (see the module notes).

    Args:
        preds: predictions of both methods, of one seed or seed-averaged.
        method: the method tested.
        reference: the baseline.
        train_sites: rows taken into account.
        test_sites: columns taken into account.
        cell_diff: per-cell AUC differences to average (e.g. the difference of the seed-mean AUC matrices);
            computed from ``preds`` when ``None``.

    Raises:
        ValueError: no off-diagonal case, or the two methods' cases differ.
    """
    sub = preds[
        preds["train_site"].isin(list(train_sites))
        & preds["test_site"].isin(list(test_sites))
        & (preds["train_site"] != preds["test_site"])
    ]
    merged = _paired(sub, method, reference)
    if merged.empty:
        raise ValueError("no off-diagonal predictions to pool: give at least two sites")
    labels = merged["label"].to_numpy()
    a, b = merged["score"].to_numpy(), merged["score_ref"].to_numpy()
    try:
        test = delong_test(labels, a, b)
    except ValueError:
        test = None
    if cell_diff is None:
        _, cell_diff = delong_matrix(sub, method, reference, train_sites, test_sites)
    same = np.array([[r == c for c in cell_diff.columns] for r in cell_diff.index], dtype=bool)
    diffs = cell_diff.to_numpy(dtype=float)[~same]
    diffs = diffs[np.isfinite(diffs)]
    return PooledComparison(
        method=method,
        reference=reference,
        n_pos=int(labels.sum()),
        n_neg=int(labels.size - labels.sum()),
        auc=cell_auc(labels, a),
        auc_reference=cell_auc(labels, b),
        test=test,
        mean_cell_diff=float(diffs.mean()) if diffs.size else math.nan,
    )


@dataclass
class SiteCVTables:
    """Every table of a site-wise cross-validation.

    Attributes:
        methods: the methods, in order.
        reference: the baseline the PPI methods are tested against (``None`` when it was not run).
        train_sites: the rows.
        test_sites: the columns (before ``Mean`` and ``STD``).
        seeds: the seeds.
        auc: per method, the seed-mean AUC matrix with ``Mean`` and ``STD`` columns.
        auc_by_seed: per method and seed, the AUC matrix with ``Mean`` and ``STD``.
        pvalues: per tested method, DeLong p-values vs the reference (seed-averaged scores).
        auc_diff: per tested method, seed-mean AUC minus the reference's, per cell.
        pvalues_by_seed: per tested method and seed, DeLong p-values of that seed's models.
        pooled: per tested method, the pooled off-diagonal comparison.
    """

    methods: list[str]
    reference: str | None
    train_sites: list[str]
    test_sites: list[str]
    seeds: list[int]
    auc: dict[str, pd.DataFrame] = field(default_factory=dict)
    auc_by_seed: dict[str, dict[int, pd.DataFrame]] = field(default_factory=dict)
    pvalues: dict[str, pd.DataFrame] = field(default_factory=dict)
    auc_diff: dict[str, pd.DataFrame] = field(default_factory=dict)
    pvalues_by_seed: dict[str, dict[int, pd.DataFrame]] = field(default_factory=dict)
    pooled: dict[str, PooledComparison] = field(default_factory=dict)

    @property
    def tested(self) -> list[str]:
        """The methods compared with the reference."""
        return list(self.pvalues)

    def summary_metrics(self) -> dict[str, float]:
        """Headline numbers: mean, diagonal and off-diagonal AUC per method, pooled p and difference."""
        out: dict[str, float] = {}
        for m, mat in self.auc.items():
            block = mat[self.test_sites].to_numpy(dtype=float)
            same = np.array([[r == c for c in self.test_sites] for r in self.train_sites], dtype=bool)
            out[f"mean_auc_{m}"] = _nanmean(block)
            out[f"diag_auc_{m}"] = _nanmean(block[same])
            out[f"offdiag_auc_{m}"] = _nanmean(block[~same])
        for m, pooled in self.pooled.items():
            out[f"pooled_auc_{m}"] = pooled.auc
            out[f"pooled_p_{m}"] = pooled.p_value
            out[f"pooled_diff_{m}"] = pooled.auc_diff
            out[f"offdiag_mean_diff_{m}"] = pooled.mean_cell_diff
            out[f"n_sig_cells_{m}"] = float(np.nansum(self.pvalues[m].to_numpy(dtype=float) < 0.05))
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dictionaries (NaN as ``None``)."""

        def frame(df: pd.DataFrame) -> dict[str, dict[str, float | None]]:
            return {str(r): {str(c): _json_float(df.loc[r, c]) for c in df.columns} for r in df.index}

        return {
            "methods": self.methods,
            "reference": self.reference,
            "train_sites": self.train_sites,
            "test_sites": self.test_sites,
            "seeds": self.seeds,
            "auc": {m: frame(df) for m, df in self.auc.items()},
            "auc_by_seed": {m: {str(s): frame(df) for s, df in d.items()} for m, d in self.auc_by_seed.items()},
            "pvalues": {m: frame(df) for m, df in self.pvalues.items()},
            "auc_diff": {m: frame(df) for m, df in self.auc_diff.items()},
            "pvalues_by_seed": {m: {str(s): frame(df) for s, df in d.items()} for m, d in self.pvalues_by_seed.items()},
            "pooled": {m: {k: _json_float(v) for k, v in p.to_dict().items()} for m, p in self.pooled.items()},
            "summary_metrics": {k: _json_float(v) for k, v in self.summary_metrics().items()},
        }


def site_cv_tables(
    preds: pd.DataFrame,
    methods: Sequence[str],
    train_sites: Sequence[str],
    test_sites: Sequence[str] | None = None,
    reference: str = "baseline",
) -> SiteCVTables:
    """All tables of a site-wise CV from its predictions.

    Args:
        preds: predictions (:data:`PREDICTION_COLUMNS`) of every method, training site and seed.
        methods: methods to tabulate, in order; those other than ``reference`` are tested against it when
            it is among them.
        train_sites: the rows.
        test_sites: the columns (``train_sites`` when ``None``).
        reference: the baseline.

    Returns:
        The tables.

    Raises:
        ValueError: bad predictions (see :func:`check_predictions`), a method without predictions, or a
            method and the reference tested on different cases.
    """
    preds = check_predictions(preds)
    train_sites, methods = [str(s) for s in train_sites], [str(m) for m in methods]
    test_sites = train_sites if test_sites is None else [str(s) for s in test_sites]
    preds = preds[preds["train_site"].isin(train_sites) & preds["test_site"].isin(test_sites)]
    absent = [m for m in methods if not (preds["method"] == m).any()]
    if absent:
        raise ValueError(f"no predictions for method(s) {absent} on sites {train_sites}")
    seeds = sorted(int(s) for s in preds.loc[preds["method"].isin(methods), "seed"].unique())
    tables = SiteCVTables(
        methods=methods,
        reference=reference if reference in methods else None,
        train_sites=train_sites,
        test_sites=test_sites,
        seeds=seeds,
    )
    for m in methods:
        rows = preds[preds["method"] == m]
        blocks = {int(s): auc_block(g, train_sites, test_sites) for s, g in rows.groupby("seed")}
        tables.auc_by_seed[m] = {s: add_row_stats(b) for s, b in sorted(blocks.items())}
        mean_block = sum(blocks.values()) / len(blocks)
        tables.auc[m] = add_row_stats(mean_block)
    if tables.reference is None:
        return tables
    averaged = seed_averaged(preds[preds["method"].isin(methods)])
    for m in methods:
        if m == reference:
            continue
        p, _ = delong_matrix(averaged, m, reference, train_sites, test_sites)
        tables.pvalues[m] = p
        tables.auc_diff[m] = tables.auc[m][test_sites] - tables.auc[reference][test_sites]
        tables.pvalues_by_seed[m] = {
            s: delong_matrix(preds[preds["seed"] == s], m, reference, train_sites, test_sites)[0] for s in seeds
        }
        if len(train_sites) > 1 or set(test_sites) - set(train_sites):
            tables.pooled[m] = pooled_offdiag(
                averaged, m, reference, train_sites, test_sites, cell_diff=tables.auc_diff[m]
            )
    return tables


def _plain(value: Any) -> Any:
    """A NumPy scalar as the Python value, so messages read ``2`` rather than ``np.int64(2)``."""
    return value.item() if isinstance(value, np.generic) else value


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _json_float(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value
