"""Tests of ppi_med.stats against R's pROC fixtures, published figures, brute force and sklearn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from ppi_med.stats import AUCResult, DeLongResult, auc_ci, delong_test

FIXTURES = Path(__file__).parent / "fixtures" / "delong" / "proc_fixtures.json"
CASES = json.loads(FIXTURES.read_text())["cases"]
CASE_IDS = [case["name"] for case in CASES]

ABS = 1e-6  # AUC, variance, covariance and interval bounds
REL = 1e-4  # z and p-value


def _inputs(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = case["inputs"]
    return np.asarray(data["y"]), np.asarray(data["score_a"]), np.asarray(data["score_b"])


def test_fixture_set_covers_the_planned_cases() -> None:
    assert set(CASE_IDS) == {
        "continuous",
        "ties_5_level",
        "binary_vs_continuous",
        "tiny_3_vs_4",
        "unbalanced_5_vs_500",
        "large_2000",
        "auc_below_half",
        "identical_scores",
        "aSAH_wfns_vs_s100b",
        "aSAH_wfns_vs_ndka",
    }
    for case in CASES:
        y, a, b = _inputs(case)
        assert y.shape == a.shape == b.shape
        assert case["proc"]["n_pos"] == int(y.sum())
        assert case["proc"]["n_neg"] == int((y == 0).sum())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_auc_ci_matches_proc(case: dict) -> None:
    y, a, b = _inputs(case)
    ref = case["proc"]
    for score, tag in ((a, "a"), (b, "b")):
        res = auc_ci(y, score)
        assert isinstance(res, AUCResult)
        assert res.auc == pytest.approx(ref[f"auc_{tag}"], abs=ABS)
        assert res.variance == pytest.approx(ref[f"var_{tag}"], abs=ABS)
        assert res.variance == pytest.approx(ref[f"var_{tag}"], rel=1e-9)
        assert res.ci_low == pytest.approx(ref[f"ci_{tag}_low"], abs=ABS)
        assert res.ci_high == pytest.approx(ref[f"ci_{tag}_high"], abs=ABS)
        assert (res.n_pos, res.n_neg, res.alpha) == (ref["n_pos"], ref["n_neg"], 0.05)
    res90 = auc_ci(y, a, alpha=0.10)
    assert res90.ci_low == pytest.approx(ref["ci90_a_low"], abs=ABS)
    assert res90.ci_high == pytest.approx(ref["ci90_a_high"], abs=ABS)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_delong_test_matches_proc(case: dict) -> None:
    y, a, b = _inputs(case)
    ref = case["proc"]
    res = delong_test(y, a, b)
    assert isinstance(res, DeLongResult)
    assert res.auc_a == pytest.approx(ref["auc_a"], abs=ABS)
    assert res.auc_b == pytest.approx(ref["auc_b"], abs=ABS)
    assert res.var_a == pytest.approx(ref["var_a"], abs=ABS)
    assert res.var_b == pytest.approx(ref["var_b"], abs=ABS)
    assert res.covariance == pytest.approx(ref["cov_ab"], abs=ABS)
    assert res.covariance == pytest.approx(ref["cov_ab"], rel=1e-9)
    assert res.z == pytest.approx(ref["z"], rel=REL, abs=1e-12)
    assert res.p_value == pytest.approx(ref["p_value"], rel=REL)
    assert res.ci_low == pytest.approx(ref["diff_ci_low"], abs=ABS)
    assert res.ci_high == pytest.approx(ref["diff_ci_high"], abs=ABS)
    assert res.var_diff == pytest.approx(res.var_a + res.var_b - 2 * res.covariance, abs=1e-15)


def test_proc_used_direction_lt_everywhere_including_auto_asah() -> None:
    for case in CASES:
        assert case["proc"]["direction_a"] == "<", case["name"]
        assert case["proc"]["direction_b"] == "<", case["name"]
    assert {c["direction_requested"] for c in CASES if c["name"].startswith("aSAH")} == {"auto"}


@pytest.mark.parametrize(
    ("name", "z", "p"),
    [
        ("aSAH_wfns_vs_s100b", 2.20898359144091, 0.0271757822291882),
        ("aSAH_wfns_vs_ndka", 2.79777591868904, 0.00514557970691098),
    ],
)
def test_published_asah_figures(name: str, z: float, p: float) -> None:
    (case,) = [c for c in CASES if c["name"] == name]
    res = delong_test(*_inputs(case))
    assert res.z == pytest.approx(z, rel=1e-12)
    assert res.p_value == pytest.approx(p, rel=1e-12)


def test_auc_below_half_is_not_flipped() -> None:
    (case,) = [c for c in CASES if c["name"] == "auc_below_half"]
    y, a, _ = _inputs(case)
    low = auc_ci(y, a)
    high = auc_ci(y, -a)
    assert low.auc < 0.5
    assert low.auc == pytest.approx(1.0 - high.auc, abs=1e-12)
    assert low.variance == pytest.approx(high.variance, rel=1e-12)


def test_ci_is_clipped_to_one_like_proc() -> None:
    (case,) = [c for c in CASES if c["name"] == "unbalanced_5_vs_500"]
    y, a, _ = _inputs(case)
    res = auc_ci(y, a)
    assert res.auc + 1.959963984540054 * res.std_error > 1.0
    assert res.ci_high == 1.0
    assert case["proc"]["ci_a_high"] == 1.0


# --- independent references -------------------------------------------------------------------


def _brute_force_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """O(m n) DeLong from the kernel psi(x, y) = 1 if x > y, 1/2 if equal: AUCs and covariance."""
    pos, neg = y == 1, y == 0
    v10, v01 = [], []
    for s in scores:
        diff = s[pos][:, None] - s[neg][None, :]
        psi = (diff > 0) + 0.5 * (diff == 0)
        v10.append(psi.mean(axis=1))
        v01.append(psi.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    return v10.mean(axis=1), np.cov(v10) / pos.sum() + np.cov(v01) / neg.sum()


def _midrank_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Sun & Xu's formulation with the three midrank vectors, written independently."""
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    aucs, v10, v01 = [], [], []
    for s in scores:
        tz = rankdata(s)
        tx, ty = rankdata(s[pos]), rankdata(s[neg])
        aucs.append((tz[pos].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[pos] - tx) / n)
        v01.append(1 - (tz[neg] - ty) / m)
    return np.array(aucs), np.cov(np.array(v10)) / m + np.cov(np.array(v01)) / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_and_midrank_formulas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 90
    y = (rng.random(n) < 0.35).astype(int)
    a = np.round(y + rng.standard_normal(n), 1)  # coarse rounding: many ties, within and across classes
    b = rng.integers(0, 4, n) + 0.5 * y
    res = delong_test(y, a, b)
    for reference in (_brute_force_delong, _midrank_delong):
        aucs, cov = reference(y, [a, b])
        np.testing.assert_allclose([res.auc_a, res.auc_b], aucs, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            [[res.var_a, res.covariance], [res.covariance, res.var_b]], cov, rtol=1e-10, atol=1e-15
        )


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_auc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[:2], y[2:4] = True, False  # both classes present with at least 2 cases
    score = rng.integers(0, 7, n) + 0.8 * y * rng.random(n)
    assert auc_ci(y, score).auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert delong_test(y, -score, score).auc_a == pytest.approx(roc_auc_score(y, -score), abs=1e-12)


