"""The job list of the study: every job a real command a user could type, run from the repository root.

Each job also says which of its outputs the report reads (:attr:`Job.keeps`), the only files the ledger
(:mod:`.ledger`) keeps of it, carries its command in a machine-independent form (:attr:`Job.command`) and names
the bundle configs it runs or reads (:attr:`Job.bundles`), by which the ledger tells whether an entry was made
by today's command from today's bundle files.
"""

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

__all__ = ["PLACEHOLDERS", "Job", "build_jobs", "portable_command"]

#: what :func:`portable_command` writes for the parts of a command that differ between machines and folders
PLACEHOLDERS = {"out": "{out}", "root": "{root}", "python": "{python}", "tracking_uri": "{tracking_uri}"}


@dataclass
class Job:
    """One command of the study: ``argv`` run with its working directory at the repository root.

    Attributes:
        name: unique folder name under ``OUT/jobs``.
        part: the part it belongs to.
        argv: the command.
        after: jobs that must have finished first (each of them trains a model this job reads, unless
            ``reads_models`` is false).
        meta: what the report needs to know about it (method, seed, fold...).
        keeps: glob patterns, relative to ``OUT/jobs``, of the outputs the report reads (``done.json`` is
            always kept): what the ledger keeps of the job.
        writes: folders of other jobs, relative to ``OUT/jobs``, that this job writes into (the cue effect
            goes into its site study's folder); they belong to this job's ledger entry, not to the other's.
        command: ``argv`` with the study folder, the repository, the interpreter and the tracking store
            replaced by :data:`PLACEHOLDERS` (:func:`portable_command`); empty for a job made by hand, whose
            ``argv`` then stands for it.
        bundles: the bundle configs the job runs or reads (:data:`BUNDLES` values, relative to the repository,
            as the command names them); the ledger records the SHA-256 of each, of the files they include and
            of the metadata beside the first (:func:`~pipelines.results.ledger.bundle_files`).

        reads_models: whether the job reads the models of the jobs it runs after (the ledger keeps no models, so
            those run again when it runs), or only what their ledger entries keep (then they are restored).
    """

    name: str
    part: str
    argv: list[str]
    after: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)
    keeps: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    command: list[str] = field(default_factory=list)
    bundles: tuple[str, ...] = ()
    reads_models: bool = True

    @property
    def ga_table(self) -> bool:
        """A GA job of the pooled table (``train`` selection); the other rules' are the comparisons' alone."""
        return self.part == "ga" and "selection" not in self.meta


def portable_command(argv: Sequence[str], out: Path, root: Path, tracking_uri: str) -> list[str]:
    """``argv`` as it reads on any machine: the same job in another study folder gives the same list.

    Where the MLflow runs go does not change what a job computes, so the tracking store is a placeholder too.

    Args:
        argv: the job's command.
        out: the study folder (absolute).
        root: the repository root (absolute).
        tracking_uri: the MLflow store the jobs log to.

    Returns:
        The command with :data:`PLACEHOLDERS` for ``tracking_uri`` (a whole argument), the interpreter (a whole
        argument), and ``out`` and ``root`` (a whole argument or a path prefix; ``out`` first, since the default
        study folder lies inside the repository).
    """
    folders = [(str(out), PLACEHOLDERS["out"]), (str(root), PLACEHOLDERS["root"])]
    portable = []
    for arg in argv:
        if arg == tracking_uri:
            arg = PLACEHOLDERS["tracking_uri"]
        elif arg == sys.executable:
            arg = PLACEHOLDERS["python"]
        else:
            for path, mark in folders:
                arg = mark if arg == path else arg.replace(path + "/", mark + "/")
        portable.append(arg)
    return portable


