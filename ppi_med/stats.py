"""ROC AUC with DeLong's variance and confidence interval, and DeLong's paired test of two AUCs.

The variance estimator is DeLong, DeLong & Clarke-Pearson (1988) computed with the fast
O(n log n) algorithm of Sun & Xu (2014). Results are checked against R's pROC
(``ci.auc(method = "delong")``, ``var(roc, method = "delong")`` and
``roc.test(method = "delong", paired = TRUE)``); see ``tests/fixtures/delong``.

Conventions shared by every function here:

* Direction: a higher score always means "more likely positive" (pROC's ``direction = "<"``,
  controls < cases). Nothing is flipped automatically, so a classifier that ranks the classes the
  wrong way gets an AUC below 0.5 and is reported as such. pROC's default ``direction = "auto"``
  instead picks, per curve, the direction that puts the median of the cases above that of the
  controls; for a score whose AUC is at least 0.5 both agree.
* Ties: a positive and a negative with the same score count 1/2, as in pROC and scikit-learn.
* Labels: ``y_true`` holds 0/1 (bool, int or float); 1 is the positive class (pROC's "case").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import ndtr, ndtri

__all__ = ["AUCResult", "DeLongResult", "Interval", "auc_ci", "delong_test"]


@dataclass(frozen=True)
class Interval:
    """A (1 - alpha) confidence interval and the cases it was estimated on (shared by both results below).

    Attributes:
        ci_low: Lower bound of the interval.
        ci_high: Upper bound of the interval.
        alpha: Significance level the interval was built for.
        n_pos: Number of positive cases (label 1).
        n_neg: Number of negative cases (label 0).
    """

    ci_low: float
    ci_high: float
    alpha: float
    n_pos: int
    n_neg: int


@dataclass(frozen=True)
class AUCResult(Interval):
    """AUC of one score with its DeLong variance and confidence interval (of the AUC, clipped to [0, 1]).

    Attributes:
        auc: Area under the ROC curve (higher score = positive; may be below 0.5).
        variance: DeLong estimate of the variance of ``auc``.
    """

    auc: float
    variance: float

    @property
    def std_error(self) -> float:
        """Standard error of the AUC, ``sqrt(variance)``."""
        return math.sqrt(self.variance)


@dataclass(frozen=True)
class DeLongResult(Interval):
    """DeLong's paired test of two correlated AUCs measured on the same cases; its interval is that of
    ``auc_a - auc_b`` (not clipped, as pROC).

    Attributes:
        auc_a: AUC of ``score_a``.
        auc_b: AUC of ``score_b``.
        var_a: DeLong variance of ``auc_a``.
        var_b: DeLong variance of ``auc_b``.
        covariance: DeLong covariance of ``auc_a`` and ``auc_b``.
        var_diff: Variance of ``auc_a - auc_b`` (``var_a + var_b - 2 * covariance``).
        z: ``(auc_a - auc_b) / sqrt(var_diff)``; 0 when both the difference and ``var_diff`` are 0,
            +/- inf when only ``var_diff`` is 0 (as pROC).
        p_value: Two-sided p-value of ``z`` under the standard normal.
    """

    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    covariance: float
    var_diff: float
    z: float
    p_value: float

    @property
    def auc_diff(self) -> float:
        """``auc_a - auc_b``."""
        return self.auc_a - self.auc_b


def auc_ci(y_true: ArrayLike, score: ArrayLike, alpha: float = 0.05) -> AUCResult:
    """AUC with its DeLong variance and normal-approximation confidence interval.

    Matches pROC's ``ci.auc(roc(y, score, direction = "<"), method = "delong",
    conf.level = 1 - alpha)``: the interval is ``auc -/+ z_{1-alpha/2} * sqrt(variance)`` with each
    bound clipped to [0, 1]. A higher score means "more likely positive"; the direction is never
    flipped, so a score that ranks the classes the wrong way yields an AUC below 0.5.

    Args:
        y_true: 1-D labels, 0/1 as bool, int or float; 1 is the positive class.
        score: 1-D finite real scores, same length as ``y_true``.
        alpha: Significance level in (0, 1); the interval covers 1 - alpha.

    Returns:
        The AUC, its variance, the clipped interval and the class counts.

    Raises:
        ValueError: If the input is empty, not 1-D, the lengths differ, a label is not 0/1, a score
            is NaN or infinite, ``alpha`` is outside (0, 1), or either class has fewer than 2 cases
            (DeLong's variance divides by ``count - 1``).
    """
    _check_alpha(alpha)
    positive = _as_labels(y_true)
    scores = _as_scores(score, "score", positive.size)[np.newaxis]
    n_pos, n_neg = _class_counts(positive)
    v10, v01 = _split_placements(scores, positive, n_pos, n_neg)
    aucs, cov = _auc_cov(v10, v01)
    auc = float(aucs[0])
    variance = float(cov[0, 0])
    half_width = float(ndtri(1.0 - alpha / 2.0)) * math.sqrt(variance)
    return AUCResult(
        auc=auc,
        variance=variance,
        ci_low=max(0.0, auc - half_width),
        ci_high=min(1.0, auc + half_width),
        alpha=float(alpha),
        n_pos=n_pos,
        n_neg=n_neg,
    )


def delong_test(y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, alpha: float = 0.05) -> DeLongResult:
    """DeLong's two-sided test that two correlated AUCs on the same cases are equal.

    Matches pROC's ``roc.test(roc_a, roc_b, method = "delong", paired = TRUE)`` with both curves
    built with ``direction = "<"``: a higher score means "more likely positive" for both scores and
    no curve is flipped (an AUC below 0.5 stays below 0.5). Uses the O(n log n) algorithm of Sun &
    Xu (2014): one sort per score; a million cases take about half a second on 2 CPU cores.

    Degenerate variance: when the variance of the difference is exactly 0 (e.g. identical scores, or
    one a monotone transform of the other) and the AUCs are equal, ``z = 0`` and ``p_value = 1``;
    when the variance is 0 but the AUCs differ (e.g. a perfect score against a constant one),
    ``z = +/-inf`` and ``p_value = 0``. Both follow pROC.

    Args:
        y_true: 1-D labels, 0/1 as bool, int or float; 1 is the positive class.
        score_a: 1-D finite real scores of the first classifier, same length as ``y_true``.
        score_b: 1-D finite real scores of the second classifier, same cases in the same order.
        alpha: Significance level in (0, 1) of the confidence interval of ``auc_a - auc_b``.

    Returns:
        Both AUCs, their DeLong (co)variances, z, the two-sided p-value and the interval of the
        difference.

    Raises:
        ValueError: If the input is empty, not 1-D, the lengths differ, a label is not 0/1, a score
            is NaN or infinite, ``alpha`` is outside (0, 1), or either class has fewer than 2 cases.
    """
    _check_alpha(alpha)
    positive = _as_labels(y_true)
    scores = np.stack([_as_scores(score_a, "score_a", positive.size), _as_scores(score_b, "score_b", positive.size)])
    n_pos, n_neg = _class_counts(positive)
    v10, v01 = _split_placements(scores, positive, n_pos, n_neg)
    aucs, cov = _auc_cov(v10, v01)
    diff = float(aucs[0] - aucs[1])
    var_diff = _var_of_difference(v10, v01)
    sigma = math.sqrt(var_diff)
    if sigma > 0.0:
        z = diff / sigma
    elif diff == 0.0:
        z = 0.0
    else:
        z = math.copysign(math.inf, diff)
    p_value = float(2.0 * ndtr(-abs(z)))
    half_width = float(ndtri(1.0 - alpha / 2.0)) * sigma
    return DeLongResult(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        var_a=float(cov[0, 0]),
        var_b=float(cov[1, 1]),
        covariance=float(cov[0, 1]),
        var_diff=var_diff,
        z=z,
        p_value=min(1.0, p_value),
        ci_low=diff - half_width,
        ci_high=diff + half_width,
        alpha=float(alpha),
        n_pos=n_pos,
        n_neg=n_neg,
    )


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float | np.floating) and 0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}")


def _as_labels(y_true: ArrayLike) -> np.ndarray:
    """Validate 0/1 labels and return them as a boolean "is positive" mask."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty: AUC needs at least one positive and one negative case")
    if y.dtype == bool:
        positive = y
    elif y.dtype.kind in "iuf":
        bad = ~np.isin(y, (0, 1))  # NaN is not in {0, 1}, so it is caught here too
        if bad.any():
            shown = ", ".join(repr(v) for v in np.unique(y[bad])[:5].tolist())
            raise ValueError(
                f"y_true must hold only 0/1 (or bool) labels; found {int(bad.sum())} other value(s): {shown}"
            )
        positive = y == 1
    else:
        raise ValueError(f"y_true must hold 0/1 labels as bool, int or float; got dtype {y.dtype}")
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0 or n_pos == y.size:
        only = 1 if n_pos else 0
        raise ValueError(
            f"y_true holds a single class (all {y.size} labels are {only}); "
            "AUC needs both positive (1) and negative (0) cases"
        )
    return positive