def test_swapping_scores_negates_z_and_keeps_p() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(300) < 0.4
    a = y + rng.standard_normal(300)
    b = 0.5 * y + rng.standard_normal(300)
    ab, ba = delong_test(y, a, b), delong_test(y, b, a)
    assert ab.z != 0.0
    assert ba.z == pytest.approx(-ab.z, rel=1e-12)
    assert ba.p_value == pytest.approx(ab.p_value, rel=1e-12)
    assert (ba.ci_low, ba.ci_high) == pytest.approx((-ab.ci_high, -ab.ci_low), abs=1e-12)
    assert ab.auc_diff == pytest.approx(ab.auc_a - ab.auc_b)


def test_label_dtypes_and_containers_agree() -> None:
    y = [0, 1, 1, 0, 1, 0, 0, 1, 0, 1]
    a = [0.1, 0.8, 0.4, 0.4, 0.9, 0.2, 0.5, 0.3, 0.35, 0.7]
    b = [1, 3, 2, 2, 3, 1, 1, 2, 2, 1]
    ref = delong_test(np.array(y), np.array(a), np.array(b))
    for labels in (y, np.array(y, dtype=bool), np.array(y, dtype=float), np.array(y, dtype=np.uint8)):
        assert delong_test(labels, a, b) == ref
        assert auc_ci(labels, a) == auc_ci(y, a)
    assert delong_test(y, np.array(a, dtype=np.float32).astype(float), np.array(b, dtype=bool)).n_pos == 5


