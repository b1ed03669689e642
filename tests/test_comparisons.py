"""``pipelines.comparisons``: the figures of its tables are those computed directly from the studies' outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_rel
from sklearn.metrics import roc_auc_score

from pipelines.comparisons import (
    best_line,
    ga_comparison,
    ga_selections,
    main,
    shortcut_comparison,
    site_comparison,
)
from ppi_med.stats import delong_test


def _shortcut_results(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for method, shift in (("baseline", 0.0), ("ppi_wbp", 0.05), ("dfr", 0.4)):
        for seed in range(4):
            for test in ("aligned", "reversed", "free"):
                auc = 0.1 + shift + rng.uniform(0, 0.05) if test == "reversed" else 0.8 + rng.uniform(0, 0.1)
                rows.append({"method": method, "seed": seed, "test": test, "auc": auc, "acc": 0.5})
    return pd.DataFrame(rows)


def test_shortcut_table_is_mean_sd_and_paired_t_across_seeds():
    results = _shortcut_results(np.random.default_rng(0))
    table = shortcut_comparison(results).set_index("method")
    rev = results[results.test == "reversed"].pivot(index="seed", columns="method", values="auc")
    assert table.loc["dfr", "reversed_mean"] == pytest.approx(rev["dfr"].mean())
    assert table.loc["dfr", "reversed_sd"] == pytest.approx(rev["dfr"].std(ddof=1))
    assert table.loc["dfr", "reversed_p_ppi_wbp"] == pytest.approx(ttest_rel(rev["dfr"], rev["ppi_wbp"]).pvalue)
    assert table.loc["dfr", "reversed_delta_baseline"] == pytest.approx((rev["dfr"] - rev["baseline"]).mean())
    line = best_line(table.reset_index(), "reversed", "ppi_wbp", "reversed-cue AUC")
    assert line.startswith("Best reversed-cue AUC: `dfr`") and "`ppi_wbp` loses to `dfr`" in line


def _site_predictions(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for method, signal in (("baseline", 0.2), ("ppi_wbp", 1.0), ("jtt", 0.6)):
        for seed in range(3):
            for site in ("A", "D"):
                for k in range(30):
                    y = k % 2
                    role = "heldout" if site == "D" else "site"
                    score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1))))
                    rows.append({"method": method, "train_site": "D", "seed": seed, "test_site": site,
                                 "case": f"{site}{k}", "subject": f"{site}{k}", "label": y, "score": score,
                                 "role": role})  # fmt: skip
    return pd.DataFrame(rows)


def test_site_table_pools_out_of_site_records_and_tests_on_seed_averaged_scores():
    preds = _site_predictions(np.random.default_rng(1))
    table = site_comparison(preds).set_index("method")
    out = preds[preds.role == "site"]
    per_seed = [roc_auc_score(g.label, g.score) for _, g in out[out.method == "jtt"].groupby("seed")]
    assert table.loc["jtt", "out_mean"] == pytest.approx(np.mean(per_seed))
    avg = out.groupby(["method", "case"]).agg(label=("label", "first"), score=("score", "mean"))
    res = delong_test(avg.loc["jtt"].label, avg.loc["jtt"].score, avg.loc["baseline"].score)
    assert table.loc["jtt", "out_p_baseline"] == pytest.approx(res.p_value)
    assert table.loc["jtt", "out_diff_baseline"] == pytest.approx(res.auc_a - res.auc_b)
    assert "site_A" in table.columns and "site_D" not in table.columns


def test_with_several_training_sites_a_record_counts_once_per_model_trained_elsewhere():
    """The site matrices' table: with one seed its out-of-site test is the matrices' pooled off-diagonal test."""
    from pipelines.site_cv.tables import site_cv_tables

    rng = np.random.default_rng(2)
    rows = []
    for method, signal in (("baseline", 0.3), ("ppi_wbp", 0.8)):
        for train in ("A", "B"):
            for site in ("A", "B", "C"):
                for k in range(24):
                    y = k % 2
                    score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1))))
                    rows.append({"method": method, "train_site": train, "seed": 0, "test_site": site,
                                 "case": f"{site}{k}", "subject": f"{site}{k}", "label": y, "score": score,
                                 "role": "heldout" if site == train else "site"})  # fmt: skip
    preds = pd.DataFrame(rows)
    table = site_comparison(preds).set_index("method")
    pooled = site_cv_tables(preds, ["baseline", "ppi_wbp"], ["A", "B"], ["A", "B", "C"]).pooled["ppi_wbp"]
    assert table.loc["ppi_wbp", "out_p_baseline"] == pytest.approx(pooled.p_value)
    assert table.loc["ppi_wbp", "out_diff_baseline"] == pytest.approx(pooled.auc_diff)


def test_ga_table_reads_the_held_out_predictions_of_each_seed(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.arange(20) % 2
    for method, rule in (("baseline", ""), ("dfr", ""), ("baseline", "-worst_site"), ("dfr", "-worst_site")):
        for seed in range(2):
            folder = tmp_path / "jobs" / f"ga-{method}-s{seed}{rule}" / "runs" / "r"
            folder.mkdir(parents=True)
            # under worst_site DFR separates nothing: the rules' tables must not mix
            signal = 0.6 if method == "dfr" and not rule else 0.2
            prob = np.clip(labels * signal + rng.uniform(0, 0.6, 20), 0, 1)
            pd.DataFrame({"image": [f"e{i}" for i in range(20)], "label": labels, "prob": prob}).to_csv(
                folder / "test_predictions.csv", index=False
            )
    assert ga_selections(tmp_path / "jobs") == ["train", "worst_site"]
    for rule, pattern in (("train", "ga-dfr-s?"), ("worst_site", "ga-dfr-s?-worst_site")):
        table = ga_comparison(tmp_path / "jobs", selection=rule).set_index("method")
        aucs = [
            roc_auc_score(labels, pd.read_csv(p).prob) for p in sorted((tmp_path / "jobs").glob(pattern + "/*/*/*"))
        ]
        assert len(aucs) == 2 and table.loc["dfr", "seeds"] == 2
        assert table.loc["dfr", "out_mean"] == pytest.approx(np.mean(aucs))
        assert 0 < table.loc["dfr", "out_p_baseline"] <= 1
    assert main(["--ga", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## GA, pooled training" in text and text.count("| `dfr` |") == 2
    assert "#### Selection `worst_site`" in text and "(selection `train`, `worst_site`)" in text
    assert (tmp_path / "report" / "ga_pooled_worst_site.csv").is_file()
    assert (tmp_path / "report" / "ga_pooled_test_auc.png").is_file()


def test_a_folder_without_results_is_named(tmp_path, capsys):
    assert main(["--sites", f"train={tmp_path}", "--out", str(tmp_path / "r")]) == 2
    assert "no predictions.csv" in capsys.readouterr().err


def test_verdict_needs_a_significant_test_in_its_direction():
    table = pd.DataFrame(
        [
            {"method": "baseline", "out_mean": 0.50},
            {"method": "ppi_wbp", "out_mean": 0.58},
            # higher seed mean than PPI but, on the records the test compares, lower and not significant
            {"method": "dfr", "out_mean": 0.60, "out_diff_ppi_wbp": -0.01, "out_p_ppi_wbp": 0.4},
            {"method": "jtt", "out_mean": 0.51, "out_diff_ppi_wbp": -0.07, "out_p_ppi_wbp": 0.01},
            {"method": "groupdro", "out_mean": 0.65, "out_diff_ppi_wbp": 0.08, "out_p_ppi_wbp": 0.02},
        ]
    )
    line = best_line(table, "out", "ppi_wbp", "pooled out-of-site AUC")
    assert "does not differ significantly from `dfr`" in line
    assert "beats `jtt`" in line and "loses to `groupdro`" in line
