"""Site-wise cross-validation: the tables on hand-made predictions, and the pipeline end to end on a tiny set."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import matplotlib.image as mpimg
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from data_prep.synth_oct import render_with_cue
from pipelines.cue_effect import main as cue_main
from pipelines.site_cv import (
    SiteCVConfig,
    SiteCVError,
    main,
    method_labels,
    method_overrides,
    parse_overrides,
    split_methods,
    study_overrides,
)
from pipelines.site_cv.tables import add_row_stats, delong_matrix, pooled_offdiag, site_cv_tables
from ppi_med.data import ga_split, load_datalist
from ppi_med.ppi import PPIConfig
from ppi_med.stats import delong_test

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "ga_ppi.json"

# table 2.3 of the method's text, "With PPI": cells and the printed row Mean / STD
TABLE_23 = {
    "A": ([1.000, 0.906, 0.877, 0.865], 0.912, 0.061),
    "B": ([0.851, 0.975, 0.863, 0.910], 0.900, 0.056),
    "C": ([0.954, 0.875, 0.904, 0.931], 0.916, 0.034),
    "D": ([0.824, 0.846, 0.853, 0.904], 0.857, 0.034),
}
SITES = ["A", "B", "C", "D"]


def _cell_rows(method: str, train: str, test: str, seed: int, auc: float, tag: str = "") -> list[dict]:
    """Two positives and 500 negatives whose AUC is exactly ``auc`` (a multiple of 1/1000)."""
    k = round(auc * 1000)
    below = (min(500, k), k - min(500, k))  # negatives scored below each positive
    rows = [
        dict(
            method=method,
            train_site=train,
            seed=seed,
            test_site=test,
            case=f"{test}-n{i}{tag}",
            subject=f"{test}-n{i}",
            label=0,
            score=float(i),
        )
        for i in range(500)
    ]
    rows += [
        dict(
            method=method,
            train_site=train,
            seed=seed,
            test_site=test,
            case=f"{test}-p{j}{tag}",
            subject=f"{test}-p{j}",
            label=1,
            score=b - 0.5,
        )
        for j, b in enumerate(below)
    ]
    return rows


def test_matrix_mean_and_std_reproduce_table_2_3():
    rows = [r for tr in SITES for te, auc in zip(SITES, TABLE_23[tr][0]) for r in _cell_rows("ppi_wbp", tr, te, 0, auc)]
    tables = site_cv_tables(pd.DataFrame(rows), ["ppi_wbp"], SITES)
    mat = tables.auc["ppi_wbp"]
    assert list(mat.index) == SITES and list(mat.columns) == [*SITES, "Mean", "STD"]
    for tr, (cells, mean, std) in TABLE_23.items():
        np.testing.assert_allclose(mat.loc[tr, SITES].to_numpy(), cells, atol=1e-12)
        assert round(mat.loc[tr, "Mean"], 3) == pytest.approx(mean, abs=1e-9)
        assert round(mat.loc[tr, "STD"], 3) == pytest.approx(std, abs=1e-9)  # sample std, ddof = 1
    assert tables.reference is None and not tables.pvalues  # no baseline: nothing to test against
    metrics = tables.summary_metrics()
    assert metrics["diag_auc_ppi_wbp"] == pytest.approx(np.mean([1.0, 0.975, 0.904, 0.904]))


def test_row_stats_skip_undefined_cells():
    block = pd.DataFrame([[0.8, math.nan, 0.6], [0.7, math.nan, math.nan]], index=["A", "B"], columns=SITES[:3])
    out = add_row_stats(block)
    assert out.loc["A", "Mean"] == pytest.approx(0.7) and out.loc["A", "STD"] == pytest.approx(
        np.std([0.8, 0.6], ddof=1)
    )
    assert out.loc["B", "Mean"] == pytest.approx(0.7) and math.isnan(out.loc["B", "STD"])


def test_several_seeds_average_cells_and_keep_each_seed():
    rows = _cell_rows("baseline", "A", "A", 0, 0.6) + _cell_rows("baseline", "A", "B", 0, 0.9)
    rows += _cell_rows("baseline", "A", "A", 1, 0.8) + _cell_rows("baseline", "A", "B", 1, 0.7)
    tables = site_cv_tables(pd.DataFrame(rows), ["baseline"], ["A"], ["A", "B"])
    assert tables.seeds == [0, 1]
    assert tables.auc["baseline"].loc["A", "A"] == pytest.approx(0.7)
    assert tables.auc["baseline"].loc["A", "B"] == pytest.approx(0.8)
    assert tables.auc["baseline"].loc["A", "Mean"] == pytest.approx(0.75)
    assert tables.auc_by_seed["baseline"][1].loc["A", "A"] == pytest.approx(0.8)
    assert tables.auc_by_seed["baseline"][0].loc["A", "Mean"] == pytest.approx(0.75)


def _two_method_predictions(rng: np.random.Generator) -> pd.DataFrame:
    """Two sites, a baseline and a PPI method scored on the same 30 cases per cell, with noise."""
    rows = []
    for tr in ("A", "B"):
        for te in ("A", "B"):
            labels = np.array([0, 1] * 15)
            signal = labels + rng.normal(0, 1.0, labels.size)
            for method, noise in (("baseline", 1.5), ("ppi_wbp", 0.5)):
                score = signal + rng.normal(0, noise, labels.size)
                if tr == te:
                    score = labels * 10.0 if method == "ppi_wbp" else -labels * 10.0  # must not enter the pool
                for i, (y, s) in enumerate(zip(labels, score)):
                    rows.append(
                        dict(
                            method=method,
                            train_site=tr,
                            seed=0,
                            test_site=te,
                            case=f"{te}-{i}",
                            subject=f"{te}-{i}",
                            label=int(y),
                            score=float(s),
                        )
                    )
    return pd.DataFrame(rows)


def test_delong_matrix_and_pooled_offdiag_match_direct_computation():
    preds = _two_method_predictions(np.random.default_rng(3))
    tables = site_cv_tables(preds, ["baseline", "ppi_wbp"], ["A", "B"])
    p = tables.pvalues["ppi_wbp"]
    assert p.shape == (2, 2) and ((p.to_numpy() >= 0) & (p.to_numpy() <= 1)).all()
    for tr in ("A", "B"):
        for te in ("A", "B"):
            a = preds[(preds.method == "ppi_wbp") & (preds.train_site == tr) & (preds.test_site == te)]
            b = preds[(preds.method == "baseline") & (preds.train_site == tr) & (preds.test_site == te)]
            ref = delong_test(a.label.to_numpy(), a.score.to_numpy(), b.score.to_numpy())
            assert p.loc[tr, te] == pytest.approx(ref.p_value, rel=1e-12)
            assert tables.auc_diff["ppi_wbp"].loc[tr, te] == pytest.approx(ref.auc_diff, rel=1e-12)
    assert p.loc["A", "A"] < 1e-6  # perfect vs inverted on the diagonal

    pooled = tables.pooled["ppi_wbp"]
    off = preds[preds.train_site != preds.test_site].sort_values(["train_site", "test_site", "case"])
    a, b = off[off.method == "ppi_wbp"], off[off.method == "baseline"]
    ref = delong_test(a.label.to_numpy(), a.score.to_numpy(), b.score.to_numpy())
    assert pooled.n_cases == 60 and pooled.n_pos == 30
    assert pooled.auc == pytest.approx(roc_auc_score(a.label, a.score))
    assert pooled.auc_reference == pytest.approx(roc_auc_score(b.label, b.score))
    assert pooled.p_value == pytest.approx(ref.p_value, rel=1e-12) and pooled.z == pytest.approx(ref.z, rel=1e-12)
    diffs = [tables.auc_diff["ppi_wbp"].loc["A", "B"], tables.auc_diff["ppi_wbp"].loc["B", "A"]]
    assert pooled.mean_cell_diff == pytest.approx(np.mean(diffs))
    assert pooled.auc > pooled.auc_reference  # the less noisy method ranks better
    metrics = tables.summary_metrics()
    assert metrics["pooled_p_ppi_wbp"] == pooled.p_value
    assert metrics["offdiag_auc_ppi_wbp"] == pytest.approx(
        np.mean([tables.auc["ppi_wbp"].loc["A", "B"], tables.auc["ppi_wbp"].loc["B", "A"]])
    )


def test_several_seeds_test_seed_averaged_scores_and_keep_per_seed_tests():
    rng = np.random.default_rng(7)
    frames = []
    for seed in (0, 1):
        part = _two_method_predictions(rng)
        part["seed"] = seed
        diag = part.train_site == part.test_site
        part.loc[diag, "case"] = part.loc[diag, "case"] + f"-s{seed}"  # each seed holds out other subjects
        frames.append(part)
    preds = pd.concat(frames, ignore_index=True)
    tables = site_cv_tables(preds, ["baseline", "ppi_wbp"], ["A", "B"])
    off = preds[(preds.train_site == "A") & (preds.test_site == "B")]
    mean = off.groupby(["method", "case"]).agg(label=("label", "first"), score=("score", "mean")).reset_index()
    a, b = mean[mean.method == "ppi_wbp"], mean[mean.method == "baseline"]
    assert (a.case.to_numpy() == b.case.to_numpy()).all()
    ref = delong_test(a.label.to_numpy(), a.score.to_numpy(), b.score.to_numpy())
    assert tables.pvalues["ppi_wbp"].loc["A", "B"] == pytest.approx(ref.p_value, rel=1e-12)
    for seed in (0, 1):
        one = off[off.seed == seed]
        ref = delong_test(
            one[one.method == "ppi_wbp"].label.to_numpy(),
            one[one.method == "ppi_wbp"].score.to_numpy(),
            one[one.method == "baseline"].score.to_numpy(),
        )
        assert tables.pvalues_by_seed["ppi_wbp"][seed].loc["A", "B"] == pytest.approx(ref.p_value, rel=1e-12)
    # off-diagonal cases are averaged over the seeds, not repeated: 2 cells x 30 cases
    assert tables.pooled["ppi_wbp"].n_cases == 60
    # a diagonal cell holds both seeds' held-out cases, each scored by its own seed's models
    diag = preds[(preds.train_site == "A") & (preds.test_site == "A")].sort_values(["seed", "case"])
    ref = delong_test(
        diag[diag.method == "ppi_wbp"].label.to_numpy(),
        diag[diag.method == "ppi_wbp"].score.to_numpy(),
        diag[diag.method == "baseline"].score.to_numpy(),
    )
    assert ref.n_pos + ref.n_neg == 60
    assert tables.pvalues["ppi_wbp"].loc["A", "A"] == pytest.approx(ref.p_value, rel=1e-12)
    per_seed = [tables.auc_by_seed["ppi_wbp"][s].loc["B", "A"] for s in (0, 1)]
    assert tables.auc["ppi_wbp"].loc["B", "A"] == pytest.approx(np.mean(per_seed))


def test_unpaired_cases_are_refused():
    preds = _two_method_predictions(np.random.default_rng(0))
    drop = preds[(preds.method == "baseline") & (preds.case == "B-3") & (preds.train_site == "A")].index
    with pytest.raises(ValueError, match="not tested on the same cases.*B-3"):
        delong_matrix(preds.drop(index=drop), "ppi_wbp", "baseline", ["A", "B"], ["A", "B"])
    with pytest.raises(ValueError, match="not tested on the same cases"):
        pooled_offdiag(preds.drop(index=drop), "ppi_wbp", "baseline", ["A", "B"], ["A", "B"])


def test_bad_predictions_are_named():
    preds = _two_method_predictions(np.random.default_rng(0))
    preds.loc[5, "label"] = 2
    with pytest.raises(ValueError, match="label 2"):
        site_cv_tables(preds, ["baseline"], ["A", "B"])


def test_methods_and_overrides_parse():
    erm = {"robust#method": "erm"}
    assert method_overrides("baseline") == {"ppi#enabled": False, **erm}
    assert method_overrides("ppi_wbp") == {"ppi#enabled": True, "ppi#saliency": "wbp", **erm}
    assert method_overrides("ppi_gradient") == {"ppi#enabled": True, "ppi#saliency": "gradient", **erm}
    assert method_overrides("ppi_input_x_gradient")["ppi#saliency"] == "input_x_gradient"
    assert method_overrides("ppi_wbp_box") == {"ppi#enabled": True, "ppi#saliency": "wbp", "ppi#mask": "box", **erm}
    assert method_overrides("dfr") == {"ppi#enabled": False, "robust#method": "dfr"}
    assert method_overrides("ppi_wbp+dfr") == {"ppi#enabled": True, "ppi#saliency": "wbp", "robust#method": "dfr"}
    assert method_overrides("ppi:mode=detached,partner=roll+dfr") == {
        "ppi#enabled": True,
        "ppi#mode": "detached",
        "ppi#partner": "roll",
        "robust#method": "dfr",
    }
    for bad in ("pp", "ppi_foo", "ppi_wbp_circle", "PPI_wbp", "wbp", "ppi_wbp+irm"):
        with pytest.raises(SiteCVError, match="unknown method"):
            method_overrides(bad)
    got = parse_overrides(
        [
            "--max_epochs",
            "3",
            "--ppi#mode=differentiable",
            "--spatial_size",
            "[4,32,48]",
            "--",
            "--amp",
            "false",
            "--network_def#backbone",
            "resnet18",
        ]
    )
    assert got == {
        "max_epochs": 3,
        "ppi#mode": "differentiable",
        "spatial_size": [4, 32, 48],
        "amp": False,
        "network_def#backbone": "resnet18",
    }
    with pytest.raises(SiteCVError, match="--train_sites.*--sites"):
        parse_overrides(["--train_sites", "['A']"])
    with pytest.raises(SiteCVError, match="no value"):
        parse_overrides(["--max_epochs"])
    with pytest.raises(SiteCVError, match="unexpected argument 'stray'"):
        parse_overrides(["stray"])


def test_methods_are_labelled_by_the_configuration_they_train_on_the_bundle():
    ga = {"contrast_classes": [1], "warmup_epochs": 12, "ramp_epochs": 4, "guide": "study"}
    short = {**ga, "warmup_epochs": 0}  # --ppi#warmup_epochs 0: the recipe's, not a variant
    methods = ["baseline", "ppi", "ppi:mode=detached", "ppi:partner=roll", "random_mask", "groupdro", "ppi_wbp+dfr"]
    assert method_labels(methods, ga, short) == [
        "baseline",
        "ppi_wbp",
        "ppi_wbp:mode=detached",
        "ppi_wbp:partner=roll",
        "random_mask",
        "groupdro",
        "ppi_wbp+dfr",
    ]
    # a user's --ppi#mode detached is in every PPI method's label, not hidden behind ppi_wbp
    assert method_labels(["baseline", "ppi_wbp"], ga, {**ga, "mode": "detached"}) == [
        "baseline",
        "ppi_wbp:mode=detached",
    ]
    with pytest.raises(SiteCVError, match="methods 'ppi_wbp' and 'ppi' train the same configuration .* \\(ppi_wbp\\)"):
        method_labels(["ppi_wbp", "ppi"], ga, ga)
    with pytest.raises(SiteCVError, match="PPI mode must be one of"):
        method_labels(["ppi:mode=sideways"], ga, ga)
    with pytest.raises(SiteCVError, match="its ppi is not a PPI configuration: unknown PPI field 'colour'"):
        method_labels(["ppi"], {"colour": "red"}, ga)


def test_a_methods_list_keeps_a_variants_fields_together():
    assert split_methods("baseline,ppi:mode=detached,partner=roll,ppi_wbp+dfr") == [
        "baseline",
        "ppi:mode=detached,partner=roll",
        "ppi_wbp+dfr",
    ]
    assert split_methods("ppi:contrast_classes=[0,1],dilate=2, groupdro") == [
        "ppi:contrast_classes=[0,1],dilate=2",
        "groupdro",
    ]
    with pytest.raises(SiteCVError, match="'mode=detached' follows no <method>:<field>=<value>"):
        split_methods("baseline,mode=detached")
    with pytest.raises(SiteCVError, match="expected a comma-separated list"):
        split_methods(" , ")


# ----- end to end ------------------------------------------------------------------------------------------

TINY = [
    "--synthetic#sites", "['A','B']", "--synthetic#subjects_per_site", "12", "--synthetic#n_bscans", "4",
    "--synthetic#height", "32", "--synthetic#width", "48", "--synthetic#cue_site", "B",
    "--spatial_size", "[4,32,48]", "--network_def#width", "4", "--batch_size", "4", "--max_epochs", "2",
    "--val_fraction", "0.25", "--ppi#warmup_epochs", "0", "--min-steps", "0",
]  # fmt: skip


def _argv(tmp: Path, *extra: str) -> list[str]:
    return [
        "--config_file", str(BUNDLE), "--out", str(tmp / "cv"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
        "--methods", "baseline,ppi_wbp", "--no-progress", "--num-threads", "1",
        "--default_dataset_dir", str(tmp / "data"), "--dataset_dir", str(tmp / "data"), *TINY, *extra,
    ]  # fmt: skip


def _client(tmp: Path) -> tuple[mlflow.MlflowClient, str]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ga_site_cv")
    assert exp is not None, "no MLflow experiment ga_site_cv"
    return client, exp.experiment_id


@pytest.fixture(scope="module")
def cv_twice(tmp_path_factory):
    """The CV run once, then again into the same folder (everything reused)."""
    tmp = tmp_path_factory.mktemp("site_cv")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)  # anything the bundle writes relative to the working folder stays in tmp
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        t0 = time.perf_counter()
        assert main(_argv(tmp)) == 0
        first_seconds = time.perf_counter() - t0
        first = json.loads((tmp / "cv" / "summary.json").read_text())
        first_auc = {m: pd.read_csv(tmp / "cv" / f"auc_{m}.csv", index_col=0) for m in ("baseline", "ppi_wbp")}
        client, exp_id = _client(tmp)
        runs_after_first = {r.info.run_id for r in client.search_runs([exp_id])}
        t0 = time.perf_counter()
        assert main(_argv(tmp)) == 0
        second_seconds = time.perf_counter() - t0
    finally:
        mp.undo()
    return dict(tmp=tmp, first=first, first_auc=first_auc, first_seconds=first_seconds,
                second_seconds=second_seconds, runs_after_first=runs_after_first)  # fmt: skip


@pytest.mark.slow
def test_matrices_and_report_files(cv_twice):
    out = cv_twice["tmp"] / "cv"
    for m in ("baseline", "ppi_wbp"):
        auc = pd.read_csv(out / f"auc_{m}.csv", index_col=0)
        assert list(auc.index) == ["A", "B"] and list(auc.columns) == ["A", "B", "Mean", "STD"]
        cells = auc[["A", "B"]].to_numpy()
        assert ((cells >= 0) & (cells <= 1)).all()
        np.testing.assert_allclose(auc["Mean"], cells.mean(axis=1))
        np.testing.assert_allclose(auc["STD"], cells.std(axis=1, ddof=1))
        as_json = json.loads((out / f"auc_{m}.json").read_text())
        assert as_json["A"]["B"] == pytest.approx(auc.loc["A", "B"])
    p = pd.read_csv(out / "pvalue_ppi_wbp_vs_baseline.csv", index_col=0)
    assert p.shape == (2, 2) and ((p.to_numpy() >= 0) & (p.to_numpy() <= 1)).all()
    assert json.loads((out / "pvalue_ppi_wbp_vs_baseline.json").read_text()).keys() == {"A", "B"}
    pooled = json.loads((out / "pooled_offdiag.json").read_text())["ppi_wbp"]
    assert pooled["n_cases"] == 24 and 0 <= pooled["p_value"] <= 1  # 12 cases of B (model of A) + 12 of A
    pngs = ["heatmap_auc_baseline.png", "heatmap_auc_ppi_wbp.png", "heatmap_pvalue.png", "roc_baseline.png",
            "roc_ppi_wbp.png"]  # fmt: skip
    for name in pngs:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
        assert img[..., :3].std() > 0.05, f"{name} is blank"
    md = (out / "summary.md").read_text()
    assert "| No PPI (baseline) | A | B | Mean | STD |" in md and "With PPI (ppi_wbp)" in md
    assert f"{pd.read_csv(out / 'auc_ppi_wbp.csv', index_col=0).loc['B', 'Mean']:.3f}" in md
    assert all(f"({name})" in md for name in pngs)


@pytest.mark.slow
def test_diagonal_uses_only_subjects_that_neither_trained_nor_chose_the_checkpoint(cv_twice):
    tmp = cv_twice["tmp"]
    preds = pd.read_csv(tmp / "cv" / "predictions.csv", dtype={"subject": str})
    datalist = tmp / "data" / "datalist.json"
    diag_cases = {}
    for (method, site), g in preds.groupby(["method", "train_site"]):
        # the split the bundle trains on, recomputed here independently of the pipeline
        split = {
            part: {
                it["subject"]
                for it in ga_split(datalist, part=part, train_sites=[site], val_fraction=0.25, test_fraction=0.25)
            }
            for part in ("train", "val", "test")
        }
        diag = g[g.test_site == site]
        assert len(diag) == 4 and set(diag.role) == {"heldout"}
        assert set(diag.subject) == split["test"]
        assert not (set(diag.subject) & (split["train"] | split["val"])), f"{method} on {site}: diagonal not held out"
        assert set(diag.label) == {0, 1}
        off = g[g.test_site != site]
        assert len(off) == 12 and set(off.role) == {"site"}  # every volume of the other site
        diag_cases[(method, site)] = set(diag.case)
    for site in ("A", "B"):  # the same split for both methods
        assert diag_cases[("baseline", site)] == diag_cases[("ppi_wbp", site)]
    for rec_path in (tmp / "cv" / "cells").glob("*/attempt-1/cell.json"):
        rec = json.loads(rec_path.read_text())
        assert not set(rec["train_subjects"]) & set(rec["heldout_subjects"])
        assert not set(rec["selection_subjects"]) & set(rec["heldout_subjects"])
        assert len(rec["selection_subjects"]) == 2
        assert (rec_path.parent / rec["checkpoint_best"]).is_file()
        assert (rec_path.parent / rec["checkpoint_final"]).is_file()


@pytest.mark.slow
def test_mlflow_parent_and_children(cv_twice):
    tmp, first = cv_twice["tmp"], cv_twice["first"]
    client, exp_id = _client(tmp)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.experiment_id == exp_id
    for key in ("mean_auc_baseline", "mean_auc_ppi_wbp", "offdiag_auc_ppi_wbp", "pooled_p_ppi_wbp"):
        assert key in parent.data.metrics, sorted(parent.data.metrics)
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.md", "summary.json", "figures", "tables"} <= top
    figs = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "figures/heatmap_pvalue.png" in figs
    (study_input,) = parent.inputs.dataset_inputs  # the study's datalist, one input without a split context
    assert study_input.dataset.source_type == "local" and study_input.dataset.digest
    assert not [t for t in study_input.tags if t.key == "mlflow.data.context"]

    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    auc = {m: pd.read_csv(tmp / "cv" / f"auc_{m}.csv", index_col=0) for m in ("baseline", "ppi_wbp")}
    seen = set()
    for run in children:
        tags, metrics = run.data.tags, run.data.metrics
        method, site = tags["cv_method"], tags["train_site"]
        seen.add((method, site))
        assert run.info.status == "FINISHED" and tags["cv_seed"] == "0"
        assert run.info.run_name.startswith(f"cv-{method}-{site}-s0-")
        for test in ("A", "B"):
            assert metrics[f"auc_{test}"] == pytest.approx(auc[method].loc[site, test], abs=1e-9)
        assert "val_auc" in metrics  # the bundle's own run
        assert "model_best.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert seen == {(m, s) for m in ("baseline", "ppi_wbp") for s in ("A", "B")}


@pytest.mark.slow
def test_rerun_reuses_every_cell(cv_twice):
    tmp = cv_twice["tmp"]
    out = tmp / "cv"
    second = json.loads((out / "summary.json").read_text())
    assert second["n_reused"] == 4 and second["n_trained"] == 0
    assert [c["run_id"] for c in second["cells"]] == [c["run_id"] for c in cv_twice["first"]["cells"]]
    client, exp_id = _client(tmp)
    new_runs = {r.info.run_id for r in client.search_runs([exp_id])} - cv_twice["runs_after_first"]
    assert new_runs == {second["parent_run_id"]}  # a new parent, no new child
    for m, before in cv_twice["first_auc"].items():
        pd.testing.assert_frame_equal(pd.read_csv(out / f"auc_{m}.csv", index_col=0), before)
    assert cv_twice["second_seconds"] < 0.5 * cv_twice["first_seconds"]
    # the first report was moved aside, not overwritten
    history = out / "history" / cv_twice["first"]["stamp"]
    assert json.loads((history / "summary.json").read_text())["parent_run_id"] == cv_twice["first"]["parent_run_id"]
    assert (history / "heatmap_auc_baseline.png").is_file()
    assert len(list((out / "cells").glob("*/attempt-1/cell.json"))) == 4


@pytest.mark.slow
def test_an_unfinished_cell_is_retrained_beside_the_old_attempt(cv_twice, monkeypatch, capsys):
    tmp = cv_twice["tmp"]
    monkeypatch.chdir(tmp)
    client, _ = _client(tmp)
    cells = cv_twice["first"]["cells"]
    victim = next(c for c in cells if c["method"] == "baseline" and c["train_site"] == "B")
    client.set_terminated(victim["run_id"], "FAILED")
    capsys.readouterr()
    assert main(_argv(tmp, "--sites", "B")) == 0
    console = capsys.readouterr().out
    assert "[1/2] training baseline trained on B, seed 0" in console
    assert "[2/2] ppi_wbp trained on B, seed 0: reused" in console
    lines = console.splitlines()
    header = next(line for line in lines if line.startswith("No PPI (baseline)"))
    assert header.split()[-3:] == ["B", "Mean", "STD"]
    row = lines[lines.index(header) + 2].split()  # below the rule: the row of site B
    auc = pd.read_csv(tmp / "cv" / "auc_baseline.csv", index_col=0)
    assert row[0] == "B" and row[1] == f"{auc.loc['B', 'B']:.3f}"
    assert any(line.startswith("With PPI (ppi_wbp)") for line in lines)
    third = json.loads((tmp / "cv" / "summary.json").read_text())
    by_method = {c["method"]: c for c in third["cells"]}
    assert by_method["baseline"]["status"] == "trained" and by_method["baseline"]["attempt"] == 2
    assert by_method["ppi_wbp"]["status"] == "reused"
    assert (tmp / "cv" / "cells" / victim["key"] / "attempt-1" / "cell.json").is_file()  # kept
    assert client.get_run(by_method["baseline"]["run_id"]).info.status == "FINISHED"
    assert by_method["baseline"]["run_id"] != victim["run_id"]


@pytest.mark.slow
def test_training_on_one_site_scores_every_site(cv_twice, monkeypatch):
    tmp = cv_twice["tmp"]
    monkeypatch.chdir(tmp)
    assert main(_argv(tmp, "--train-sites", "A")) == 0
    summary = json.loads((tmp / "cv" / "summary.json").read_text())
    assert {c["train_site"] for c in summary["cells"]} == {"A"}
    assert all(c["status"] == "reused" for c in summary["cells"])  # the same cells as in the full study
    for m in ("baseline", "ppi_wbp"):
        auc = pd.read_csv(tmp / "cv" / f"auc_{m}.csv", index_col=0)
        assert list(auc.index) == ["A"] and list(auc.columns) == ["A", "B", "Mean", "STD"]
    pooled = json.loads((tmp / "cv" / "pooled_offdiag.json").read_text())
    assert pooled["ppi_wbp"]["n_cases"] == 12  # every volume of B, scored by the models of A


@pytest.mark.slow
def test_comparators_with_oracle_selection_never_score_the_records_that_chose(cv_twice, tmp_path, monkeypatch):
    """GroupDRO and DFR as site-CV methods; ``--selection oracle --oracle-sites B`` chooses every checkpoint on
    half of B's subjects, and B is scored on the other half only (the same data as the study above)."""
    tmp = cv_twice["tmp"]
    monkeypatch.chdir(tmp)
    argv = _argv(tmp, "--train-sites", "A", "--selection", "oracle", "--oracle-sites", "B")
    argv[argv.index("--out") + 1] = str(tmp_path / "cv")
    argv[argv.index("--methods") + 1] = "baseline,groupdro,dfr"
    assert main(argv) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert {c["method"] for c in summary["cells"]} == {"baseline", "groupdro", "dfr"}
    assert all(c["status"] == "trained" for c in summary["cells"])  # other selection: other cells
    oracle = ga_split(tmp / "data" / "datalist.json", part="val", train_sites=["B"], val_fraction=0.5, seed=0)
    chose = {str(Path(r["image"]).resolve()) for r in oracle}
    assert 0 < len(chose) < 12
    for cell in summary["cells"]:
        preds = pd.read_csv(tmp_path / "cv" / "cells" / cell["key"] / f"attempt-{cell['attempt']}" / "predictions.csv")
        b = preds[preds["test_site"] == "B"]
        assert len(b) == 12 - len(chose)
        assert not {str((tmp / "data" / c).resolve()) for c in b["case"]} & chose
    assert "checkpoint selection: **oracle**" in (tmp_path / "cv" / "summary.md").read_text()
    with pytest.raises(SiteCVError, match="oracle_sites"):
        study_overrides(SiteCVConfig(config_file=BUNDLE, selection="oracle"), BUNDLE, ["baseline"])