# --- degenerate variance ---------------------------------------------------------------------


def test_identical_scores_give_z_zero_p_one() -> None:
    rng = np.random.default_rng(11)
    y = rng.random(50) < 0.5
    a = y + rng.standard_normal(50)
    for b in (a.copy(), 3.0 * a + 1.0):  # a copy, and a strictly increasing transform (same ranks)
        res = delong_test(y, a, b)
        assert res.var_diff == 0.0
        assert (res.z, res.p_value) == (0.0, 1.0)
        assert (res.ci_low, res.ci_high) == (0.0, 0.0)
        assert res.auc_a == res.auc_b


def test_zero_variance_with_different_aucs_gives_infinite_z_like_proc() -> None:
    # pROC 1.18 on the same data: Z = Inf, p = 0, conf.int = (0.5, 0.5).
    y = [0, 0, 0, 1, 1, 1]
    perfect = [1, 2, 3, 4, 5, 6]
    constant = [1, 1, 1, 1, 1, 1]
    res = delong_test(y, perfect, constant)
    assert (res.auc_a, res.auc_b, res.var_diff) == (1.0, 0.5, 0.0)
    assert res.z == math.inf and res.p_value == 0.0
    assert (res.ci_low, res.ci_high) == (0.5, 0.5)
    assert delong_test(y, constant, perfect).z == -math.inf
    perfect_ci = auc_ci(y, perfect)
    assert (perfect_ci.auc, perfect_ci.variance, perfect_ci.ci_low, perfect_ci.ci_high) == (
        1.0,
        0.0,
        1.0,
        1.0,
    )


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("y", "score", "message"),
    [
        ([], [], "y_true is empty"),
        ([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], r"single class \(all 4 labels are 1\)"),
        ([0, 0, 0], [0.1, 0.2, 0.3], r"single class \(all 3 labels are 0\)"),
        ([True, False, True, False], [0.1, 0.2, 0.3], "score has 3 entries but y_true has 4"),
        ([0, 1, 0, 1, 2], [0.1, 0.2, 0.3, 0.4, 0.5], r"only 0/1 .* 1 other value\(s\): 2"),
        ([0, 1, 0, 1, -1], [0.1, 0.2, 0.3, 0.4, 0.5], r"other value\(s\): -1"),
        ([0.0, 1.0, 0.5, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5], r"other value\(s\): 0.5"),
        ([0.0, 1.0, np.nan, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5], r"other value\(s\): nan"),
        (["a", "b", "a", "b"], [0.1, 0.2, 0.3, 0.4], "0/1 labels as bool, int or float; got dtype <U1"),
        ([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.4], r"score contains 1 non-finite .* first at index 1: nan"),
        ([0, 1, 0, 1], [0.1, 0.2, np.inf, -np.inf], r"score contains 2 non-finite .* first at index 2: inf"),
        ([0, 1, 0, 1], ["x", "y", "z", "w"], "score must hold real numbers"),
        ([[0, 1], [0, 1]], [0.1, 0.2, 0.3, 0.4], r"y_true must be 1-D, got shape \(2, 2\)"),
        (
            [0, 1, 0, 0, 0],
            [0.1, 0.2, 0.3, 0.4, 0.5],
            "at least 2 positive and 2 negative cases; got 1 positive",
        ),
    ],
)
def test_auc_ci_rejects_bad_input(y: list, score: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        auc_ci(y, score)


def test_delong_test_rejects_bad_input() -> None:
    y = [0, 1, 0, 1, 0, 1]
    good = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
    with pytest.raises(ValueError, match="score_b has 5 entries but y_true has 6"):
        delong_test(y, good, good[:5])
    with pytest.raises(ValueError, match="score_a has 7 entries but y_true has 6"):
        delong_test(y, good + [0.5], good)
    with pytest.raises(ValueError, match=r"score_b contains 1 non-finite .* index 3"):
        delong_test(y, good, [0.1, 0.9, 0.2, np.nan, 0.3, 0.7])
    with pytest.raises(ValueError, match="single class"):
        delong_test([1] * 6, good, good)
    with pytest.raises(ValueError, match="y_true is empty"):
        delong_test([], [], [])
    with pytest.raises(ValueError, match=r"only 0/1 .* other value\(s\): 3, 7"):
        delong_test([0, 1, 3, 1, 7, 1], good, good)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, math.nan, "0.05", None])
def test_alpha_must_be_in_open_unit_interval(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1"):
        auc_ci([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], alpha=alpha)