#: a training job's run outputs the report reads: held-out predictions, metrics (MLflow's, kept beside the run),
#: the run's parameters (the epoch checkpoint selection starts at)
_RUN_OUTPUTS = ("runs/*/test_predictions.csv", "runs/*/metrics.jsonl", "runs/*/params.json")
#: what the report reads of a site study: its summary, verdict figures, heatmaps and pooled predictions
_SITE_OUTPUTS = ("cv/summary.md", "cv/pooled_offdiag.json", "cv/predictions.csv", "cv/heatmap_*.png")
#: what a merge reads of each of its parts (one method's study of the site matrices)
_SITE_PART_OUTPUTS = ("cv/summary.json", "cv/predictions.csv", "cv/cells.csv")


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
    """GA training per method and seed; with ``saliency`` alone only the two seed-0 models it explains. The
    comparators, PPI-WBP, its controls and the baseline again under each of ``profile.ga_selections``
    (``ga-<method>-s<seed>-<rule>``, meta ``selection``); the GA table reads the ``train`` jobs only."""
    jobs = []
    methods = ("baseline", *(f"ppi_{s}" for s in profile.saliencies), *profile.ga_controls, *profile.comparators)
    compared = ("baseline", "ppi_wbp", *profile.ga_controls, *profile.comparators)
    runs = [(m, s, "train") for s in range(profile.seeds) for m in methods]
    runs += [(m, s, sel) for sel in profile.ga_selections for s in range(profile.seeds) for m in compared]
    for method, seed, sel in runs:
        if "ga" not in parts and not (seed == 0 and method in ("baseline", "ppi_wbp") and sel == "train"):
            continue
        name = f"ga-{method}-s{seed}" + ("" if sel == "train" else f"-{sel}")
        argv = [
            *_bundle("ga"),
            *common,
            *_ga_data(out),
            *("--seed", str(seed)),
            *_tracked_run(out, name, "results_ga"),
            *method_args(method),
            *(() if sel == "train" else ("--selection", sel)),
            *profile.ga,
        ]
        # the cost table reads the log's epoch times and the run's warm-up (params.json)
        keeps = tuple(f"{name}/{p}" for p in ("log.txt", *_RUN_OUTPUTS))
        meta = {"method": method, "seed": seed, **({} if sel == "train" else {"selection": sel})}
        jobs.append(Job(name, "ga", argv, meta=meta, keeps=keeps, bundles=(BUNDLES["ga"],)))
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
        outputs = ("summary.csv", "deletion.csv", "localisation.csv", "localisation.png")
        keeps = tuple(f"{name}/eval/{f}" for f in outputs)
        meta = {"method": method, "train_job": train}
        bundles = (BUNDLES["ga"], BUNDLES["saliency"])
        jobs.append(Job(name, "saliency", argv, after=(train,), meta=meta, keeps=keeps, bundles=bundles))
    return jobs


def _site_jobs(out: Path, profile: Profile, tracking_uri: str) -> list[Job]:
    """Site CV (one study per method, merged), the confounded study under each selection rule, and the cue
    effect of each."""
    jobs = []
    oracle = ("--oracle-sites", profile.oracle_site)
    methods = ("baseline", "ppi_wbp", *profile.site_controls, *profile.comparators)
    every_method = ",".join(methods)  # the confounded studies run them all in one study
    # (job, data, methods, extra arguments, seeds, kept outputs); the site matrices take hours of CPU, so each
    # method is a study of its own, able to run on another machine or day, and a merge makes the one report
    studies = [
        *((f"sites-{m}", "ga_sites", m, profile.sites, profile.seeds, _SITE_PART_OUTPUTS) for m in methods),
        ("sites-confounded", "ga_sites_rev", every_method, profile.confounded, profile.confounded_seeds, _SITE_OUTPUTS),
        *(
            (
                f"sites-confounded-{sel}",
                "ga_sites_rev",
                every_method,
                (*profile.confounded, "--selection", sel, *oracle[: 2 * (sel == "oracle")]),
                profile.confounded_seeds,
                _SITE_OUTPUTS,
            )
            for sel in SELECTIONS[1:]
        ),
    ]
    for name, data, study_methods, extra, seeds, outputs in studies:
        argv = [
            *(sys.executable, "-m", "pipelines.site_cv", "--config_file", BUNDLES["ga"]),
            *("--methods", study_methods, "--seeds", str(seeds), "--out", str(out / "jobs" / name / "cv")),
            *("--tracking-uri", tracking_uri, "--experiment", "results_site_cv", "--no-progress"),
            *("--num-threads", "1"),
            *("--default_dataset_dir", str(out / "data" / data), "--dataset_dir", str(out / "data" / data)),
            *extra,
        ]
        keeps = tuple(f"{name}/{p}" for p in outputs)
        jobs.append(Job(name, "sites", argv, keeps=keeps, bundles=(BUNDLES["ga"],)))
    parts = tuple(f"sites-{m}" for m in methods)
    argv = [
        *(sys.executable, "-m", "pipelines.site_cv.merge", "--out", str(out / "jobs" / "sites" / "cv")),
        *(str(out / "jobs" / p / "cv") for p in parts),
        *("--tracking-uri", tracking_uri, "--experiment", "results_site_cv"),
    ]
    keeps = tuple(f"sites/{p}" for p in _SITE_OUTPUTS)
    jobs.append(Job("sites", "sites", argv, after=parts, keeps=keeps, reads_models=False))
    for sel in SELECTIONS:
        study = "sites-confounded" if sel == "train" else f"sites-confounded-{sel}"
        argv = [sys.executable, "-m", "pipelines.cue_effect", str(out / "jobs" / study / "cv"), "--no-progress"]
        cue = f"{study}/cv/cue_effect"
        keeps = (f"{cue}/cue_effect.csv", f"{cue}/cue_effect.md")
        name = "sites-cue" if sel == "train" else f"sites-cue-{sel}"
        # the cue effect builds the network and preprocessing from the bundle its study ran
        jobs.append(Job(name, "sites", argv, after=(study,), keeps=keeps, writes=(cue,), bundles=(BUNDLES["ga"],)))
    return jobs