@pytest.mark.slow
def test_a_variant_is_trained_and_named_by_its_fields_everywhere(tmp_path, monkeypatch, capsys):
    """``ppi:mode=detached,partner=roll`` and the default differ only in mode and partner: two labels, in the
    tables, the files, the cell runs' ``cv_method`` and the bundle's own ``method`` tag alike."""
    monkeypatch.chdir(tmp_path)
    methods = "ppi,ppi:partner=roll,mode=detached"
    assert main(_argv(tmp_path, "--train-sites", "A", "--methods", methods, "--seeds", "1")) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    variant_label = "ppi_wbp:mode=detached,partner=roll"
    assert summary["methods"] == ["ppi_wbp", variant_label]
    assert (tmp_path / "cv" / "auc_ppi_wbp-mode=detached,partner=roll.csv").is_file()
    client, _ = _client(tmp_path)
    for cell in summary["cells"]:
        run = client.get_run(cell["run_id"])
        assert run.data.tags["cv_method"] == run.data.tags["method"] == cell["method"]
        detached = cell["method"] == variant_label
        assert (run.data.params["ppi.mode"], run.data.params["ppi.partner"]) == (
            ("detached", "roll") if detached else ("differentiable", "same_class")
        )
    assert main(_argv(tmp_path, "--methods", "ppi,ppi_wbp")) == 2
    assert "methods 'ppi' and 'ppi_wbp' train the same configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_small_sites_train_for_enough_optimiser_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 6 training eyes of site A in batches of 4: 2 steps an epoch, so 12 steps take 6 epochs, not the bundle's 2
    assert main(_argv(tmp_path, "--train-sites", "A", "--methods", "baseline", "--min-steps", "12")) == 0
    (cell,) = json.loads((tmp_path / "cv" / "summary.json").read_text())["cells"]
    (record,) = (tmp_path / "cv" / "cells").glob("*/attempt-1/cell.json")
    rec = json.loads(record.read_text())
    assert rec["n_train"] == 6 and rec["epochs"] == 6 and rec["optimiser_steps"] == 12
    client, _ = _client(tmp_path)
    run = client.get_run(rec["run_id"])
    assert run.data.params["max_epochs"] == "6"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert json.loads((record.parent.parent / "key.json").read_text())["overrides"]["min_steps (site_cv)"] == 12
    assert main(_argv(tmp_path, "--min-steps", "-1")) == 2


