"""The shortcut benchmark: data construction, method specs, the summary statistics, a whole small run with a
real MLflow store, and the claim the project makes for PPI: its default moves a model off a spurious cue."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.shortcut import (
    PARTNER_FORM,
    ShortcutConfig,
    ShortcutError,
    main,
    make_data,
    method_config,
    method_label,
    parse_fields,
    summarise,
    train_and_score,
)
from ppi_med.ppi import PPIConfig


def test_data_sets_have_the_requested_cue_shares_and_disjoint_digits():
    cfg = ShortcutConfig(cue="patch", train_p_pos=0.9, train_p_neg=0.1)
    data = make_data(cfg, seed=3)
    x, y = data.train
    assert x.shape[1:] == (1, 20, 20) and float(x.min()) >= 0.0
    flags = data.cue_masks["train"]
    assert flags[y.numpy() == 1].mean() == pytest.approx(0.9, abs=0.01)
    assert flags[y.numpy() == 0].mean() == pytest.approx(0.1, abs=0.01)
    rev = data.cue_masks["reversed"]
    y_test = data.tests["reversed"][1].numpy()
    assert rev[y_test == 1].mean() == pytest.approx(0.1, abs=0.01)
    assert not data.cue_masks["free"].any()
    # the cue sits in the empty border: a cue-carrying image differs from its cue-free twin only there
    diff = (data.tests["aligned"][0] - data.tests["free"][0]).abs().sum(dim=(1, 2, 3))
    assert torch.equal(diff > 0, torch.as_tensor(data.cue_masks["aligned"]))
    n_train, n_val, n_test = len(y), len(data.tests["val_free"][1]), len(y_test)
    assert n_train + n_val + n_test == 1797


def test_method_specs_and_their_errors():
    assert method_config("baseline").enabled is False
    assert method_config("ppi") == PPIConfig()
    cfg = method_config("ppi:saliency=gradcam,dilate=2,exclusive=false", {"warmup_epochs": 3})
    assert (cfg.saliency, cfg.dilate, cfg.exclusive, cfg.warmup_epochs) == ("gradcam", 2, False, 3)
    with pytest.raises(ShortcutError, match="unknown method 'ppo'"):
        method_config("ppo")
    with pytest.raises(ShortcutError, match="unknown PPI field 'colour'"):
        method_config("ppi:colour=red")
    with pytest.raises(ShortcutError, match="mode"):
        method_config("ppi:mode=sideways")
    with pytest.raises(ShortcutError, match="unknown cue"):
        ShortcutConfig(cue="stamp")


def test_a_methods_list_with_a_field_and_no_method_is_named(tmp_path, capsys):
    assert main(["--methods", "baseline,dilate=2", "--out", str(tmp_path / "b")]) == 2
    assert "--methods: methods 'baseline,dilate=2': 'dilate=2' follows no <method>:<field>=<value>" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_methods_are_named_by_their_configuration():
    assert method_label("ppi") == "ppi_wbp"
    assert method_label("ppi:partner=roll,mode=detached") == "ppi_wbp:mode=detached,partner=roll"
    assert method_label("ppi+dfr") == "ppi_wbp+dfr" and method_label("groupdro") == "groupdro"
    # on a common base the label names what a method adds to it; a method without PPI ignores the base
    base = {"warmup_epochs": 3, "guide": "partner"}
    assert method_label("ppi:mode=detached", base) == "ppi_wbp:mode=detached"
    assert method_label("baseline", base) == "baseline"
    assert method_config(method_label(PARTNER_FORM, base), base) == method_config(PARTNER_FORM, base)
    assert ShortcutConfig(methods=["ppi", "ppi:mode=detached"]).methods == [
        "baseline",
        "ppi_wbp",
        "ppi_wbp:mode=detached",
    ]
    with pytest.raises(ShortcutError, match="methods 'ppi' and 'ppi:mode=differentiable' are one configuration"):
        ShortcutConfig(methods=["ppi", "ppi:mode=differentiable"])
    with pytest.raises(ShortcutError, match="--ppi-base: PPI field dilate=wide: not a int"):
        parse_fields("dilate=wide")
    assert parse_fields("contrast_classes=[0,1],exclusive=false") == {"contrast_classes": [0, 1], "exclusive": False}


def test_summary_pairs_seeds_and_tests_against_the_baseline():
    rows = []
    for seed, (b, p) in enumerate([(0.10, 0.50), (0.20, 0.55), (0.15, 0.60)]):
        for method, auc in (("baseline", b), ("ppi", p)):
            for test in ("aligned", "reversed", "free"):
                value = auc if test == "reversed" else 0.9
                share = 0.4 if method == "baseline" else 0.1 * (seed + 1)
                rows.append(
                    {"method": method, "seed": seed, "test": test, "auc": value, "acc": 0.5, "cue_share": share}
                )
    summary = summarise(pd.DataFrame(rows)).set_index("method")
    assert summary.loc["ppi", "reversed_auc_delta"] == pytest.approx(0.40)
    assert summary.loc["ppi", "reversed_auc_sd"] == pytest.approx(np.std([0.5, 0.55, 0.6], ddof=1))
    from scipy.stats import ttest_rel

    expected = ttest_rel([0.5, 0.55, 0.6], [0.1, 0.2, 0.15]).pvalue
    assert summary.loc["ppi", "reversed_auc_p"] == pytest.approx(expected)
    assert np.isnan(summary.loc["baseline", "reversed_auc_p"])
    assert summary.loc["ppi", "cue_share_mean"] == pytest.approx(0.2)
    assert summary.loc["ppi", "free_auc_p"] == 1.0  # identical cue-free AUCs: no difference at all


@pytest.mark.slow
def test_a_small_benchmark_writes_its_tables_figures_and_mlflow_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bench"
    code = main(
        ["--cue", "line", "--seeds", "2", "--epochs", "2", "--methods", "ppi:mode=detached", "--out", str(out)]
        + ["--tracking-uri", uri, "--experiment", "shortcut_test"]
    )
    assert code == 0
    for name in ("results.csv", "summary.csv", "summary.md", "settings.json", "shortcut_auc.png", "examples.png"):
        assert (out / "line" / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "## Cue: line" in report and "python -m pipelines.shortcut --cue line" in report
    results = pd.read_csv(out / "line" / "results.csv")
    assert set(results["method"]) == {"baseline", "ppi_wbp:mode=detached"}  # the spec's label
    assert len(results) == 2 * 2 * 6  # methods x seeds x (3 test sets + 3 validation sets)
    assert "| `ppi_wbp:mode=detached` |" in (out / "line" / "summary.md").read_text()
    # every epoch scored; the model scored in results.csv is the one epoch the rule chose, its best
    curves = pd.read_csv(out / "line" / "epochs.csv")
    assert len(curves) == 2 * 2 * 2 and (out / "line" / "epochs.png").stat().st_size > 0
    for (method, seed), sub in curves.groupby(["method", "seed"]):
        assert sorted(sub["epoch"]) == [1, 2] and sub["chosen"].sum() == 1
        chosen = sub[sub["chosen"]].iloc[0]
        assert chosen["selection_score"] == sub["selection_score"].max()
        assert chosen["selection_score"] == pytest.approx(chosen["val_aligned_auc"])  # `train` reads these
        final = results[(results.method == method) & (results.seed == seed) & (results.test == "reversed")]
        assert chosen["reversed_auc"] == pytest.approx(final["auc"].item())

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("shortcut_test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    child = next(r for r in children if r.data.tags["method"] == "ppi_wbp:mode=detached")
    assert child.data.params["ppi.mode"] == "detached" and 0.0 <= child.data.metrics["reversed_auc"] <= 1.0
    assert 0.0 < child.data.metrics["cue_saliency_share"] < 1.0
    steps = client.get_metric_history(child.info.run_id, "epoch_reversed_auc")
    assert sorted(m.step for m in steps) == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"summary.md", "shortcut_auc.png"} <= artifacts

    # the same output folder again: refused, nothing overwritten
    before = (out / "report.md").read_bytes()
    assert main(["--cue", "line", "--seeds", "1", "--epochs", "1", "--out", str(out), "--tracking-uri", uri]) == 2
    assert (out / "report.md").read_bytes() == before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "outline_share"),
    [(PARTNER_FORM, 0.0), ("ppi", 1.0)],
    ids=["partner-form", "default-outlined"],
)
def test_ppi_moves_the_model_off_the_shortcut(spec: str, outline_share: float):
    """The project's claim, on real digits: the cue-reversed AUC rises well above the baseline's for every
    seed, and the cue-free AUC does not suffer, with the partner form (no outlines) and with the default
    (outline guide, other-class fill) where every training digit's strokes are its outline. The method's own
    form (batch rolled by one, the whole salient region removed in x*) and the outline guide with the zero
    fill gain nothing here, so this fails for them. Scored at the last epoch, as the claim was measured: the
    checkpoint chosen on validation digits with the training correlation (``selection="train"``) may be an
    epoch that still leans on the cue (docs/DESIGN.md section 9.4)."""
    cfg = ShortcutConfig(cue="patch", seeds=2, epochs=12, outline_share=outline_share, selection="last")
    gains, free_diffs, shares = [], [], []
    for seed in range(cfg.seeds):
        data = make_data(cfg, seed)
        _, base, _ = train_and_score(cfg, "baseline", seed, data)
        _, ppi, _ = train_and_score(cfg, spec, seed, data)
        gains.append(ppi["reversed"]["auc"] - base["reversed"]["auc"])
        shares.append((base["aligned"]["cue_share"], ppi["aligned"]["cue_share"]))
        free_diffs.append(ppi["free"]["auc"] - base["free"]["auc"])
    assert min(gains) > 0.15, gains
    assert np.mean(free_diffs) > -0.03, free_diffs
    assert all(p < 0.6 * b for b, p in shares), shares  # the saliency leaves the marker


@pytest.mark.slow
def test_the_comparators_run_in_the_benchmark_with_their_groups_and_each_selection(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bench"
    methods = ["groupdro,jtt", "dfr", "ppi+dfr"]  # comma-separated, one per argument, or both
    argv = ["--cue", "patch", "--seeds", "1", "--epochs", "4", "--methods", *methods, "--out", str(out)]
    assert main([*argv, "--tracking-uri", uri, "--selection", "oracle"]) == 0
    results = pd.read_csv(out / "patch" / "results.csv")
    assert set(results["method"]) == {"baseline", "groupdro", "jtt", "dfr", "ppi_wbp+dfr"}
    summary = (out / "patch" / "summary.md").read_text()
    assert "model selection `oracle` (an oracle" in summary
    assert "+- nan" not in summary  # one seed has no sd to show
    # JTT's first stage is a quarter of the epochs; its error set names training digits
    errors = (out / "patch" / "jtt" / "jtt-s0" / "error_set.csv").read_text().splitlines()
    assert errors[0] == "case" and all(e.isdigit() for e in errors[1:])
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("shortcut").experiment_id])
    by_method = {r.data.tags.get("method"): r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert by_method["ppi_wbp+dfr"].data.params["robust.method"] == "dfr"
    assert by_method["ppi_wbp+dfr"].data.params["ppi.enabled"] == "True"
    assert by_method["jtt"].data.params["robust.jtt_epochs"] == "1"
    assert by_method["groupdro"].data.params["selection"] == "oracle"
    with pytest.raises(ShortcutError, match="after '\\+' comes one of"):
        method_config("ppi+mixup")
    with pytest.raises(ShortcutError, match="selection must be one of"):
        ShortcutConfig(selection="best")
