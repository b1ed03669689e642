"""``make results``: every experiment behind ``docs/RESULTS.md``, run from scratch and logged to MLflow.

Parts (each a set of independent jobs, every job a real command a user could type)::

    ga        table 2.2 form: the GA bundle, baseline and PPI with each saliency (gradient, input x gradient,
              Grad-CAM, LRP, WBP), pooled training, seeds 0..S-1, each scored on its held-out test part
              (``test_fraction``) with the linear reference of the same split
    sites     table 2.3 form: ``pipelines.site_cv`` for baseline and PPI-WBP, the confounded site D among
              the training sites, S seeds, DeLong p-values and the pooled off-diagonal test; and the
              confounded study: trained on site D alone (its watermark marks GA), scored on sites without
              the watermark and on site C, generated with the correlation reversed, 5 seeds, with the cue
              effect of its models (:mod:`pipelines.cue_effect`)
    lidc      tables 2.4/2.5 form: the LIDC bundle, baseline and PPI-WBP with each mask (soft, adaptive soft,
              hard point, box), rotating the held-out fold over every patient-level fold; the folds' test
              predictions are pooled, so every labelled nodule is scored once by a model that neither trained on
              it nor chose its checkpoint on it (DeLong CI, DeLong paired test against the baseline)
    saliency  figures 2.4/2.6 form: deletion curves and localisation of every saliency method on the seed-0 GA
              baseline and PPI-WBP models (test part), with WBP's localisation on the true positives
    shortcut  the shortcut benchmark (:mod:`pipelines.shortcut`, patch and line cues, default grid), the outline
              study, and the comparators' grid on the four cues under each selection rule
    (every part with methods runs the comparators GroupDRO, JTT, DFR and PPI+DFR beside PPI; the confounded
    study also under ``worst_site`` and ``oracle`` selection, and ``comparisons`` tables them against the
    baseline and PPI: :mod:`pipelines.comparisons`)
    cost      epoch time and peak memory per method (from the GA jobs), PPI step cost in both modes and the
              time of each saliency method (``benchmarks/bench_saliency_ppi.py``)

Every job writes into ``OUT/jobs/<name>/`` and leaves ``done.json`` (exit code, wall time, peak memory, the
commit it ran at) when it succeeds; a rerun into the same ``OUT`` skips finished jobs, so an interrupted
study resumes. All runs log to one MLflow store, ``OUT/mlflow.db`` unless ``--tracking-uri`` is given. The
report, ``OUT/RESULTS.md`` with its figures under ``OUT/results/``, is made from the job outputs alone;
``--publish DIR`` also copies it to ``DIR/RESULTS.md`` and ``DIR/results/``.

CPU budget of the full study (``--profile full``, the default) on 2 cores with ``--workers 2``: see the
header of ``docs/RESULTS.md``, which records the measured wall time of every part. ``--profile quick`` runs
the same jobs at toy sizes (a minute or two; the test suite uses it); its numbers mean nothing.

CLI::

    python -m pipelines.results --out runs/results --publish docs          # make results
    python -m pipelines.results --out /tmp/r --profile quick --parts ga,lidc
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ppi_med.methods import method_settings
from ppi_med.saliency import METHODS
from ppi_med.stats import auc_ci, delong_test
from ppi_med.tracking import ensure_experiment, git_commit

from .report import mean_sd

__all__ = ["PARTS", "PROFILES", "Job", "Profile", "build_jobs", "main", "run_jobs", "write_report"]

PARTS = ("ga", "sites", "lidc", "saliency", "shortcut", "cost")
SALIENCIES = ("gradient", "input_x_gradient", "gradcam", "lrp", "wbp")
LIDC_MASKS = ("soft", "soft_adaptive", "hard", "box")
CONTROLS = ("ppi_wbp_partner_zero", "random_mask", "random_erasing")
#: the established fixes beside PPI (docs/DESIGN.md section 9)
COMPARATOR_METHODS = ("groupdro", "jtt", "dfr", "ppi_wbp+dfr")
#: the model-selection rules of the comparison (``oracle`` only where a cue-decorrelated part exists)
SELECTIONS = ("train", "worst_site", "oracle")
#: the outline study's methods: the default (other-class fill), the zero fill, and the default at random places
OUTLINE_METHODS = ("baseline", "ppi", "ppi:fill=zero", "random_mask")
ROOT = Path(__file__).resolve().parents[1]
GPU_FIGURES = ROOT / "docs" / "gpu"
EXPERIMENTS = ("results_ga", "results_site_cv", "results_lidc", "results_saliency", "results_shortcut")


@dataclass(frozen=True)
class Profile:
    """Sizes of a study.

    Attributes:
        seeds: GA and site-CV seeds.
        ga: overrides of the GA bundle (on top of the held-out split).
        sites: extra arguments of ``pipelines.site_cv``.
        confounded: extra arguments of the confounded study (trained on the watermarked site only, scored on
            every site, one of them generated with the watermark's correlation reversed).
        confounded_seeds: its seeds (more than the other parts: one site's 20 training eyes make models that
            differ much from seed to seed in how far they lean on the watermark).
        lidc: overrides of the LIDC bundle.
        lidc_folds: patient-level folds of the LIDC datalist, each held out once.
        lidc_data: ``default`` (the bundle's phantom) or ``small`` (three thinned phantom patients).
        shortcut: arguments of ``pipelines.shortcut``.
        outline_shares: the shares of outlined training digits of the outline study (one shortcut job each).
        outlines: the outline study's other arguments.
        bench: arguments of the benchmark script.
        eval_ks: deletion sizes of the saliency evaluation.
        saliencies: the PPI saliencies of the GA table.
        lidc_masks: the PPI-WBP masks of the LIDC table.
        ga_controls, site_controls: the other methods of the GA table and the site studies: the pairing of the
            earlier default (``ppi_wbp_partner_zero``) and the two controls (docs/DESIGN.md section 4.5).
        comparators: the comparators of the GA table and the site studies (docs/DESIGN.md section 9).
        oracle_site: the confounded study's cue-reversed site, which ``oracle`` selection validates on.
        comparator_shortcut: arguments of the shortcut comparators' jobs (one per selection rule).
    """

    seeds: int
    ga: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    confounded: tuple[str, ...] = ("--train-sites", "D", "--synthetic#reversed_cue_site", "C")
    confounded_seeds: int = 5
    lidc: tuple[str, ...] = ()
    lidc_folds: int = 5
    lidc_data: str = "default"
    shortcut: tuple[str, ...] = ("--cue", "patch,line", "--grid", "default", "--seeds", "5")
    outline_shares: tuple[float, ...] = (0.1, 0.3, 1.0)
    outlines: tuple[str, ...] = ("--cue", "patch,line", "--seeds", "5")
    bench: tuple[str, ...] = ()
    eval_ks: str = "[100,500,1000,5000,10000]"
    saliencies: tuple[str, ...] = SALIENCIES
    lidc_masks: tuple[str, ...] = LIDC_MASKS
    ga_controls: tuple[str, ...] = CONTROLS
    site_controls: tuple[str, ...] = CONTROLS
    comparators: tuple[str, ...] = COMPARATOR_METHODS
    oracle_site: str = "C"
    comparator_shortcut: tuple[str, ...] = (
        "--cue", "patch,line,intensity,texture", "--grid", "comparators", "--seeds", "5",
    )  # fmt: skip


_TINY_GA = (
    "--synthetic#sites", "['A','B','C','D']", "--synthetic#subjects_per_site", "8", "--synthetic#n_bscans", "4",
    "--synthetic#height", "32", "--synthetic#width", "48", "--spatial_size", "[4,32,48]",
    "--network_def#width", "4", "--batch_size", "4", "--max_epochs", "2", "--ppi#warmup_epochs", "1",
)  # fmt: skip

_TINY_SITES = (*_TINY_GA, "--sites", "A,B,D", "--synthetic#sites", "['A','B','D']", "--min-steps", "0")

PROFILES = {
    "full": Profile(seeds=5),
    "quick": Profile(
        seeds=1,
        ga=_TINY_GA,
        sites=_TINY_SITES,
        confounded=(*_TINY_SITES, "--train-sites", "D", "--synthetic#reversed_cue_site", "B"),
        confounded_seeds=1,
        lidc=("--max_epochs", "2", "--network_def#width", "4", "--batch_size", "4", "--ppi#warmup_epochs", "1"),
        lidc_folds=3,
        lidc_data="small",
        shortcut=("--cue", "patch", "--grid", "default", "--seeds", "1", "--epochs", "1"),
        outline_shares=(1.0,),
        outlines=("--cue", "patch", "--seeds", "1", "--epochs", "1"),
        bench=("--repeats", "1", "--warmup", "0", "--skip-saliency"),
        eval_ks="[10,100]",
        saliencies=("wbp",),
        lidc_masks=("soft",),
        ga_controls=(),
        site_controls=(),
        comparators=("dfr",),
        oracle_site="B",
        comparator_shortcut=("--cue", "patch", "--methods", "baseline", "ppi", "dfr", "--seeds", "1", "--epochs", "1"),
    ),
}


@dataclass
class Job:
    """One command of the study: ``argv`` run with its working directory at the repository root.

    Attributes:
        name: unique folder name under ``OUT/jobs``.
        part: the part it belongs to.
        argv: the command.
        after: jobs that must have finished first.
        meta: what the report needs to know about it (method, seed, fold...).
    """

    name: str
    part: str
    argv: list[str]
    after: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)


def _bundle(config: str, run_id: str = "run") -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]


def _tracked_run(out: Path, job: str, experiment: str) -> list[str]:
    """Bundle overrides that put a training job's run folder in its job folder and tag its MLflow run."""
    return [
        "--runs_dir",
        str(out / "jobs" / job / "runs"),
        "--experiment_name",
        experiment,
        "--run_tags",
        json.dumps({"results_job": job}),
    ]


def _ppi_args(method: str, mask: str = "soft") -> list[str]:
    """The bundle overrides of a method name (PPI's fields, and the comparator's when it names one)."""
    settings = method_settings(method, METHODS)
    if settings["ppi"].get("enabled", True) and mask != "soft":
        settings["ppi"]["mask"] = mask
    if settings["robust"]["method"] == "erm":  # the bundle's own default: the command line stays as before
        del settings["robust"]
    return [
        arg
        for part, fields in settings.items()
        for k, v in fields.items()
        for arg in (f"--{part}#{k}", v if isinstance(v, str) else json.dumps(v))
    ]


def build_jobs(out: Path, profile: Profile, parts: Sequence[str], tracking_uri: str) -> list[Job]:
    """Every job of the chosen parts (the ``saliency`` part needs the ``ga`` jobs of seed 0)."""
    jobs: list[Job] = []
    common = ["--tracking_uri", tracking_uri]
    ga_data = ["--default_dataset_dir", str(out / "data" / "ga"), "--dataset_dir", str(out / "data" / "ga")]
    ga_split = ["--test_fraction", "0.25"]
    methods = ("baseline", *(f"ppi_{s}" for s in profile.saliencies), *profile.ga_controls, *profile.comparators)
    if "ga" in parts or "saliency" in parts:
        for seed in range(profile.seeds):
            for method in methods:
                if "ga" not in parts and not (seed == 0 and method in ("baseline", "ppi_wbp")):
                    continue
                name = f"ga-{method}-s{seed}"
                jobs.append(
                    Job(
                        name,
                        "ga",
                        [
                            *_bundle("bundles/ga_ppi.json"),
                            *common,
                            *ga_data,
                            *ga_split,
                            "--seed",
                            str(seed),
                            *_tracked_run(out, name, "results_ga"),
                            *_ppi_args(method),
                            *profile.ga,
                        ],
                        meta={"method": method, "seed": seed},
                    )
                )
    if "saliency" in parts:
        for method in ("baseline", "ppi_wbp"):
            train = f"ga-{method}-s0"
            name = f"saliency-{method}"
            jobs.append(
                Job(
                    name,
                    "saliency",
                    [
                        *_bundle("bundles/ga_ppi.json", "evaluate_saliency"),
                        *common,
                        *ga_data,
                        *ga_split,
                        "--seed",
                        "0",
                        "--runs_dir",
                        str(out / "jobs" / train / "runs"),
                        "--eval_dir",
                        str(out / "jobs" / name / "eval"),
                        "--eval_datalist",
                        "@test#datalist",
                        "--eval_ks",
                        profile.eval_ks,
                        "--experiment_name",
                        "results_saliency",
                        *_ppi_args(method),
                        *profile.ga,
                    ],
                    after=(train,),
                    meta={"method": method, "train_job": train},
                )
            )
    if "sites" in parts:
        oracle = ("--oracle-sites", profile.oracle_site)
        for name, data, extra, seeds in (
            ("sites", "ga_sites", profile.sites, profile.seeds),
            ("sites-confounded", "ga_sites_rev", profile.confounded, profile.confounded_seeds),
            *(
                (
                    f"sites-confounded-{sel}",
                    "ga_sites_rev",
                    (*profile.confounded, "--selection", sel, *oracle[: 2 * (sel == "oracle")]),
                    profile.confounded_seeds,
                )
                for sel in SELECTIONS[1:]
            ),
        ):
            jobs.append(
                Job(
                    name,
                    "sites",
                    [
                        sys.executable,
                        "-m",
                        "pipelines.site_cv",
                        "--config_file",
                        "bundles/ga_ppi.json",
                        "--methods",
                        ",".join(("baseline", "ppi_wbp", *profile.site_controls, *profile.comparators)),
                        "--seeds",
                        str(seeds),
                        "--out",
                        str(out / "jobs" / name / "cv"),
                        "--tracking-uri",
                        tracking_uri,
                        "--experiment",
                        "results_site_cv",
                        "--no-progress",
                        "--num-threads",
                        "1",
                        "--default_dataset_dir",
                        str(out / "data" / data),
                        "--dataset_dir",
                        str(out / "data" / data),
                        *extra,
                    ],
                )
            )
        for sel in SELECTIONS:
            study = "sites-confounded" if sel == "train" else f"sites-confounded-{sel}"
            jobs.append(
                Job(
                    "sites-cue" if sel == "train" else f"sites-cue-{sel}",
                    "sites",
                    [
                        *(sys.executable, "-m", "pipelines.cue_effect"),
                        *(str(out / "jobs" / study / "cv"), "--no-progress"),
                    ],
                    after=(study,),
                )
            )
    if "lidc" in parts:
        lidc_data = ["--dataset_dir", str(out / "data" / "lidc" / "patches")] if profile.lidc_data == "small" else []
        for variant in ("baseline", *(f"ppi_wbp_{m}" for m in profile.lidc_masks)):
            method, mask = ("baseline", "soft") if variant == "baseline" else ("ppi_wbp", variant[len("ppi_wbp_") :])
            for fold in range(profile.lidc_folds):
                name = f"lidc-{variant}-f{fold}"
                jobs.append(
                    Job(
                        name,
                        "lidc",
                        [
                            *_bundle("bundles/lidc_ppi.json"),
                            *common,
                            *lidc_data,
                            "--val_fold",
                            str(fold),
                            "--test_fold",
                            str((fold + 1) % profile.lidc_folds),
                            *_tracked_run(out, name, "results_lidc"),
                            *_ppi_args(method, mask),
                            *profile.lidc,
                        ],
                        meta={"variant": variant, "fold": fold},
                    )
                )
    if "shortcut" in parts:
        jobs.append(
            Job(
                "shortcut",
                "shortcut",
                [
                    sys.executable,
                    "-m",
                    "pipelines.shortcut",
                    "--out",
                    str(out / "jobs" / "shortcut" / "out"),
                    "--tracking-uri",
                    tracking_uri,
                    "--experiment",
                    "results_shortcut",
                    "--num-threads",
                    "1",
                    *profile.shortcut,
                ],
            )
        )
        for share in profile.outline_shares:
            name = f"shortcut-outlines-{share:g}"
            jobs.append(
                Job(
                    name,
                    "shortcut",
                    [
                        *(sys.executable, "-m", "pipelines.shortcut", "--out", str(out / "jobs" / name / "out")),
                        *("--tracking-uri", tracking_uri, "--experiment", "results_shortcut", "--num-threads", "1"),
                        *("--outline-share", f"{share:g}", "--methods", *OUTLINE_METHODS),
                        *profile.outlines,
                    ],
                    meta={"share": share},
                )
            )
        for sel in SELECTIONS:
            name = f"shortcut-comparators-{sel}"
            jobs.append(
                Job(
                    name,
                    "shortcut",
                    [
                        *(sys.executable, "-m", "pipelines.shortcut", "--out", str(out / "jobs" / name / "out")),
                        *("--tracking-uri", tracking_uri, "--experiment", "results_shortcut", "--num-threads", "1"),
                        *("--selection", sel, *profile.comparator_shortcut),
                    ],
                    meta={"selection": sel},
                )
            )
    if "cost" in parts:
        jobs.append(
            Job(
                "cost",
                "cost",
                [
                    sys.executable,
                    str(ROOT / "benchmarks" / "bench_saliency_ppi.py"),
                    "--json",
                    str(out / "jobs" / "cost" / "bench.json"),
                    *profile.bench,
                ],
            )
        )
    return jobs


def _done(out: Path, job: Job) -> Path:
    return out / "jobs" / job.name / "done.json"


def run_jobs(jobs: Sequence[Job], out: Path, *, workers: int = 2, threads: int = 1, progress: bool = True) -> None:
    """Run every unfinished job, ``workers`` at a time, each with ``threads`` CPU threads.

    A job's output goes to ``OUT/jobs/<name>/log.txt``; on success ``done.json`` records exit code, wall time,
    peak resident memory (of the job's process, from ``wait4``) and the commit. A failed job's log is kept and
    named; the others still run.

    Raises:
        RuntimeError: some jobs failed (each named with its log), or a job waits on a failed one.
    """
    pending = [j for j in jobs if not _done(out, j).is_file()]
    names = {j.name for j in jobs}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    commit = git_commit(ROOT)
    running: dict[int, tuple[Job, float, object]] = {}
    failed: list[str] = []
    bar = tqdm(total=len(pending), desc="results", unit="job", disable=not progress)
    while pending or running:
        ready = [j for j in pending if all((out / "jobs" / a / "done.json").is_file() for a in j.after if a in names)]
        blocked = [j for j in pending if any(a in failed for a in j.after)]
        for j in blocked:
            pending.remove(j)
            failed.append(j.name)
            bar.update(1)
        while ready and len(running) < workers:
            job = ready.pop(0)
            if job not in pending:
                continue
            pending.remove(job)
            folder = out / "jobs" / job.name
            if folder.exists():  # an interrupted or failed earlier attempt: kept aside, never overwritten
                folder.rename(folder.with_name(f"{job.name}.attempt-{time.strftime('%Y%m%d-%H%M%S')}"))
            folder.mkdir(parents=True)
            log = open(folder / "log.txt", "a")
            log.write(f"$ {' '.join(job.argv)}\n")
            log.flush()
            proc = subprocess.Popen(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (job, time.perf_counter(), log)
        if not running:
            if pending:  # waiting on jobs outside this run that never finished
                raise RuntimeError(f"jobs wait on unfinished jobs: {[j.name for j in pending]}")
            break
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, t0, log = running.pop(pid)
        log.close()
        rc = os.waitstatus_to_exitcode(status)
        bar.update(1)
        if rc != 0:
            failed.append(job.name)
            tqdm.write(f"job {job.name} failed (exit {rc}); see {out / 'jobs' / job.name / 'log.txt'}")
            continue
        record = {
            "job": job.name,
            "part": job.part,
            "returncode": rc,
            "wall_s": round(time.perf_counter() - t0, 1),
            # ru_maxrss is in KiB on Linux
            "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "commit": commit,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "meta": job.meta,
        }
        _done(out, job).write_text(json.dumps(record, indent=1))
    bar.close()
    if failed:
        logs = ", ".join(f"{n} ({out / 'jobs' / n / 'log.txt'})" for n in failed)
        raise RuntimeError(f"{len(failed)} job(s) failed or could not run: {logs}")


def prepare_data(out: Path, profile: Profile, parts: Sequence[str]) -> None:
    """Data the jobs share, made once before they start (so parallel jobs never build it twice).

    The GA data sets are made by the bundle's own default path on first use; here they are built up front
    by the same function. The LIDC data is the bundle's default phantom, or for the small profile three
    phantom patients with every third slice.
    """
    from data_prep.defaults import ga_datalist

    if {"ga", "saliency", "sites"} & set(parts):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(ROOT / "bundles" / "ga_ppi.json"))
        synthetic = dict(parser.get("synthetic"))
        sets = {"ga": profile.ga, "ga_sites": profile.sites, "ga_sites_rev": profile.confounded}
        for name, extra in sets.items():
            if name == "ga" and not {"ga", "saliency"} & set(parts) or name != "ga" and "sites" not in parts:
                continue
            spec = dict(synthetic, **_synthetic_overrides(extra))
            folder = out / "data" / name
            ga_datalist(folder, folder, **spec)
    if "lidc" in parts:
        if profile.lidc_data == "small":
            from data_prep.lidc import preprocess
            from data_prep.lidc_phantom import TEST_PATIENTS, TEST_SLICE_STEP, write_phantom

            patients = [*TEST_PATIENTS, "LIDC-IDRI-0749"]
            root = out / "data" / "lidc"
            write_phantom(root / "dicom", patients, slice_step=TEST_SLICE_STEP, progress=False)
            preprocess(root / "dicom", root / "patches", patients=patients, folds=profile.lidc_folds, progress=False)
        else:
            from data_prep.defaults import lidc_datalist

            lidc_datalist(ROOT / "data" / "lidc_phantom", ROOT / "data" / "lidc_phantom")


def _synthetic_overrides(argv: Sequence[str]) -> dict:
    """``--synthetic#key value`` pairs of an override list, parsed as the bundle CLI parses them."""
    import ast

    found = {}
    for key, value in zip(argv[::1], argv[1::1]):
        if key.startswith("--synthetic#"):
            try:
                found[key[len("--synthetic#") :]] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                found[key[len("--synthetic#") :]] = value
    return found


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _predictions(out: Path, job: str) -> pd.DataFrame | None:
    found = sorted((out / "jobs" / job / "runs").glob("*/test_predictions.csv"))
    return pd.read_csv(found[-1]) if found else None


def _run_metrics(client, experiment: str, job: str) -> dict[str, float]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.results_job = '{job}'", max_results=1)
    if not runs:
        return {}
    metrics = dict(runs[0].data.metrics)
    # the run's val_auc is the last epoch's; the chosen checkpoint's is the best of the epochs it was chosen from
    first = int(runs[0].data.params.get("checkpoint_from_epoch", 1))
    history = client.get_metric_history(runs[0].info.run_id, "val_auc")
    metrics["best_val_auc"] = max((m.value for m in history if m.step >= first), default=float("nan"))
    return metrics


def _delong_p(base: pd.DataFrame | None, other: pd.DataFrame | None) -> float:
    if base is None or other is None:
        return float("nan")
    merged = base.merge(other, on=["image", "label"], suffixes=("_a", "_b"))
    if len(merged) != len(base) or merged["label"].nunique() < 2:
        return float("nan")
    return delong_test(merged["label"], merged["prob_b"], merged["prob_a"]).p_value


def _goals_section(goals: dict) -> list[str]:
    """The goals set for the models, each with the figure below that measures it and whether it is met."""
    rows = []

    def row(goal: str, figure: str, met: bool | None) -> None:
        rows.append(f"| {goal} | {figure} | {'n/a' if met is None else 'met' if met else '**not met**'} |")

    base, ref, ppi = goals.get("ga_baseline"), goals.get("ga_reference"), goals.get("ga_ppi_wbp")
    if base is not None and ref is not None:
        row("GA baseline test AUC >= 0.90 and >= the linear reference", f"{base:.3f} (reference {ref:.3f})",
            base >= 0.90 and base >= ref)  # fmt: skip
    if base is not None and ppi is not None:
        row("GA PPI-WBP at or above the baseline", f"{ppi:.3f} against {base:.3f}", ppi >= base)
    lidc = goals.get("lidc_baseline")
    if lidc is not None:
        auc, lo, hi, n, patients = lidc
        row("LIDC held-out AUC >= 0.85", f"{auc:.3f} [{lo:.3f}, {hi:.3f}], {n} nodules of {patients} patients",
            auc >= 0.85)  # fmt: skip
    tp = goals.get("wbp_tp_ppi_wbp")
    if tp is not None:
        share, pointing, n = tp
        row("WBP of the PPI model on true positives: share inside the lesion >= 0.3, pointing >= 0.8",
            f"{share:.3f}, {pointing:.3f} ({n} eyes)", share >= 0.3 and pointing >= 0.8)  # fmt: skip
    if not rows:
        return []
    return [
        "## Goals",
        "",
        "The goals set for the models, with the figure of this document that measures each (means over seeds "
        "where there are seeds). Where one is not met, the sections below show the best figure reached; the "
        'variants tried are in docs/DESIGN.md section 4.2 and the README\'s "Does PPI pay off?".',
        "",
        "| goal | measured | status |",
        "|---|---|---|",
        *rows,
        "",
    ]


def _ga_section(out: Path, jobs: Sequence[Job], client, goals: dict) -> list[str]:
    ga = [j for j in jobs if j.part == "ga"]
    seeds = sorted({j.meta["seed"] for j in ga})
    methods = list(dict.fromkeys(j.meta["method"] for j in ga))
    preds = {(j.meta["method"], j.meta["seed"]): _predictions(out, j.name) for j in ga}
    metrics = {(j.meta["method"], j.meta["seed"]): _run_metrics(client, "results_ga", j.name) for j in ga}
    lines = [
        "## GA, pooled training (table 2.2 form)",
        "",
        "The GA bundle (`bundles/ga_ppi.json`) on its embedded synthetic default, every site pooled, split per seed "
        "into training, checkpoint selection (validation) and a held-out test part (`test_fraction` 0.25) that "
        "neither trains nor chooses the checkpoint. Test AUC: mean ± sd over seeds; p: DeLong's paired test "
        "against the baseline on the same test eyes, per seed. The linear reference is an L2 logistic regression "
        "on the same preprocessed voxels and split (`ppi_med.reference`).",
        "",
        "| method | test AUC | per seed | DeLong p vs baseline, per seed | best val AUC |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        aucs, ps, vals = [], [], []
        for s in seeds:
            p = preds.get((m, s))
            aucs.append(auc_ci(p["label"], p["prob"]).auc if p is not None and p["label"].nunique() == 2 else np.nan)
            ps.append(np.nan if m == "baseline" else _delong_p(preds.get(("baseline", s)), p))
            vals.append(metrics[(m, s)].get("best_val_auc", np.nan))
        pcol = "" if m == "baseline" else ", ".join(_fmt(x) for x in ps)
        goals[f"ga_{m}"] = float(np.nanmean(aucs)) if np.isfinite(aucs).any() else np.nan
        lines.append(f"| {m} | {mean_sd(aucs)} | {', '.join(_fmt(a) for a in aucs)} | {pcol} | {mean_sd(vals)} |")
    ref = [metrics[("baseline", s)].get("ref_test_auc", np.nan) for s in seeds if ("baseline", s) in metrics]
    goals["ga_reference"] = float(np.nanmean(ref)) if np.isfinite(ref).any() else np.nan
    n = [len(preds[("baseline", s)]) for s in seeds if preds.get(("baseline", s)) is not None]
    lines += [
        f"| linear reference | {mean_sd(ref)} | {', '.join(_fmt(a) for a in ref)} | | |",
        "",
        f"Test eyes per seed: {', '.join(map(str, n))}.",
        "",
    ]
    return lines


_SITE_STUDIES = {
    "sites": (
        "GA, site-wise cross-validation (table 2.3 form)",
        "`pipelines.site_cv`: a model per training site (site D carries the label-correlated watermark), scored on "
        "the held-out subjects of its own site (the diagonal, apart from the checkpoint-selection part) and on "
        "every other site; baseline and PPI-WBP, DeLong's paired test per cell. Its own summary follows.",
    ),
    "sites-confounded": (
        "GA, trained on the confounded site only",
        "`pipelines.site_cv --train-sites D`: models trained on site D alone, where the watermark marks 90 % of "
        "the GA eyes and 10 % of the others, scored on D's held-out test subjects, on sites A and B (no "
        "watermark) and on site C, generated with the correlation reversed (the watermark on the eyes without "
        "GA). A model that leans on the watermark falls below 0.5 on C; this is the shift PPI is built for. "
        "AUC on C also pays for reading the lesion at a site never seen, so the cue effect "
        "(`pipelines.cue_effect`) measures the lean on the watermark alone: every eye is rendered again from "
        "its own seed with the watermark toggled and scored by every model. The study's own summary follows.",
    ),
}


def _sites_verdict(cv: Path) -> list[str]:
    """What the study's numbers say about PPI, in words, from its own output files."""
    pooled = cv / "pooled_offdiag.json"
    if not pooled.is_file():
        return []
    lines = []
    for method, r in json.loads(pooled.read_text()).items():
        verdict = "beats" if r["auc_diff"] > 0 and r["p_value"] < 0.05 else "does not beat"
        lines.append(
            f"**{method} {verdict} the baseline out of site here:** pooled off-diagonal AUC {r['auc']:.3f} against "
            f"{r['auc_reference']:.3f} over {r['n_cases']} cases (DeLong p = {r['p_value']:.2g})."
        )
    cue = cv / "cue_effect" / "cue_effect.csv"
    if cue.is_file():
        table = pd.read_csv(cue)
        by_seed = table.groupby(["method", "seed"]).apply(lambda g: np.average(g.effect, weights=g.n)).unstack(0)
        if "baseline" in by_seed:
            for method in [m for m in by_seed if m != "baseline"]:
                lines.append(
                    f"The watermark alone moves P(GA) by {by_seed['baseline'].mean():+.2f} for the baseline and "
                    f"{by_seed[method].mean():+.2f} for {method} (mean over eyes and seeds; lower by "
                    f"{by_seed['baseline'].mean() - by_seed[method].mean():.2f} in "
                    f"{int((by_seed[method] < by_seed['baseline']).sum())} of {len(by_seed)} seeds)."
                )
    return [" ".join(lines)]


def _sites_section(out: Path, fig_dir: Path) -> list[str]:
    lines: list[str] = []
    for job, (title, intro) in _SITE_STUDIES.items():
        cv = out / "jobs" / job / "cv"
        summary = cv / "summary.md"
        if not summary.is_file():
            continue
        prefix = job.replace("-", "_")
        for png in sorted(cv.glob("heatmap_*.png")):
            shutil.copy2(png, fig_dir / f"{prefix}_{png.name}")
        # the summary's own title goes (the section has one), its sections become subsections
        text = summary.read_text().splitlines()
        body = [("#" + line) if line.startswith("#") else line for line in text if not line.startswith("# ")]
        lines += [f"## {title}", "", intro, "", *_sites_verdict(cv), ""]
        cue = cv / "cue_effect" / "cue_effect.md"
        if cue.is_file():
            lines += ["### How far the models lean on the watermark", "", *cue.read_text().splitlines(), ""]
        lines += [*body, ""]
        lines += [f"![{p.stem}](results/{p.name})" for p in sorted(fig_dir.glob(f"{prefix}_heatmap_*.png"))]
        lines.append("")
    return lines


def _comparators_section(out: Path, fig_dir: Path) -> list[str]:
    """Which fix works where: :mod:`pipelines.comparisons` over the confounded study and the shortcut
    comparators, one table per selection rule (the oracle labelled as such)."""
    from .comparisons import write_comparisons

    sites = {
        sel: out / "jobs" / ("sites-confounded" if sel == "train" else f"sites-confounded-{sel}") / "cv"
        for sel in SELECTIONS
    }
    shortcut = {sel: out / "jobs" / f"shortcut-comparators-{sel}" / "out" for sel in SELECTIONS}
    sites = {k: v for k, v in sites.items() if (v / "predictions.csv").is_file()}
    shortcut = {k: v for k, v in shortcut.items() if any(v.glob("*/results.csv"))}
    ga = out if any((out / "jobs").glob("ga-*-s*/runs/*/test_predictions.csv")) else None
    if not sites and not shortcut:
        return []
    folder = fig_dir / "comparators"
    report = write_comparisons(shortcut, sites, folder, ga).read_text().splitlines()
    intro = (
        "GroupDRO, JTT and DFR (docs/DESIGN.md section 9) beside PPI and its controls on the confounded study "
        "(trained on site D alone) and on the shortcut benchmark's four cues, under each model-selection rule: "
        "`train` (the training distribution's validation part), `worst_site` (its worst site x label group, or "
        "class), `oracle` (a cue-decorrelated validation part: half of the reversed site's subjects, or digits "
        "with the cue reversed; an oracle, so not a result a user without such data could reach)."
    )
    body = [line.replace("](", "](results/comparators/") if line.startswith("![") else line for line in report[1:]]
    return [
        "## Which fix works here: the comparators",
        "",
        intro,
        "",
        *["#" + x if x.startswith("#") else x for x in body],
        "",
    ]


def _lidc_section(out: Path, jobs: Sequence[Job], client, goals: dict) -> list[str]:
    lidc = [j for j in jobs if j.part == "lidc"]
    variants = list(dict.fromkeys(j.meta["variant"] for j in lidc))
    pooled: dict[str, pd.DataFrame] = {}
    per_fold: dict[str, list[float]] = {}
    ref: list[float] = []
    for v in variants:
        mine = [j for j in lidc if j.meta["variant"] == v]
        if not all(_done(out, j).is_file() for j in mine):  # pooled over some folds only: not comparable
            continue
        frames = []
        for j in mine:
            p = _predictions(out, j.name)
            if p is not None:
                frames.append(p)
            if v == "baseline":
                ref.append(_run_metrics(client, "results_lidc", j.name).get("ref_test_auc", np.nan))
        if frames:
            pooled[v] = pd.concat(frames, ignore_index=True)
            per_fold[v] = [
                auc_ci(f["label"], f["prob"]).auc if f["label"].value_counts().min() >= 2 else np.nan for f in frames
            ]
    if not pooled:
        return []
    base = pooled.get("baseline")
    n_pat = base["patient_id"].nunique() if base is not None and "patient_id" in base else "?"
    lines = [
        "## LIDC phantom nodules (tables 2.4/2.5 form)",
        "",
        "The LIDC bundle (`bundles/lidc_ppi.json`) on its phantom of the LIDC-IDRI download (real scan geometry and "
        "real readers' nodule outlines, synthetic anatomy). For each patient-level fold k, a model trains on the "
        "remaining folds, chooses its checkpoint on fold k and is scored on fold k+1; the held-out predictions "
        "of all rotations are pooled, so every labelled nodule is scored "
        "once by a model that neither trained on it nor chose its checkpoint with it. AUC with DeLong's 95 % CI; "
        "p: DeLong's paired test against the baseline on the same nodules.",
        "",
        f"Nodules: {len(base) if base is not None else '?'} ({int(base['label'].sum()) if base is not None else '?'} "
        f"malignant) from {n_pat} patients.",
        "",
        "| method | pooled held-out AUC [95 % CI] | DeLong p vs baseline | AUC per held-out fold |",
        "|---|---|---|---|",
    ]
    for v, frame in pooled.items():
        res = auc_ci(frame["label"], frame["prob"])
        p = "" if v == "baseline" else _fmt(_delong_p(base, frame))
        folds = ", ".join(_fmt(a, 2) for a in per_fold[v])
        lines.append(f"| {v} | {res.auc:.3f} [{res.ci_low:.3f}, {res.ci_high:.3f}] | {p} | {folds} |")
        goals[f"lidc_{v}"] = (res.auc, res.ci_low, res.ci_high, len(frame), n_pat)
    lines += [
        f"| linear reference (mean over folds) | {mean_sd(ref)} | | {', '.join(_fmt(a, 2) for a in ref)} |",
        "",
    ]
    return lines


def _saliency_section(out: Path, jobs: Sequence[Job], fig_dir: Path, goals: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = {j.meta["method"]: out / "jobs" / j.name / "eval" for j in jobs if j.part == "saliency"}
    evals = {m: d for m, d in evals.items() if (d / "summary.csv").is_file()}
    if not evals:
        return []
    lines = [
        "## Saliency: deletion and localisation (figures 2.4/2.6 form)",
        "",
        "Seed-0 GA models, held-out test eyes, the label's class explained. Deletion: mean drop of that class's "
        "probability when the k most salient voxels are set to the volume's minimum (higher: the map found what the "
        "model uses); `random` ranks voxels at random. Localisation on eyes with GA: share of |saliency| inside the "
        "lesion mask, pointing game (the saliency peak inside the lesion) and the best Dice of a thresholded map.",
        "",
    ]
    fig, axes = plt.subplots(1, len(evals), figsize=(5.5 * len(evals), 4), squeeze=False, sharey=True)
    for ax, (model, folder) in zip(axes[0], evals.items()):
        summary = pd.read_csv(folder / "summary.csv")
        deletion = pd.read_csv(folder / "deletion.csv")
        cols = [c for c in summary.columns if c.startswith("drop_k")]
        lines += [
            f"**{model}**",
            "",
            "| saliency | " + " | ".join(cols) + " | share inside | pointing | best Dice |",
            "|---" * (len(cols) + 4) + "|",
        ]
        for _, r in summary.iterrows():
            cells = " | ".join(_fmt(r[c]) for c in cols)
            lines.append(
                f"| {r['method']} | {cells} | {_fmt(r['share_inside'])} | {_fmt(r['pointing_acc'])} "
                f"| {_fmt(r['dice_best'])} |"
            )
        loc = pd.read_csv(folder / "localisation.csv")
        tp_ids = set(deletion.loc[(deletion["target_class"] == 1) & (deletion["prob_before"] > 0.5), "case_id"])
        wbp = loc[(loc["method"] == "wbp") & loc["case_id"].isin(tp_ids)]
        goals[f"wbp_tp_{model}"] = (wbp["share_inside"].mean(), wbp["pointing_hit"].mean(), wbp["case_id"].nunique())
        lines += [
            "",
            f"WBP on the {wbp['case_id'].nunique()} true-positive eyes: share inside the lesion "
            f"{_fmt(wbp['share_inside'].mean())} (the lesion is {_fmt(wbp['mask_fraction'].mean(), 4)} of the "
            f"volume), pointing game {_fmt(wbp['pointing_hit'].mean())}.",
            "",
        ]
        for method, g in deletion.groupby("method"):
            curve = g.groupby("n_deleted")["drop"].mean()
            ax.plot(curve.index, curve.values, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_title(f"GA {model}")
        ax.set_xlabel("voxels deleted")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("drop of the label's probability")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(fig_dir / "deletion_curves.png", dpi=110)
    plt.close(fig)
    for model, folder in evals.items():
        if (folder / "localisation.png").is_file():
            shutil.copy2(folder / "localisation.png", fig_dir / f"localisation_{model}.png")
    lines += ["![deletion curves](results/deletion_curves.png)", ""]
    lines += [f"![localisation {m}](results/localisation_{m}.png)" for m in evals]
    return [*lines, ""]


def _shortcut_section(out: Path, fig_dir: Path) -> list[str]:
    root = out / "jobs" / "shortcut" / "out"
    summaries = sorted(root.glob("*/summary.md")) or sorted(root.glob("summary.md"))
    if not summaries:
        return []
    lines = [
        "## Shortcut benchmark",
        "",
        "`pipelines.shortcut`: real digit scans with a spurious cue that is aligned with the label in training and "
        "reversed at test (see `docs/shortcut/README.md` for the method and the other cues).",
        "",
    ]
    for path in summaries:
        lines += [("##" + x) if x.startswith("#") else x for x in path.read_text().splitlines()]
        for png in sorted(path.parent.glob("*.png")):
            target = fig_dir / f"shortcut_{path.parent.name}_{png.name}"
            shutil.copy2(png, target)
            lines += ["", f"![{png.stem}](results/{target.name})"]
    return [*lines, ""]


def _outlines_section(out: Path, jobs: Sequence[Job]) -> list[str]:
    """Reversed-cue and cue-free AUC of the outline study, per share of outlined training digits."""
    rows = []
    for job in (j for j in jobs if j.name.startswith("shortcut-outlines-")):
        for path in sorted((out / "jobs" / job.name / "out").glob("*/summary.csv")):
            for _, r in pd.read_csv(path).iterrows():
                rows.append({"share": job.meta["share"], "cue": path.parent.name, **r.to_dict()})
    if not rows:
        return []
    table = pd.DataFrame(rows)
    lines = [
        "### Outlines: how the annotation guide's effect grows with the share of outlined training digits",
        "",
        "`pipelines.shortcut --outline-share S`: a seeded share S of the training digits (per class) gives the PPI "
        "step its outline, the digit's own strokes (docs/DESIGN.md section 4.3); the rest are not intervened on. "
        "Reversed-cue AUC, mean ± sd over seeds (Δ: paired difference to the baseline, p: paired t-test).",
        "",
        "| cue | share | method | reversed AUC | Δ reversed | p | cue-free AUC | Δ cue-free |",
        "|---|---:|---|---|---:|---:|---|---:|",
    ]
    for _, r in table.sort_values(["cue", "share"], kind="stable").iterrows():
        lines.append(
            f"| {r['cue']} | {r['share']:g} | `{r['method']}` "
            f"| {r['reversed_auc_mean']:.3f} ± {r['reversed_auc_sd']:.3f} "
            f"| {r['reversed_auc_delta']:+.3f} | {_fmt(r['reversed_auc_p'])} | {r['free_auc_mean']:.3f} ± "
            f"{r['free_auc_sd']:.3f} | {r['free_auc_delta']:+.3f} |"
        )
    return [*lines, ""]


def _epoch_seconds(log: Path, after: int = 0, until: int | None = None) -> float:
    """Median training-epoch time in a bundle log over the epochs ``after < epoch <= until``."""
    import re

    pattern = r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)"
    times = [
        int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
        for m in re.finditer(pattern, log.read_text(errors="replace"))
        if after < int(m.group(1)) <= (until if until is not None else 1 << 30)
    ]
    return float(np.median(times)) if times else float("nan")


def _warmup_epochs(job_dir: Path) -> int:
    """The PPI warm-up of a bundle job: its run's ``checkpoint_from_epoch`` param (``params.json``) minus one."""
    found = sorted(job_dir.glob("runs/*/params.json"))
    if not found:
        return 0
    return int(json.loads(found[-1].read_text()).get("checkpoint_from_epoch", 1)) - 1


def _cost_section(out: Path, jobs: Sequence[Job]) -> list[str]:
    lines = ["## Cost", ""]
    ga = [j for j in jobs if j.part == "ga" and _done(out, j).is_file()]
    if ga:
        lines += [
            "GA bundle jobs (one CPU thread each, two jobs at a time, so the figures are upper bounds): median "
            "training-epoch time from the engine's log in the warm-up (plain cross-entropy for every method) and "
            "after it (where PPI runs), peak resident memory of the job's process, and the job's wall time "
            "(data caching, the linear reference and the held-out test included).",
            "",
            "| method | warm-up epoch (s) | epoch after warm-up (s) | peak memory (MB) | job wall (s) |",
            "|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(j.meta["method"] for j in ga):
            mine = [j for j in ga if j.meta["method"] == method]
            done = [json.loads(_done(out, j).read_text()) for j in mine]
            dirs = [out / "jobs" / j.name for j in mine]
            warm = np.nanmedian([_epoch_seconds(d / "log.txt", until=_warmup_epochs(d)) for d in dirs])
            ppi = np.nanmedian([_epoch_seconds(d / "log.txt", after=_warmup_epochs(d)) for d in dirs])
            lines.append(
                f"| {method} | {_fmt(warm, 2)} | {_fmt(ppi, 2)} | {max(d['max_rss_mb'] for d in done):.0f} "
                f"| {np.median([d['wall_s'] for d in done]):.0f} |"
            )
        lines.append("")
    bench = out / "jobs" / "cost" / "bench.json"
    if bench.is_file():
        lines += _bench_lines(json.loads(bench.read_text()))
    if len(lines) > 2:  # GPU figures only beside the CPU ones, never in a report of other parts
        lines += _gpu_lines(GPU_FIGURES)
    return lines if len(lines) > 2 else []


def _gpu_lines(folder: Path) -> list[str]:
    """The GPU measurements committed under ``folder``: made on a GPU machine by the two benchmark scripts,
    not by ``make results``, which runs on CPU."""
    real = folder / "real_size_h200.json"
    bench = folder / "bench_saliency_ppi_h200.json"
    if not real.is_file() and not bench.is_file():
        return []
    lines = [
        "### On a GPU",
        "",
        f"Measured once on a GPU machine, not by `make results` (which runs on CPU); files in `{folder.name}/`.",
        "",
    ]
    if real.is_file():
        data = json.loads(real.read_text())
        meta = data["meta"]
        lines += [
            f"The GA bundle's trainer (`benchmarks/bench_real_size.py`: the bundle's network, optimiser and PPI "
            f"configuration in MONAI's SupervisedTrainer with the PPI iteration) at the real OCT size "
            f"{' x '.join(str(s) for s in meta['shape'])} per eye, on {meta['card']}, torch {meta['torch']}, "
            f"{meta['date']}. bf16: autocast in bfloat16; fp32: none.",
            "",
            "| precision | method | batch (eyes) | step (ms) | ms per eye | peak GPU memory (GiB) |",
            "|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            if "step_ms" in r:
                lines.append(
                    f"| {r['precision']} | {r['method']} | {r['batch']} | {r['step_ms']:.0f} | "
                    f"{r['step_ms'] / r['batch']:.0f} | {r['peak_gib']:.1f} |"
                )
            else:
                lines.append(f"| {r['precision']} | {r['method']} | {r['batch']} | {r['error']} | | |")
        lines += ["", f"Not measured: {meta['not_measured']}.", ""]
    if bench.is_file():
        lines += _bench_lines(json.loads(bench.read_text()))
    return lines


def _bench_lines(bench: dict) -> list[str]:
    """The benchmark's JSON as two tables: saliency time per method, PPI step against a plain step."""
    sizes = bench.get("sizes", {})
    device = bench.get("device_name") or bench.get("device")
    lines = [
        f"`benchmarks/bench_saliency_ppi.py` on {device} ({bench.get('threads')} thread, load average "
        f"{', '.join(f'{x:.1f}' for x in bench.get('load_average', []))}; medians of {bench.get('repeats')} "
        "timed repeats).",
        "",
        f"Saliency of a 3D ResNet-18, batch {sizes.get('batch3d')} x {sizes.get('size3d')}^3 (eval: network in eval "
        "mode; train: in training mode, as PPI calls it):",
        "",
        "| method | eval (ms) | train (ms) | eval / gradient |",
        "|---|---|---|---|",
    ]
    sal = bench.get("saliency", {})
    for method, ev in sal.get("eval", {}).items():
        tr = sal.get("train", {}).get(method, {})
        lines.append(
            f"| {method} | {ev['median_ms']:.0f} | {_fmt(tr.get('median_ms', np.nan), 0)} | {ev['ratio']:.2f} |"
        )
    lines += [
        "",
        f"One training step of the multi-view network ({sizes.get('mv_batch')} volumes x {sizes.get('views')} views of "
        f"{sizes.get('mv_size')}^2):",
        "",
        "| step | median (ms) | / plain |",
        "|---|---|---|",
    ]
    for name, t in bench.get("training_step", {}).items():
        lines.append(f"| {name} | {t['median_ms']:.0f} | {t['ratio']:.2f} |")
    lines += [
        "",
        "Targets: "
        + "; ".join(
            f"{k} {v['ratio']:.2f} (limit {v['limit']}: {'met' if v['pass'] else 'not met'})"
            for k, v in bench.get("targets", {}).items()
        )
        + ".",
        "",
    ]
    return lines


def write_report(out: Path, jobs: Sequence[Job], profile_name: str, publish: Path | None = None) -> Path:
    """Write ``OUT/RESULTS.md`` and ``OUT/results/*.png`` from the finished jobs (and copy them to ``publish``).

    Returns:
        The report's path.
    """
    from mlflow import MlflowClient

    fig_dir = out / "results"
    fig_dir.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=_tracking_uri(out, None))
    done = [json.loads(_done(out, j).read_text()) for j in jobs if _done(out, j).is_file()]
    commits = sorted({d["commit"] for d in done})
    part_wall = {}
    for d in done:
        part_wall[d["part"]] = part_wall.get(d["part"], 0.0) + d["wall_s"]
    import torch

    device = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    lines = [
        "# Results",
        "",
        f"Made by `python -m pipelines.results --profile {profile_name}` (`make results`) from its own runs: "
        f"{len(done)} jobs at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}; report written "
        f"{time.strftime('%Y-%m-%d %H:%M')}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {device}. "
        "Every run is in the study's MLflow store (experiments `results_ga`, `results_site_cv`, `results_lidc`, "
        "`results_saliency`, `results_shortcut`).",
        "",
        "CPU time per part (sum of job wall times, jobs run side by side on the same cores): "
        + ", ".join(f"{p} {w / 60:.0f} min" for p, w in part_wall.items())
        + ".",
        "",
    ]
    if profile_name != "full":
        lines += [f"**Profile `{profile_name}`: toy sizes that test the machinery; its figures mean nothing.**", ""]
    missing = [j for j in jobs if not _done(out, j).is_file()]
    if missing:
        by_part: dict[str, list[str]] = {}
        for j in missing:
            by_part.setdefault(j.part, []).append(j.name)
        lines += [
            f"**Not run yet: {len(missing)} of {len(jobs)} jobs**, so the sections below lack them: "
            + "; ".join(f"{p}: {', '.join(names)}" for p, names in by_part.items())
            + ". Run `make results` again to add them (finished jobs are kept).",
            "",
        ]
    goals: dict = {}
    at_goals = len(lines)
    lines += _ga_section(out, jobs, client, goals) if any(j.part == "ga" for j in jobs) else []
    lines += _sites_section(out, fig_dir)
    lines += _lidc_section(out, jobs, client, goals) if any(j.part == "lidc" for j in jobs) else []
    lines += _saliency_section(out, jobs, fig_dir, goals)
    lines += _shortcut_section(out, fig_dir)
    lines += _outlines_section(out, jobs)
    lines += _comparators_section(out, fig_dir)
    lines += _cost_section(out, jobs)
    lines[at_goals:at_goals] = _goals_section(goals)
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, publish / "RESULTS.md")
        target = publish / "results"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(fig_dir, target)
    return path


def init_store(uri: str) -> None:
    """Create the MLflow store and the study's experiments before jobs start.

    Two processes that create a new SQLite store at the same moment can both try to build its schema and one
    fails; parallel jobs therefore find it made.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for name in EXPERIMENTS:
        ensure_experiment(client, name)


def _tracking_uri(out: Path, given: str | None) -> str:
    return given or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.results", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("runs/results"), help="study folder (default: %(default)s)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full", help="sizes (default: %(default)s)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts of {PARTS} (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="jobs at a time (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per job (default: %(default)s)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///OUT/mlflow.db)")
    parser.add_argument("--publish", type=Path, help="also copy RESULTS.md and its figures into this folder")
    parser.add_argument(
        "--only",
        help="comma-separated job-name patterns (shell style, e.g. 'lidc-baseline-*,ga-*-s0') to run of the chosen "
        "parts; the report still covers every job of the parts and lists those not run",
    )
    parser.add_argument("--report-only", action="store_true", help="write the report from finished jobs only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")
    profile = PROFILES[args.profile]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = _tracking_uri(out, args.tracking_uri)
    jobs = build_jobs(out, profile, parts, uri)
    todo = jobs
    if args.only:
        patterns = [p.strip() for p in args.only.split(",") if p.strip()]
        todo = [j for j in jobs if any(fnmatch.fnmatchcase(j.name, p) for p in patterns)]
        if not todo:
            parser.error(f"--only {args.only!r} matches no job of the parts {', '.join(parts)}")
        needed = {a for j in todo for a in j.after}
        todo = [j for j in jobs if j in todo or j.name in needed]
    if not args.report_only:
        t0 = time.perf_counter()
        init_store(uri)
        prepare_data(out, profile, parts)
        run_jobs(todo, out, workers=args.workers, threads=args.threads, progress=not args.no_progress)
        print(f"all {len(todo)} jobs finished ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    path = write_report(out, jobs, args.profile, publish=args.publish)
    print(f"report: {path}" + (f" (published to {args.publish / 'RESULTS.md'})" if args.publish else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