@pytest.mark.slow
def test_clear_errors(cv_twice, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tmp = cv_twice["tmp"]
    assert main(_argv(tmp, "--sites", "A,Z")) == 2
    assert "unknown site(s) ['Z']" in capsys.readouterr().err
    assert main(_argv(tmp, "--methods", "baseline,ppi_magic")) == 2
    assert "unknown method 'ppi_magic'" in capsys.readouterr().err
    assert main(_argv(tmp, "--sites", "A", "--train-sites", "B")) == 2
    assert "training site(s) ['B'] are not among the sites ['A']" in capsys.readouterr().err
    assert main(_argv(tmp, "--test-fraction", "1.5")) == 2
    assert "--test-fraction must lie in [0, 1), got 1.5" in capsys.readouterr().err
    missing = tmp_path / "nope.json"
    assert main(["--config_file", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert f"bundle config file not found: {missing}" in capsys.readouterr().err
    assert main(_argv(tmp, "--seed", "3")) == 2
    assert "--first-seed" in capsys.readouterr().err


def test_predict_probabilities_per_checkpoint(tmp_path):
    import torch

    from pipelines.site_cv.predict import TensorCache, predict_probabilities

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    images = []
    for i in range(5):
        np.save(tmp_path / f"{i}.npy", np.random.default_rng(i).normal(size=(1, 2, 3)).astype(np.float32))
        images.append(str(tmp_path / f"{i}.npy"))
    calls = []

    def preprocessing(item):
        calls.append(item["image"])
        return {"image": torch.from_numpy(np.load(item["image"]))}

    torch.save(net.state_dict(), tmp_path / "best.pt")
    torch.save({"model": net.state_dict(), "optimizer": {}}, tmp_path / "same.pt")
    expected = torch.softmax(net(torch.stack([preprocessing({"image": p})["image"] for p in images])), 1)[:, 1]
    with torch.no_grad():
        net[1].weight.mul_(-1.0)
    torch.save({"model": net.state_dict()}, tmp_path / "other.pt")
    calls.clear()
    cache = TensorCache()
    ckpts = {"best": tmp_path / "best.pt", "final": tmp_path / "same.pt", "other": tmp_path / "other.pt"}
    out = predict_probabilities(net, preprocessing, images, torch.device("cpu"), 2, ckpts, torch, cache=cache)
    np.testing.assert_allclose(out["best"], expected.detach().numpy(), rtol=1e-6)
    assert out["final"] is out["best"]  # same weights: scored once
    assert not np.allclose(out["other"], out["best"])
    assert calls == images and cache.nbytes == 5 * 6 * 4
    predict_probabilities(net, preprocessing, images[:2], torch.device("cpu"), 2, {"b": ckpts["best"]}, torch, cache)
    assert calls == images  # preprocessed once, then read from the cache
    small = TensorCache(max_bytes=2 * 6 * 4)
    predict_probabilities(net, preprocessing, images, torch.device("cpu"), 2, {"b": ckpts["best"]}, torch, small)
    assert small.nbytes == 2 * 6 * 4  # over the budget, nothing more is kept


def test_predict_probabilities_names_a_checkpoint_of_another_network(tmp_path):
    import torch

    from pipelines.site_cv.predict import predict_probabilities
    from ppi_med.weights import CheckpointMismatchError

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    wider = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
    torch.save({"model": wider.state_dict(), "optimizer": {}}, tmp_path / "wider.pt")
    np.save(tmp_path / "0.npy", np.zeros((1, 2, 3), np.float32))

    def preprocessing(item):
        return {"image": torch.from_numpy(np.load(item["image"]))}

    with pytest.raises(CheckpointMismatchError, match=r"wider.pt: .*1.weight \(2, 8\) vs \(2, 6\)"):
        predict_probabilities(
            net,
            preprocessing,
            [str(tmp_path / "0.npy")],
            torch.device("cpu"),
            1,
            {"best": tmp_path / "wider.pt"},
            torch,
        )


@pytest.mark.slow
def test_a_site_with_one_class_is_reported_not_a_crash(cv_twice, tmp_path, monkeypatch, capsys):
    """Site B keeps only its label-0 eyes: not trained on, its column n/a with the reason, DeLong skipped."""
    monkeypatch.chdir(tmp_path)
    source = cv_twice["tmp"] / "data" / "datalist.json"
    records = json.loads(source.read_text())["training"]
    kept = [
        dict(r, image=str((source.parent / r["image"]).resolve()), mask=str((source.parent / r["mask"]).resolve()))
        for r in records
        if r["site"] == "A" or r["label"] == 0
    ]
    n_b = sum(r["site"] == "B" for r in kept)
    (tmp_path / "one_class").mkdir()
    (tmp_path / "one_class" / "datalist.json").write_text(json.dumps({"training": kept}))
    argv = _argv(tmp_path, "--dataset_dir", str(tmp_path / "one_class"))
    argv[argv.index("--default_dataset_dir") + 1] = str(cv_twice["tmp"] / "data")
    assert main(argv) == 0
    why = f"only label 0 ({n_b} cases)"
    assert f"site CV: Site B has {why}: not trained on" in capsys.readouterr().err
    out = tmp_path / "cv"
    for m in ("baseline", "ppi_wbp"):
        auc = pd.read_csv(out / f"auc_{m}.csv", index_col=0)
        assert list(auc.index) == ["A"] and 0.0 <= auc.loc["A", "A"] <= 1.0
        assert math.isnan(auc.loc["A", "B"])
    assert math.isnan(pd.read_csv(out / "pvalue_ppi_wbp_vs_baseline.csv", index_col=0).loc["A", "B"])
    pooled = json.loads((out / "pooled_offdiag.json").read_text())["ppi_wbp"]
    assert pooled["n_cases"] == n_b and pooled["n_pos"] == 0 and pooled["p_value"] is None
    md = (out / "summary.md").read_text()
    assert f"AUC undefined (site B has {why}; no DeLong test there) in: baseline A->B, ppi_wbp A->B" in md
    cells = pd.read_csv(out / "cells.csv")
    assert set(cells["train_site"]) == {"A"} and (cells["note"] == f"AUC on B undefined: {why}").all()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run_id in cells["run_id"]:
        run = client.get_run(run_id)
        assert run.data.tags["auc_undefined_B"] == f"one class in the {n_b} test cases (label 0)"
        assert "auc_B" not in run.data.metrics and "auc_A" in run.data.metrics
    # asked to train on that site alone: refused before anything is trained
    assert main([*argv, "--train-sites", "B"]) == 2
    assert f"training site(s) B ({why}) of " in capsys.readouterr().err


@pytest.mark.slow
def test_shards_then_gather_equal_the_one_process_study(cv_twice, tmp_path, monkeypatch):
    """Two workers each run half the cells into one folder and store; the gathering run reuses them all."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = _argv(tmp_path)  # the same generated data, in a new folder and store
    assert main([*argv, "--shard", "0/2"]) == 0
    assert main([*argv, "--shard", "1/2"]) == 0
    assert not (tmp_path / "cv" / "summary.json").exists()  # shards write no report
    client, exp_id = _client(tmp_path)
    shard_runs = client.search_runs([exp_id], "tags.cv_kind = 'site_cv_parent'")
    assert sorted(r.data.tags["cv_shard"] for r in shard_runs) == ["0/2", "1/2"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert len(summary["cells"]) == 4 and all(c["status"] == "reused" for c in summary["cells"])
    for m in ("baseline", "ppi_wbp"):
        gathered = pd.read_csv(tmp_path / "cv" / f"auc_{m}.csv", index_col=0)
        pd.testing.assert_frame_equal(gathered, cv_twice["first_auc"][m])
    assert main([*argv, "--shard", "2/2"]) == 2
    assert main([*argv, "--shard", "one"]) == 2


@pytest.mark.slow
def test_studies_run_apart_merge_into_the_one_process_study(cv_twice, tmp_path, monkeypatch, capsys):
    """One method per study, each in a store of its own; the merge equals the study that ran both."""
    import shutil

    from pipelines.site_cv.merge import main as merge_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for method in ("baseline", "ppi_wbp"):
        argv = _argv(tmp_path, "--methods", method)  # the same generated data as the one-process study
        argv[argv.index("--out") + 1] = str(tmp_path / method)
        argv[argv.index("--tracking-uri") + 1] = f"sqlite:///{tmp_path / method / 'mlflow.db'}"
        assert main(argv) == 0
    assert merge_main(["--out", str(tmp_path / "merged"), str(tmp_path / "baseline"), str(tmp_path / "ppi_wbp")]) == 0
    merged = tmp_path / "merged"
    for m in ("baseline", "ppi_wbp"):
        pd.testing.assert_frame_equal(
            pd.read_csv(merged / f"auc_{m}.csv", index_col=0), cv_twice["first_auc"][m], check_exact=False
        )
    summary = json.loads((merged / "summary.json").read_text())
    one = cv_twice["first"]["summary_metrics"]
    for key in ("pooled_auc_ppi_wbp", "pooled_p_ppi_wbp", "offdiag_mean_diff_ppi_wbp", "n_sig_cells_ppi_wbp"):
        assert summary["summary_metrics"][key] == pytest.approx(one[key], rel=1e-9), key
    assert summary["methods"] == ["baseline", "ppi_wbp"] and len(summary["cells"]) == 4
    assert "merged from 2 studies run apart" in (merged / "summary.md").read_text()
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'baseline' / 'mlflow.db'}").get_run(summary["parent_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["cv_kind"] == "site_cv_merge"

    # parts that are not the same study are refused, naming the part and what differs; nothing is written
    other = tmp_path / "other_seeds"
    shutil.copytree(tmp_path / "ppi_wbp", other)
    record = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**record, "seeds": [7]}))
    dropped = tmp_path / "dropped_case"
    shutil.copytree(tmp_path / "ppi_wbp", dropped)
    preds = pd.read_csv(dropped / "predictions.csv")
    preds.iloc[1:].to_csv(dropped / "predictions.csv", index=False)
    capsys.readouterr()
    for part, message in [
        (other, "in seeds: [7] against [0]"),
        (dropped, "ppi_wbp scored other cases than baseline"),
        (tmp_path / "baseline", "method baseline is in both"),
        (tmp_path / "nothing", "no finished site-CV study (summary.json missing)"),
    ]:
        out = tmp_path / f"refused-{part.name}"
        assert merge_main(["--out", str(out), str(tmp_path / "baseline"), str(part)]) == 2
        err = capsys.readouterr().err
        assert message in err and str(part) in err, err
        assert not out.exists()


@pytest.mark.slow
def test_cue_effect_scores_every_eye_and_its_watermark_twin(cv_twice, monkeypatch):
    tmp = cv_twice["tmp"]
    monkeypatch.chdir(tmp)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(_argv(tmp)) == 0  # the whole study (every cell reused), whatever ran before
    summary = json.loads((tmp / "cv" / "summary.json").read_text())
    assert cue_main([str(tmp / "cv"), "--no-progress"]) == 0
    out = tmp / "cv" / "cue_effect"
    eyes = pd.read_csv(out / "cue_effect_eyes.csv")
    records = load_datalist(summary["datalist"])
    assert len(eyes) == len(summary["cells"]) * len(records)
    # the eye as listed gets the score the study itself gave it (site CV scores the listed volumes)
    preds = pd.read_csv(tmp / "cv" / "predictions.csv")
    cue = {r["subject"]: int(r["cue"]) for r in records}
    assert sum(cue.values()) > 0  # the cue site has watermarked eyes
    merged = eyes.merge(preds, on=["method", "train_site", "seed", "test_site", "subject"])
    listed = np.where(merged["subject"].map(cue) == 1, merged["p_with_cue"], merged["p_without_cue"])
    assert len(merged) > 0 and np.allclose(listed, merged["score"], atol=1e-5)
    np.testing.assert_allclose(eyes["effect"], eyes["p_with_cue"] - eyes["p_without_cue"], atol=1e-6)
    table = pd.read_csv(out / "cue_effect.csv")
    assert set(table["method"]) == {"baseline", "ppi_wbp"} and (table["n"] > 0).all()
    assert "| baseline |" in (out / "cue_effect.md").read_text()
    client, _ = _client(tmp)
    parent = client.get_run(summary["parent_run_id"])
    assert {"cue_effect_baseline", "cue_effect_ppi_wbp"} <= set(parent.data.metrics)
    # a second run keeps the first one's tables
    first = (out / "cue_effect.csv").read_text()
    assert cue_main([str(tmp / "cv"), "--no-progress"]) == 0
    (kept,) = (out / "history").iterdir()
    assert (kept / "cue_effect.csv").read_text() == first and (out / "cue_effect.csv").is_file()


@pytest.mark.slow
def test_a_watermark_twin_differs_from_its_eye_in_the_watermark_only(cv_twice, tmp_path):
    datalist = Path(json.loads((cv_twice["tmp"] / "cv" / "summary.json").read_text())["datalist"])
    rec = next(r for r in load_datalist(datalist) if r["site"] == "B" and int(r["cue"]) == 0)
    listed = nib.load(rec["image"]).get_fdata()
    same = nib.load(render_with_cue(datalist, rec["subject"], 0, tmp_path)).get_fdata()
    np.testing.assert_array_equal(same, listed)  # drawn from the eye's own seed
    marked = nib.load(render_with_cue(datalist, rec["subject"], 1, tmp_path)).get_fdata()
    changed = np.argwhere(marked != listed)
    _, h, w = listed.shape
    assert len(changed) and changed[:, 1].max() < h // 2 and changed[:, 2].max() < w // 2  # top-left corner
    with pytest.raises(ValueError, match="lists no eye 'Z-999'"):
        render_with_cue(datalist, "Z-999", 1, tmp_path)


def test_cue_effect_without_a_study_is_refused(tmp_path, capsys):
    assert cue_main([str(tmp_path), "--no-progress"]) == 2
    assert str(tmp_path) in capsys.readouterr().err


@pytest.mark.slow
def test_a_second_study_in_another_folder_of_the_same_store_finds_its_own_runs(cv_twice, monkeypatch):
    tmp = cv_twice["tmp"]
    monkeypatch.chdir(tmp)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the same cells (same content keys) trained again into another folder, logging to the same MLflow store
    assert main([*_argv(tmp, "--train-sites", "A"), "--out", str(tmp / "cv_elsewhere")]) == 0
    summary = json.loads((tmp / "cv_elsewhere" / "summary.json").read_text())
    assert {c["status"] for c in summary["cells"]} == {"trained"}
    client, exp_id = _client(tmp)
    for cell in summary["cells"]:
        run = client.get_run(cell["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        assert run.info.status == "FINISHED"


@pytest.mark.parametrize("method", ["baseline", "ppi_wbp", "ppi_gradcam", "ppi_wbp_box", "ppi_input_x_gradient_hard"])
def test_a_method_name_makes_a_config_that_names_it_back(method):
    overrides = method_overrides(method)
    config = PPIConfig(**{k.removeprefix("ppi#"): v for k, v in overrides.items() if k.startswith("ppi#")})
    assert config.method == method  # the cell's tag and the bundle's run tag agree


def test_a_bundle_without_the_ids_site_cv_uses_is_refused_naming_them(tmp_path, capsys):
    lidc = ROOT / "bundles" / "lidc_ppi" / "configs" / "train.json"  # no sites: the nodule bundle has no site CV
    argv = ["--config_file", str(lidc), "--out", str(tmp_path / "cv"), "--no-progress"]
    assert main([*argv, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    err = capsys.readouterr().err
    assert f"{lidc} lacks the bundle ids site CV reads or sets: val_fraction, train_sites, val_sites" in err
    assert not (tmp_path / "cv").exists()  # refused before anything is written


def test_cue_effect_scores_the_model_each_cell_scored(tmp_path):
    """A DFR cell's ``best`` model is its refitted ``model_dfr.pt`` (``cell.json``), for the cue effect as for the
    tables; a cell without the record falls back to ``models/model_best.pt``."""
    from pipelines.cue_effect import _cell_checkpoint

    (tmp_path / "cell.json").write_text(json.dumps({"checkpoint_best": "models/model_dfr.pt"}))
    assert _cell_checkpoint(tmp_path, "best") == tmp_path / "models" / "model_dfr.pt"
    assert _cell_checkpoint(tmp_path / "other", "final") == tmp_path / "other" / "models" / "model_final.pt"
