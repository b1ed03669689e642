"""The job list of the study: every job a real command a user could type, run from the repository root."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ppi_med.saliency import METHODS

from .paths import BUNDLES, ROOT
from .profiles import OUTLINE_METHODS, SELECTIONS, Profile
from .variants import method_args

__all__ = ["Job", "build_jobs"]


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


def _bundle(*configs: str, run_id: str = "run") -> list[str]:
    """``monai.bundle run`` of the :data:`BUNDLES` entries ``configs``, the later ones layered on the first."""
    files = [BUNDLES[c] for c in configs]
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        run_id,
        "--config_file",
        files[0] if len(files) == 1 else str(files),
    ]


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


def _ga_data(out: Path) -> list[str]:
    """The GA data set made up front, and its held-out test part."""
    folder = str(out / "data" / "ga")
    return ["--default_dataset_dir", folder, "--dataset_dir", folder, "--test_fraction", "0.25"]


def _ga_jobs(out: Path, profile: Profile, parts: Sequence[str], common: list[str]) -> list[Job]:
    """GA training per method and seed; with ``saliency`` alone only the two seed-0 models it explains."""
    jobs = []
    methods = ("baseline", *(f"ppi_{s}" for s in profile.saliencies), *profile.ga_controls, *profile.comparators)
    for seed in range(profile.seeds):
        for method in methods:
            if "ga" not in parts and not (seed == 0 and method in ("baseline", "ppi_wbp")):
                continue
            name = f"ga-{method}-s{seed}"
            argv = [
                *_bundle("ga"),
                *common,
                *_ga_data(out),
                *("--seed", str(seed)),
                *_tracked_run(out, name, "results_ga"),
                *method_args(method),
                *profile.ga,
            ]
            jobs.append(Job(name, "ga", argv, meta={"method": method, "seed": seed}))
    return jobs


def _saliency_jobs(out: Path, profile: Profile, common: list[str]) -> list[Job]:
    """Deletion and localisation of every saliency method on the seed-0 GA baseline and PPI-WBP models."""
    jobs = []
    for method in ("baseline", "ppi_wbp"):
        train = f"ga-{method}-s0"
        name = f"saliency-{method}"
        argv = [
            *_bundle("ga", "saliency", run_id="evaluate_saliency"),
            *common,
            *_ga_data(out),
            *("--seed", "0"),
            *("--runs_dir", str(out / "jobs" / train / "runs")),
            *("--eval_dir", str(out / "jobs" / name / "eval")),
            *("--eval_datalist", "@test#datalist", "--eval_ks", profile.eval_ks),
            *("--eval_methods", json.dumps(list(METHODS))),  # every registered saliency method
            *("--experiment_name", "results_saliency"),
            *method_args(method),
            *profile.ga,
        ]
        jobs.append(Job(name, "saliency", argv, after=(train,), meta={"method": method, "train_job": train}))
    return jobs


def _site_jobs(out: Path, profile: Profile, tracking_uri: str) -> list[Job]:
    """Site CV, the confounded study under each selection rule, and the cue effect of each."""
    jobs = []
    oracle = ("--oracle-sites", profile.oracle_site)
    studies = [
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
    ]
    methods = ",".join(("baseline", "ppi_wbp", *profile.site_controls, *profile.comparators))
    for name, data, extra, seeds in studies:
        argv = [
            *(sys.executable, "-m", "pipelines.site_cv", "--config_file", BUNDLES["ga"]),
            *("--methods", methods, "--seeds", str(seeds), "--out", str(out / "jobs" / name / "cv")),
            *("--tracking-uri", tracking_uri, "--experiment", "results_site_cv", "--no-progress"),
            *("--num-threads", "1"),
            *("--default_dataset_dir", str(out / "data" / data), "--dataset_dir", str(out / "data" / data)),
            *extra,
        ]
        jobs.append(Job(name, "sites", argv))
    for sel in SELECTIONS:
        study = "sites-confounded" if sel == "train" else f"sites-confounded-{sel}"
        argv = [sys.executable, "-m", "pipelines.cue_effect", str(out / "jobs" / study / "cv"), "--no-progress"]
        jobs.append(Job("sites-cue" if sel == "train" else f"sites-cue-{sel}", "sites", argv, after=(study,)))
    return jobs


def _lidc_jobs(out: Path, profile: Profile, common: list[str]) -> list[Job]:
    """LIDC baseline and PPI-WBP per mask, each fold held out once (val fold k, test fold k+1)."""
    jobs = []
    data = ["--dataset_dir", str(out / "data" / "lidc" / "patches")] if profile.lidc_data == "small" else []
    for variant in ("baseline", *(f"ppi_wbp_{m}" for m in profile.lidc_masks)):
        method, mask = ("baseline", "soft") if variant == "baseline" else ("ppi_wbp", variant[len("ppi_wbp_") :])
        for fold in range(profile.lidc_folds):
            name = f"lidc-{variant}-f{fold}"
            argv = [
                *_bundle("lidc"),
                *common,
                *data,
                *("--val_fold", str(fold), "--test_fold", str((fold + 1) % profile.lidc_folds)),
                *_tracked_run(out, name, "results_lidc"),
                *method_args(method, mask),
                *profile.lidc,
            ]
            jobs.append(Job(name, "lidc", argv, meta={"variant": variant, "fold": fold}))
    return jobs


def _shortcut_jobs(out: Path, profile: Profile, tracking_uri: str) -> list[Job]:
    """The shortcut benchmark, the outline study per share, and the comparators per selection rule."""

    def shortcut(name: str, *args: str) -> list[str]:
        return [
            *(sys.executable, "-m", "pipelines.shortcut", "--out", str(out / "jobs" / name / "out")),
            *("--tracking-uri", tracking_uri, "--experiment", "results_shortcut", "--num-threads", "1"),
            *args,
        ]

    jobs = [Job("shortcut", "shortcut", shortcut("shortcut", *profile.shortcut))]
    for share in profile.outline_shares:
        name = f"shortcut-outlines-{share:g}"
        argv = shortcut(name, "--outline-share", f"{share:g}", "--methods", *OUTLINE_METHODS, *profile.outlines)
        jobs.append(Job(name, "shortcut", argv, meta={"share": share}))
    for sel in SELECTIONS:
        name = f"shortcut-comparators-{sel}"
        argv = shortcut(name, "--selection", sel, *profile.comparator_shortcut)
        jobs.append(Job(name, "shortcut", argv, meta={"selection": sel}))
    return jobs


def build_jobs(out: Path, profile: Profile, parts: Sequence[str], tracking_uri: str) -> list[Job]:
    """Every job of the chosen parts (the ``saliency`` part needs the ``ga`` jobs of seed 0).

    Args:
        out: the study folder; each job writes into ``out/jobs/<name>/``.
        profile: the sizes.
        parts: parts of :data:`~pipelines.results.profiles.PARTS`.
        tracking_uri: the MLflow store every job logs to.

    Returns:
        The jobs in the order they are started.
    """
    jobs: list[Job] = []
    common = ["--tracking_uri", tracking_uri]
    if "ga" in parts or "saliency" in parts:
        jobs += _ga_jobs(out, profile, parts, common)
    if "saliency" in parts:
        jobs += _saliency_jobs(out, profile, common)
    if "sites" in parts:
        jobs += _site_jobs(out, profile, tracking_uri)
    if "lidc" in parts:
        jobs += _lidc_jobs(out, profile, common)
    if "shortcut" in parts:
        jobs += _shortcut_jobs(out, profile, tracking_uri)
    if "cost" in parts:
        script = str(ROOT / "benchmarks" / "bench_saliency_ppi.py")
        argv = [sys.executable, script, "--json", str(out / "jobs" / "cost" / "bench.json"), *profile.bench]
        jobs.append(Job("cost", "cost", argv))
    return jobs