def _lidc_jobs(out: Path, profile: Profile, common: list[str]) -> list[Job]:
    """LIDC baseline, PPI-WBP per mask, the controls and the comparators, and apart from them the forms tried
    against the LIDC bar; each on every fold held out once (val fold k, test fold k+1)."""
    data = ["--dataset_dir", str(out / "data" / "lidc" / "patches")] if profile.lidc_data == "small" else []
    runs = []  # (variant, job-name stem, experiment, bundle overrides, extra meta: an attempt's and its mask)
    for variant in ("baseline", *(f"ppi_wbp_{m}" for m in profile.lidc_masks), *profile.lidc_controls,
                    *profile.comparators):  # fmt: skip
        masked = variant.startswith("ppi_wbp_")
        method, mask = ("ppi_wbp", variant[len("ppi_wbp_") :]) if masked else (variant, "soft")
        runs.append((variant, variant, "results_lidc", method_args(method, mask), {}))
    for attempt, mask, overrides in profile.lidc_attempts:
        args = [*method_args("ppi_wbp", mask), *overrides]
        runs.append((attempt, f"attempt-{attempt}", "results_lidc_attempts", args, {"attempt": True, "mask": mask}))
    jobs = []
    for variant, stem, experiment, args, extra in runs:
        for fold in range(profile.lidc_folds):
            name = f"lidc-{stem}-f{fold}"
            argv = [
                *_bundle("lidc"),
                *common,
                *data,
                *("--val_fold", str(fold), "--test_fold", str((fold + 1) % profile.lidc_folds)),
                *_tracked_run(out, name, experiment),
                *args,
                *profile.lidc,
            ]
            keeps = tuple(f"{name}/{p}" for p in _RUN_OUTPUTS)
            meta = {"variant": variant, "fold": fold, **extra}
            jobs.append(Job(name, "lidc", argv, meta=meta, keeps=keeps, bundles=(BUNDLES["lidc"],)))
    return jobs


def _shortcut_jobs(out: Path, profile: Profile, tracking_uri: str) -> list[Job]:
    """The shortcut benchmark, the outline study per share, and the comparators per selection rule."""

    def shortcut(name: str, *args: str) -> list[str]:
        return [
            *(sys.executable, "-m", "pipelines.shortcut", "--out", str(out / "jobs" / name / "out")),
            *("--tracking-uri", tracking_uri, "--experiment", "results_shortcut", "--num-threads", "1"),
            *args,
        ]

    # the benchmark's summaries and figures, one folder per cue (or the output folder itself for one cue)
    keeps = tuple(f"shortcut/out/{p}" for p in ("summary.md", "*.png", "*/summary.md", "*/*.png"))
    jobs = [Job("shortcut", "shortcut", shortcut("shortcut", *profile.shortcut), keeps=keeps)]
    for share in profile.outline_shares:
        name = f"shortcut-outlines-{share:g}"
        argv = shortcut(name, "--outline-share", f"{share:g}", "--methods", *OUTLINE_METHODS, *profile.outlines)
        jobs.append(Job(name, "shortcut", argv, meta={"share": share}, keeps=(f"{name}/out/*/summary.csv",)))
    for sel in SELECTIONS:
        name = f"shortcut-comparators-{sel}"
        argv = shortcut(name, "--selection", sel, *profile.comparator_shortcut)
        keeps = (f"{name}/out/*/results.csv", f"{name}/out/report.md")
        jobs.append(Job(name, "shortcut", argv, meta={"selection": sel}, keeps=keeps))
    # the settings tried against the digits' bar: under the benchmark's rule, and at the last epoch
    for sel in ("train", "last"):
        name = f"shortcut-attempts-{sel}"
        argv = shortcut(name, "--selection", sel, *profile.attempts)
        keeps = (f"{name}/out/*/summary.csv", f"{name}/out/*/epochs.png", f"{name}/out/report.md")
        jobs.append(Job(name, "shortcut", argv, meta={"selection": sel}, keeps=keeps))
    return jobs


def build_jobs(out: Path, profile: Profile, parts: Sequence[str], tracking_uri: str) -> list[Job]:
    """Every job of the chosen parts (the ``saliency`` part needs the ``ga`` jobs of seed 0).

    Args:
        out: the study folder; each job writes into ``out/jobs/<name>/``.
        profile: the sizes.
        parts: parts of :data:`~pipelines.results.profiles.PARTS`.
        tracking_uri: the MLflow store every job logs to.

    Returns:
        The jobs in the order they are started (a job after those it waits on), each with its
        :attr:`~Job.command`.
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
        jobs.append(Job("cost", "cost", argv, keeps=("cost/bench.json",)))
    for job in jobs:
        job.command = portable_command(job.argv, out, ROOT, tracking_uri)
    return jobs