def _as_scores(score: ArrayLike, name: str, n_cases: int) -> np.ndarray:
    """Validate one score vector against the labels' length and return it as float64."""
    s = np.asarray(score)
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {s.shape}")
    if s.size != n_cases:
        raise ValueError(f"{name} has {s.size} entries but y_true has {n_cases}; they must match case for case")
    if s.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    finite = np.isfinite(s)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"{name} contains {int((~finite).sum())} non-finite value(s) (NaN or inf), "
            f"first at index {first}: {float(s[first])!r}"
        )
    return s


def _placements(score: np.ndarray, positive: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """DeLong placement values (structural components) of every case, in the input order.

    For a positive case this is V10: the share of negatives scored below it, ties counting 1/2.
    For a negative case it is V01: the share of positives scored above it, ties counting 1/2.
    Sun & Xu write them with midranks: V10 = (pooled midrank - midrank among positives) / n_neg and
    V01 = 1 - (pooled midrank - midrank among negatives) / n_pos. The difference of two midranks is
    "cases of the other class strictly below + half of those tied", which is what is counted here
    from a single sort of the pooled scores, per group of tied scores.
    """
    order = np.argsort(score)
    sorted_score = score[order]
    sorted_pos = positive[order]
    n_cases = score.size

    group_start = np.empty(n_cases, dtype=bool)
    group_start[0] = True
    np.not_equal(sorted_score[1:], sorted_score[:-1], out=group_start[1:])
    starts = np.flatnonzero(group_start)
    group_of = np.cumsum(group_start) - 1
    bounds = np.append(starts, n_cases)

    # Positives among the first i sorted cases, read at each group's bounds.
    pos_upto = np.concatenate(([0], np.cumsum(sorted_pos)))[bounds]
    pos_below = pos_upto[:-1]
    pos_tied = np.diff(pos_upto)
    neg_below = starts - pos_below
    neg_tied = np.diff(bounds) - pos_tied

    v10 = (neg_below + 0.5 * neg_tied) / n_neg
    v01 = (n_pos - pos_below - 0.5 * pos_tied) / n_pos
    in_sorted_order = np.where(sorted_pos, v10[group_of], v01[group_of])
    out = np.empty(n_cases, dtype=np.float64)
    out[order] = in_sorted_order
    return out


def _split_placements(
    scores: np.ndarray, positive: np.ndarray, n_pos: int, n_neg: int
) -> tuple[np.ndarray, np.ndarray]:
    """V10 (k, n_pos) and V01 (k, n_neg) for each of the k score rows."""
    placements = np.stack([_placements(row, positive, n_pos, n_neg) for row in scores])
    return placements[:, positive], placements[:, ~positive]


def _class_counts(positive: np.ndarray) -> tuple[int, int]:
    n_pos = int(np.count_nonzero(positive))
    n_neg = positive.size - n_pos
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"DeLong's variance needs at least 2 positive and 2 negative cases; got {n_pos} positive "
            f"and {n_neg} negative"
        )
    return n_pos, n_neg


def _auc_cov(v10: np.ndarray, v01: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) and DeLong covariance matrix (k, k) from the placements of k scores.

    AUC = mean of V10; S = cov(V10) / n_pos + cov(V01) / n_neg, each covariance with the unbiased
    (count - 1) divisor.
    """
    aucs = v10.mean(axis=1)
    cov = np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]
    return aucs, cov


def _var_of_difference(v10: np.ndarray, v01: np.ndarray) -> float:
    """Variance of AUC_a - AUC_b, i.e. l S l' with l = [1, -1].

    Computed from the per-case differences of the placements rather than from S, so it is never
    negative through rounding and is exactly 0 when the two placement vectors coincide.
    """
    d10 = v10[0] - v10[1]
    d01 = v01[0] - v01[1]
    return float(np.var(d10, ddof=1) / d10.size + np.var(d01, ddof=1) / d01.size)
