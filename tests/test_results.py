"""``make results`` (``pipelines.results``): the quick profile end to end, resume, and failing jobs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines.results import BUNDLES, PROFILES, Job, Profile, build_jobs, main, run_jobs
from pipelines.results.paths import ROOT
from pipelines.results.profiles import LIDC_ATTEMPTS
from pipelines.results.sections.cost import epoch_seconds
from pipelines.results.templates import render
from ppi_med.stats import auc_ci


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    code = main(["--out", str(out), "--profile", "quick", "--parts", "ga,saliency,lidc", "--no-progress"])
    assert code == 0
    return out


@pytest.mark.slow
def test_quick_study_writes_the_report_from_its_own_runs(quick_study):
    out = quick_study
    text = (out / "RESULTS.md").read_text()
    for heading in ("## GA, pooled training", "## LIDC phantom nodules", "## Saliency: deletion and localisation"):
        assert heading in text
    assert "Profile `quick`" in text and "figures mean nothing" in text
    # the GA row is the AUC of the held-out predictions the bundle wrote
    preds = pd.read_csv(next((out / "jobs" / "ga-baseline-s0" / "runs").glob("*/test_predictions.csv")))
    auc = auc_ci(preds["label"], preds["prob"]).auc
    assert f"| baseline | {auc:.3f} |" in text
    # the goals table reads the same figure (one seed: its mean is that seed's AUC)
    assert f"| GA baseline test AUC >= 0.90 and >= the linear reference | {auc:.3f} (reference" in text
    # and the rows behind the tables, as CSV beside the report
    runs = pd.read_csv(out / "results" / "ga_runs.csv").set_index(["method", "seed"])
    assert runs.loc[("baseline", 0), "test_auc"] == pytest.approx(auc)
    assert runs.loc[("ppi_wbp", 0), "switch_fall"] >= 0.0
    # LIDC: every labelled nodule scored once, by the fold that held it out
    datalist = json.loads((out / "data" / "lidc" / "patches" / "datalist.json").read_text())["training"]
    pooled = pd.concat(pd.read_csv(p) for p in (out / "jobs").glob("lidc-baseline-f*/runs/*/test_predictions.csv"))
    assert len(pooled) == len(datalist) and pooled["image"].is_unique
    assert f"Nodules: {len(datalist)} " in text
    lidc = pd.read_csv(out / "results" / "lidc_pooled.csv").set_index("variant")
    assert lidc.loc["baseline", "nodules"] == len(datalist)
    assert lidc.loc["baseline", "auc"] == pytest.approx(auc_ci(pooled["label"], pooled["prob"]).auc)
    assert (out / "results" / "deletion_curves.png").stat().st_size > 10_000
    # the form tried against the LIDC bar, in its own table and not in the LIDC table's
    assert "### LIDC: the masks' other forms" in text and "| `box_std_0.8` |" in text
    assert "box_std_0.8" not in lidc.index


@pytest.mark.slow
def test_quick_study_logs_every_run_to_one_mlflow_store(quick_study):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{quick_study / 'mlflow.db'}")
    ga = client.get_experiment_by_name("results_ga")
    runs = client.search_runs([ga.experiment_id])
    assert {r.data.tags["results_job"] for r in runs} == {"ga-baseline-s0", "ga-ppi_wbp-s0", "ga-dfr-s0"}
    assert all("test_auc" in r.data.metrics and "ref_test_auc" in r.data.metrics for r in runs)
    lidc = client.search_runs([client.get_experiment_by_name("results_lidc").experiment_id])
    quick = PROFILES["quick"]
    assert len(lidc) == (2 + len(quick.comparators)) * quick.lidc_folds  # baseline, PPI, the comparators
    tried = client.search_runs([client.get_experiment_by_name("results_lidc_attempts").experiment_id])
    assert len(tried) == quick.lidc_folds
    assert client.search_runs([client.get_experiment_by_name("results_saliency").experiment_id])


@pytest.mark.slow
def test_rerun_skips_finished_jobs_and_keeps_their_outputs(quick_study, capsys):
    out = quick_study
    before = {p: p.stat().st_mtime for p in (out / "jobs").glob("*/done.json")}
    assert main(["--out", str(out), "--profile", "quick", "--parts", "ga,saliency,lidc", "--no-progress"]) == 0
    after = {p: p.stat().st_mtime for p in (out / "jobs").glob("*/done.json")}
    assert before == after
    assert "report:" in capsys.readouterr().out


def test_failed_job_is_named_with_its_log_and_its_dependants_do_not_run(tmp_path):
    fail = Job("broken", "ga", [sys.executable, "-c", "import sys; print('bad input'); sys.exit(3)"])
    after = Job("after", "saliency", [sys.executable, "-c", "open('ran', 'w')"], after=("broken",))
    ok = Job("fine", "cost", [sys.executable, "-c", "print('ok')"])
    with pytest.raises(RuntimeError, match=r"2 job\(s\) failed or could not run: broken .*log.txt.*after"):
        run_jobs([fail, after, ok], tmp_path, workers=2, progress=False)
    assert "bad input" in (tmp_path / "jobs" / "broken" / "log.txt").read_text()
    assert not (tmp_path / "jobs" / "broken" / "done.json").exists()
    done = json.loads((tmp_path / "jobs" / "fine" / "done.json").read_text())
    assert done["returncode"] == 0 and done["max_rss_mb"] > 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    clean = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=ROOT).returncode == 0
    assert done["commit"] == head and done["tree_clean"] is clean  # the code the job ran, read at its start
    # a second attempt keeps the failed one's folder aside instead of overwriting it
    with pytest.raises(RuntimeError):
        run_jobs([fail], tmp_path, workers=1, progress=False)
    assert len(list((tmp_path / "jobs").glob("broken.attempt-*"))) == 1


def test_jobs_cover_every_method_seed_and_fold_of_the_full_profile(tmp_path):
    jobs = build_jobs(tmp_path, PROFILES["full"], ["ga", "saliency", "lidc", "sites", "shortcut", "cost"], "sqlite://")
    names = {j.name for j in jobs}
    by_name = {j.name: j for j in jobs}
    ga = {n for n in names if n.startswith("ga-") and by_name[n].ga_table}
    # baseline, five saliencies, the three controls of docs/DESIGN.md section 4.5 and four comparators, 5 seeds
    assert len(ga) == 13 * 5 and {"ga-ppi_gradcam-s2", "ga-random_mask-s0", "ga-ppi_wbp_partner_zero-s1"} <= ga
    assert {"ga-groupdro-s0", "ga-jtt-s1", "ga-dfr-s2", "ga-ppi_wbp+dfr-s0"} <= ga
    # the baseline, PPI-WBP, its controls and the comparators again under worst_site selection, off the GA table
    worst = {n for n in names if n.endswith("-worst_site") and n.startswith("ga-")}
    assert len(worst) == 9 * 5 and "ga-ppi_gradcam-s0-worst_site" not in worst
    argv = by_name["ga-ppi_wbp+dfr-s3-worst_site"].argv
    assert argv[argv.index("--selection") + 1] == "worst_site" and "--selection" not in by_name["ga-dfr-s3"].argv
    assert argv[argv.index("--seed") + 1] == "3" and by_name["ga-dfr-s3-worst_site"].part == "ga"
    # the confounded study under each selection rule, the oracle on the cue-reversed site, each with its cue effect
    oracle = by_name["sites-confounded-oracle"].argv
    assert oracle[oracle.index("--selection") + 1] == "oracle" and oracle[oracle.index("--oracle-sites") + 1] == "C"
    assert "--oracle-sites" not in by_name["sites-confounded-worst_site"].argv
    assert by_name["sites-cue-oracle"].after == ("sites-confounded-oracle",)
    methods = oracle[oracle.index("--methods") + 1].split(",")
    assert {"baseline", "ppi_wbp", "groupdro", "jtt", "dfr", "ppi_wbp+dfr", "random_mask"} <= set(methods)
    # the site matrices: a study per method, each alone, merged by a job that reads what their entries keep
    merge = by_name["sites"]
    assert set(merge.after) == {f"sites-{m}" for m in methods} and not merge.reads_models
    assert merge.argv[2] == "pipelines.site_cv.merge" and merge.argv[4].endswith("jobs/sites/cv")
    part = by_name["sites-ppi_wbp+dfr"].argv
    assert part[part.index("--methods") + 1] == "ppi_wbp+dfr" and "--train-sites" not in part
    assert all(k.startswith("sites-ppi_wbp+dfr/cv/") for k in by_name["sites-ppi_wbp+dfr"].keeps)
    for sel in ("train", "worst_site", "oracle"):
        argv = by_name[f"shortcut-comparators-{sel}"].argv
        assert argv[argv.index("--selection") + 1] == sel and "patch,line,intensity,texture" in argv
    lidc = [j for j in jobs if j.part == "lidc" and not j.meta.get("attempt")]
    # baseline, four masks, the two controls (the bundle's pairing is the earlier default's already) and the four
    # comparators
    assert len(lidc) == 11 * 5 and "lidc-ppi_wbp_partner_zero-f0" not in names
    dro, ppi_dfr = by_name["lidc-groupdro-f1"].argv, by_name["lidc-ppi_wbp+dfr-f1"].argv
    assert dro[dro.index("--robust#method") + 1] == "groupdro" and dro[dro.index("--ppi#enabled") + 1] == "false"
    assert ppi_dfr[ppi_dfr.index("--robust#method") + 1] == "dfr" and "--ppi#mask" not in ppi_dfr  # the bundle's
    # the forms tried against the LIDC bar: the box mask with each form's overrides, every fold, an experiment apart
    tried = [j for j in jobs if j.meta.get("attempt")]
    assert len(tried) == len(LIDC_ATTEMPTS) * 5
    own = by_name["lidc-attempt-box_guide_own-f3"].argv
    assert own[own.index("--ppi#mask") + 1] == "box" and own[own.index("--ppi#guide") + 1] == "own"
    assert (
        own[own.index("--val_fold") + 1] == "3" and own[own.index("--experiment_name") + 1] == "results_lidc_attempts"
    )
    for sel in ("train", "last"):  # the digits' line attempts: under the benchmark's rule and at the last epoch
        argv = by_name[f"shortcut-attempts-{sel}"].argv
        assert argv[argv.index("--selection") + 1] == sel and argv[argv.index("--cue") + 1] == "line"
        assert "ppi:warmup_epochs=0" in argv and argv[argv.index("--outline-share") + 1] == "1"
    rm, re_ = by_name["lidc-random_mask-f2"].argv, by_name["lidc-random_erasing-f2"].argv
    assert rm[rm.index("--ppi#control") + 1] == "random_mask" and "--ppi#mask" not in rm
    assert re_[re_.index("--ppi#enabled") + 1] == "false" and float(re_[re_.index("--ppi#random_erasing") + 1]) > 0
    # each rotation holds out the fold after the one that chooses the checkpoint
    (box_f4,) = [j for j in lidc if j.name == "lidc-ppi_wbp_box-f4"]
    argv = box_f4.argv
    assert argv[argv.index("--val_fold") + 1] == "4" and argv[argv.index("--test_fold") + 1] == "0"
    assert argv[argv.index("--ppi#mask") + 1] == "box"
    assert {j.after for j in jobs if j.part == "saliency"} == {("ga-baseline-s0",), ("ga-ppi_wbp-s0",)}
    assert Path(jobs[-1].argv[1]).name == "bench_saliency_ppi.py"


@pytest.mark.slow
def test_report_lists_jobs_not_run_and_only_must_match(quick_study):
    out = quick_study
    argv = ["--out", str(out), "--profile", "quick", "--parts", "ga,saliency,lidc,cost", "--no-progress"]
    assert main([*argv, "--report-only"]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "**Not run yet: 1 of" in text and "cost: cost" in text
    with pytest.raises(SystemExit) as err:
        main([*argv, "--only", "nothing-*"])
    assert err.value.code == 2


@pytest.mark.slow
def test_quick_site_studies_report_their_own_numbers(tmp_path):
    assert main(["--out", str(tmp_path), "--profile", "quick", "--parts", "sites", "--no-progress"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## GA, site-wise cross-validation" in text and "## GA, trained on the confounded site only" in text
    assert "### How far the models lean on the watermark" in text
    # the comparators' tables: one per selection rule, the oracle labelled
    assert "## Which fix works here: the comparators" in text
    for sel in ("`train`", "`worst_site`", "`oracle` (an oracle)"):
        assert f"#### Selection {sel}" in text
    assert "| `dfr` |" in text and "Best pooled out-of-site AUC:" in text
    # the site matrices: one study per method, merged
    assert "### How it ran\n\n- merged from 3 studies run apart: baseline (`.../sites-baseline/cv`); ppi_wbp" in text
    matrices = text.split("### Every method against the baseline and PPI")[1].split("\n#")[0]
    assert "| `dfr` |" in matrices and "Best pooled out-of-site AUC:" in matrices
    cv = tmp_path / "jobs" / "sites-confounded" / "cv"
    pooled = json.loads((cv / "pooled_offdiag.json").read_text())["ppi_wbp"]
    assert f"pooled off-diagonal AUC {pooled['auc']:.3f} against {pooled['auc_reference']:.3f}" in text
    effects = pd.read_csv(cv / "cue_effect" / "cue_effect.csv")
    base = effects[effects.method == "baseline"]
    assert f"moves P(GA) by {(base.effect * base.n).sum() / base.n.sum():+.2f} for the baseline" in text


def test_study_methods_and_masks_come_from_the_registries():
    from pipelines.results.profiles import LIDC_SKIPPED_MASKS, lidc_masks, study_saliencies
    from ppi_med.ppi import MASKS
    from ppi_med.saliency import METHODS

    full = PROFILES["full"]
    assert sorted(full.saliencies) == sorted(METHODS) and full.saliencies[-1] == "wbp"
    assert full.lidc_masks == tuple(m for m in MASKS if m not in LIDC_SKIPPED_MASKS) and "topk" not in full.lidc_masks
    # a method or mask added to a registry reaches the study, in registry order (WBP, PPI's own, last)
    assert study_saliencies(("wbp", "new_map", "gradient")) == ("new_map", "gradient", "wbp")
    assert lidc_masks(("soft", "topk", "new_mask")) == ("soft", "new_mask")
    names = {j.name for j in build_jobs(Path("/tmp/x"), full, ["ga"], "sqlite://")}
    assert {f"ga-ppi_{s}-s0" for s in METHODS} <= names
    with pytest.raises(ValueError, match=r"saliencies \['nope'\] are not saliency methods"):
        Profile(seeds=1, saliencies=("nope",))
    with pytest.raises(ValueError, match=r"LIDC masks \['ring'\] are not PPI masks"):
        Profile(seeds=1, lidc_masks=("ring",))
    with pytest.raises(ValueError, match=r"ga_selections may hold only 'worst_site'"):
        Profile(seeds=1, ga_selections=("oracle",))  # the pooled GA data has nothing to be an oracle on


def test_every_bundle_path_is_read_from_one_place(tmp_path):
    jobs = build_jobs(tmp_path, PROFILES["full"], ["ga", "saliency", "lidc", "sites"], "sqlite://")
    configs = {j.argv[j.argv.index("--config_file") + 1] for j in jobs if "--config_file" in j.argv}
    # the saliency evaluation layers the saliency runs' config on the GA bundle
    assert f"['{BUNDLES['ga']}', '{BUNDLES['saliency']}']" in configs
    assert {c for c in configs if not c.startswith("[")} == {BUNDLES["ga"], BUNDLES["lidc"]}
    assert all((ROOT / path).is_file() for path in BUNDLES.values()), "BUNDLES names a bundle that is not there"
    assert f"The GA bundle (`{BUNDLES['ga']}`)" in "\n".join(render("ga", "intro", bundle=BUNDLES["ga"]))


def test_templates_fill_every_placeholder_and_ship_as_package_data():
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert render("report", "profile", profile="quick") == [
        "**Profile `quick`: toy sizes that test the machinery; its figures mean nothing.**"
    ]
    with pytest.raises(ValueError, match=r"report\.md, block 'profile': no value for profile"):
        render("report", "profile")
    with pytest.raises(ValueError, match=r"no placeholder for colour"):
        render("report", "profile", profile="quick", colour="red")
    with pytest.raises(ValueError, match=r"report\.md has no block 'footer'; it has header, profile, not_run"):
        render("report", "footer")
    with pytest.raises(ValueError, match=r"no report template 'nothing\.md'"):
        render("nothing", "intro")
    PKG = "pipelines.results"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = ROOT / "pipelines" / "results"
    shipped = [p for p in folder.rglob("*.md") if any(fnmatch(str(p.relative_to(folder)), g) for g in globs[PKG])]
    assert shipped and sorted(shipped) == sorted((folder / "templates").glob("*.md"))


def test_epoch_seconds_reads_the_bundle_consoles_epoch_lines(tmp_path):
    log = tmp_path / "log.txt"
    bar = "train [2/3]: [4/4] 100%|##########| [00:01<00:00]" + " " * 20
    log.write_text(
        "epoch 1/3  loss 0.7000  loss_cls 0.7000  val_auc 0.5000  2.0 s\n"
        f"{bar}epoch 2/3  loss 0.6000  loss_cls 0.6000  val_auc 0.6000  best 0.6000 (epoch 2)  4.5 s\n"
        "epoch 3/3  loss 0.9000  loss_cls 0.5000  loss_con 0.4000  val_auc 0.7000  best 0.7000 (epoch 3)  9.0 s\n"
    )
    assert epoch_seconds(log, until=2) == pytest.approx(3.25)
    assert epoch_seconds(log, after=2) == pytest.approx(9.0)
    assert math.isnan(epoch_seconds(log, after=3))


def test_goals_table_holds_each_bar_to_its_own_figure():
    from pipelines.results.sections import goals_section

    goals = {
        "ga_baseline": 0.915,
        "ga_reference": 0.65,
        "ga_ppi_wbp": 0.906,  # 0.009 below: within the no-harm bar
        "ga_switch_fall": (0.051, 5),
        "lidc_baseline": (0.916, 0.866, 0.966, 137, 40),
        "lidc_ppi_wbp_soft": (0.911, 0.86, 0.96, 137, 40),
        "lidc_ppi_wbp_box": (0.903, 0.85, 0.95, 137, 40),
        "lidc_random_mask": (0.80, 0.7, 0.9, 137, 40),  # a control, not a PPI setting
        "lidc_ppi_wbp+dfr": (0.85, 0.8, 0.9, 137, 40),  # a comparator on a PPI model, not a PPI setting either
        "confounded": {
            "out_diff": 0.139,
            "out_p": 4e-6,
            "cue": 0.122,
            "cue_base": 0.355,
            "own": 0.83,
            "own_base": 0.848,
        },
        "digits": {"patch": (0.579, 0.086), "line": (0.061, 0.047)},
        "wbp_tp_ppi_wbp": (0.314, 0.75, 16),
    }
    rows = {
        line.split(" | ")[0][2:]: line for line in goals_section(goals) if line.startswith("| ") and "---" not in line
    }
    status = {goal: line.rstrip(" |").rsplit("| ", 1)[1] for goal, line in rows.items()}
    assert status["GA: the default PPI's test AUC >= the baseline's - 0.01 (no harm)"] == "met"
    assert "0.906 against 0.915 (-0.009)" in rows["GA: the default PPI's test AUC >= the baseline's - 0.01 (no harm)"]
    fall = "GA: after PPI switches on, no validation epoch more than 0.05 below the warm-up's last"
    assert status[fall] == "**not met**" and "largest fall 0.051 over 5 seeds" in rows[fall]
    lidc = "LIDC: no PPI setting more than 0.01 below the baseline's pooled AUC"
    assert status[lidc] == "**not met**" and "worst `ppi_wbp_box` -0.013" in rows[lidc]  # the control is left out
    payoff = [g for g in status if g.startswith("Trained on the watermarked site") or g.startswith("...")]
    assert [status[g] for g in payoff] == ["met", "met", "met"]  # own eyes 0.018 below: within 0.02
    digits = {g.split("`")[1]: s for g, s in status.items() if g.startswith("Digits")}
    assert digits == {"line": "**not met**", "patch": "met"}
    wbp = "WBP of the PPI model on true positives: share inside the lesion >= 0.3, pointing >= 0.8"
    assert status[wbp] == "**not met**" and "0.314, 0.750 (16 eyes)" in rows[wbp]
    assert goals_section({}) == []


def _fake_lidc_run(out: Path, job: Job, images: list[str], labels: np.ndarray, prob: np.ndarray, val_auc: float):
    """What a finished LIDC job leaves: its record, held-out predictions and metrics."""
    run = out / "jobs" / job.name / "runs" / "run-1"
    run.mkdir(parents=True)
    (out / "jobs" / job.name / "done.json").write_text("{}")
    pd.DataFrame({"image": images, "label": labels, "prob": prob}).to_csv(run / "test_predictions.csv", index=False)
    records = [{"kind": "param", "key": "checkpoint_from_epoch", "value": "1"}]
    records += [
        {"kind": "metric", "key": "val_auc", "value": v, "step": s} for s, v in ((1, val_auc - 0.1), (2, val_auc))
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))


def test_attempts_are_pooled_apart_from_the_lidc_table_and_the_goals(tmp_path):
    from pipelines.results.sections import attempts_section, lidc_section

    profile = Profile(
        seeds=1, lidc_folds=2, lidc_masks=("box",), lidc_controls=(), comparators=(), lidc_attempts=LIDC_ATTEMPTS[:1]
    )
    jobs = build_jobs(tmp_path, profile, ["lidc", "shortcut"], "sqlite://")
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1], 20)
    noise = {"baseline": 0.6, "ppi_wbp_box": 0.7, "box_std_0.8": 1.5}  # the attempt reads the label worst
    validation = {"baseline": 0.0, "ppi_wbp_box": 0.01, "box_std_0.8": 0.02}  # ... but validates best
    frames: dict[str, list[pd.DataFrame]] = {v: [] for v in noise}
    for job in (j for j in jobs if j.part == "lidc"):
        v, fold = job.meta["variant"], job.meta["fold"]
        images = [f"n{fold}-{i}" for i in range(len(labels))]
        prob = 1 / (1 + np.exp(-(labels - 0.5 + noise[v] * rng.standard_normal(len(labels)))))
        _fake_lidc_run(tmp_path, job, images, labels, prob, val_auc=0.9 + 0.01 * fold + validation[v])
        frames[v].append(pd.DataFrame({"label": labels, "prob": prob}))
    pooled = {v: auc_ci(pd.concat(f)["label"], pd.concat(f)["prob"]).auc for v, f in frames.items()}

    goals: dict = {}
    table = lidc_section(tmp_path, jobs, client=None, goals=goals)
    assert set(goals) == {"lidc_baseline", "lidc_ppi_wbp_box"}  # the attempt neither in the goals ...
    assert not any("box_std" in line for line in table)  # ... nor in the table
    best = max(("baseline", "ppi_wbp_box"), key=pooled.get)
    assert f"Best pooled held-out AUC: `{best}` ({pooled[best]:.3f})." in table

    lines = attempts_section(tmp_path, jobs, tmp_path / "fig")
    (row,) = [line for line in lines if line.startswith("| `box_std_0.8`")]
    diff = pooled["box_std_0.8"] - pooled["baseline"]
    assert f"| {pooled['box_std_0.8']:.3f} [" in row and f"| {diff:+.3f} |" in row
    assert "| 0.925 |" in row  # the best validation AUC of each fold's chosen checkpoint, mean over folds
    # validation, all a user has, picks the attempt over the table's row
    (chosen,) = [line for line in lines if line.startswith("Chosen per mask")]
    assert (
        f"box: `box_std_0.8` (0.925 against 0.915), {diff:+.3f}" in chosen
        and "margin behind a choice is 0.010" in chosen
    )
    where = "within 0.01 of it" if diff >= -0.01 else "more than 0.01 below it"
    closest = [line for line in lines if line.startswith("Closest to the bar")]
    assert closest and closest[0].startswith(
        f"Closest to the bar on the box: `box_std_0.8`, {diff:+.3f} against the baseline, {where}."
    )
    assert any(line.startswith("| `ppi_wbp_box` (the table's") for line in lines)  # the row the form would replace
    assert not any(line.startswith("### Digits") for line in lines)  # the line attempts did not run

    summary = tmp_path / "jobs" / "shortcut-attempts-train" / "out" / "line"
    summary.mkdir(parents=True)
    pd.DataFrame(
        {
            "method": ["baseline", "ppi_wbp", "ppi_wbp:warmup_epochs=0", "ppi_wbp:w_con=3.0"],
            "reversed_auc_delta": [0.0, 0.061, 0.35, 0.8],
            "reversed_auc_p": [np.nan, 0.1, 0.01, 0.001],
            "free_auc_delta": [0.0, 0.047, -0.05, 0.1],  # the larger gain costs the digit: not the bar
            "aligned_auc_mean": [0.965, 0.966, 0.93, 0.51],  # the last reads the cue backwards
        }
    ).to_csv(summary / "summary.csv", index=False)
    lines = attempts_section(tmp_path, jobs, tmp_path / "fig")
    assert "| `ppi_wbp:warmup_epochs=0` | +0.350 (0.010) | -0.050 | 0.930 | | | |" in lines
    best = [line for line in lines if line.startswith("Best under `train`")]
    assert best and "`ppi_wbp:warmup_epochs=0`, +0.350" in best[0] and "(not met:" in best[0]
    backwards = [line for line in lines if line.startswith("`ppi_wbp:w_con=3.0` gains +0.800")]
    assert backwards and "falls to 0.510" in backwards[0]


def test_a_second_run_on_a_study_folder_in_use_stops_and_names_the_first(tmp_path, capsys):
    from pipelines.results.lock import study_lock

    argv = ["--out", str(tmp_path), "--profile", "quick", "--parts", "cost", "--report-only", "--no-progress"]
    with study_lock(tmp_path):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
        message = capsys.readouterr().err
        assert f"{tmp_path} is in use by make results (pid {os.getpid()}" in message
        assert not (tmp_path / "RESULTS.md").exists() and not (tmp_path / "jobs").exists()
    assert main(argv) == 0 and (tmp_path / "RESULTS.md").is_file()  # free again once the first has ended
