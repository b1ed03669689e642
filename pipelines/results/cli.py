"""``make results``: every experiment behind ``docs/RESULTS.md``, run from scratch and logged to MLflow.

Parts (each a set of independent jobs, every job a real command a user could type)::

    ga        table 2.2 form: the GA bundle, baseline and PPI with each saliency (gradient, input x gradient,
              Grad-CAM, LRP, WBP), pooled training, seeds 0..S-1, each scored on its held-out test part
              (``test_fraction``) with the linear reference of the same split
    sites     table 2.3 form: ``pipelines.site_cv`` for every method, the confounded site D among the
              training sites, S seeds, DeLong p-values and the pooled off-diagonal test (a study per method,
              merged by :mod:`pipelines.site_cv.merge`: hours of CPU, spread over machines and days); and the
              confounded study: trained on site D alone (its watermark marks GA), scored on sites without
              the watermark and on site C, generated with the correlation reversed, 5 seeds, with the cue
              effect of its models (:mod:`pipelines.cue_effect`)
    lidc      tables 2.4/2.5 form: the LIDC bundle, baseline and PPI-WBP with each mask (soft, adaptive soft,
              hard point, box) and the two controls (random masks, random erasing), rotating the held-out fold
              over every patient-level fold; the folds' test predictions are pooled, so every labelled nodule is
              scored once by a model that neither trained on it nor chose its checkpoint on it (DeLong CI,
              DeLong paired test against the baseline and the bundle's PPI); apart from the table, the box mask's
              other forms tried against the bar it misses (``lidc-attempt-*``)
    saliency  figures 2.4/2.6 form: deletion curves and localisation of every saliency method on the seed-0 GA
              baseline and PPI-WBP models (test part), with WBP's localisation on the true positives
    shortcut  the shortcut benchmark (:mod:`pipelines.shortcut`, patch and line cues, default grid), the outline
              study, the comparators' grid on the four cues under each selection rule, and the settings tried
              against the line cue's bar (``shortcut-attempts-*``: under ``train`` and at the last epoch)
    (every part with methods runs the comparators GroupDRO, JTT, DFR and PPI+DFR beside PPI; the confounded
    study also under ``worst_site`` and ``oracle`` selection, and ``comparisons`` tables them against the
    baseline and PPI: :mod:`pipelines.comparisons`)
    cost      epoch time and peak memory per method (from the GA jobs), PPI step cost in both modes and the
              time of each saliency method (``benchmarks/bench_saliency_ppi.py``)

Every job writes into ``OUT/jobs/<name>/`` and leaves ``done.json`` (exit code, wall time, peak memory, the
commit it ran at, its command, the machine) when it succeeds; a rerun into the same ``OUT`` skips finished
jobs, so an interrupted study resumes.

The study also grows across machines and days through the ledger (:mod:`.ledger`; ``results/ledger/`` in the
repository, committed; the full profile's default): each finished job's small outputs (what the report
reads, never checkpoints or stores) go into ``LEDGER/<job>/`` with a manifest (files and their SHA-256, the
command with this machine's paths as placeholders, commit, wall time, machine). A run restores the ledger's
entries into ``OUT`` and runs only the rest. An entry made by a command other than the one today's job list
gives (stale), or one whose files do not match its manifest (refused), is named and its job runs again; the
entry it replaces moves to ``LEDGER/.stale/`` once the new run has finished. The ledger keeps no
checkpoints, so a job that must run after a restored one (the saliency jobs read the seed-0 GA models, the
cue effect the site study's) runs that one again first. ``--rerun PATTERNS`` runs jobs again whatever is
kept; ``--no-ledger`` leaves the ledger out; ``--ledger DIR`` uses another (the quick profile has none unless
given one, and never the repository's).

All runs log to one MLflow store, ``OUT/mlflow.db`` unless ``--tracking-uri`` is given. The
report, ``OUT/RESULTS.md`` with its figures under ``OUT/results/``, is made from the job outputs alone;
``--publish DIR`` also copies it to ``DIR/RESULTS.md`` and ``DIR/results/``.

CPU budget of the full study (``--profile full``, the default) on 2 cores with ``--workers 2``: see the
header of ``docs/RESULTS.md``, which records the measured wall time of every part. ``--profile quick`` runs
the same jobs at toy sizes (a minute or two; the test suite uses it); its numbers mean nothing.

CLI::

    python -m pipelines.results --out runs/results --publish docs          # make results
    python -m pipelines.results --out /tmp/r --profile quick --parts ga,lidc
    python -m pipelines.results --out runs/results --rerun 'lidc-*'        # run the LIDC jobs again
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from collections.abc import Sequence
from pathlib import Path

from .data import prepare_data
from .jobs import Job, build_jobs
from .ledger import LEDGER, Ledger
from .lock import StudyBusyError, study_lock
from .plan import plan_study
from .profiles import PARTS, PROFILES
from .report import write_report
from .scheduler import run_jobs
from .store import init_store, tracking_uri

__all__ = ["main"]


def _matching(jobs: list[Job], patterns: str) -> list[Job]:
    """The jobs whose names match one of the comma-separated shell patterns."""
    found = [p.strip() for p in patterns.split(",") if p.strip()]
    return [j for j in jobs if any(fnmatch.fnmatchcase(j.name, p) for p in found)]


def _set_aside_finished(out: Path, jobs: list[Job]) -> None:
    """Without a ledger, ``--rerun``: the jobs' finished folders renamed ``<name>.attempt-<time>`` so they run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for job in jobs:
        folder = out / "jobs" / job.name
        if folder.exists():
            folder.rename(folder.with_name(f"{job.name}.attempt-{stamp}"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen parts' unfinished jobs and write the report (``--help`` says every option).

    Args:
        argv: the command line without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success (argument errors exit with 2, failed jobs raise).

    Raises:
        RuntimeError: some jobs failed; each is named with its log.
    """
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
    parser.add_argument(
        "--rerun",
        help="comma-separated job-name patterns to run again even though they finished here or the ledger keeps "
        "them (the entries they replace move to LEDGER/.stale/)",
    )
    ledger_opts = parser.add_mutually_exclusive_group()
    ledger_opts.add_argument(
        "--ledger",
        type=Path,
        help=f"the ledger folder (default: {LEDGER.relative_to(LEDGER.parents[1])} for the full profile, none for "
        "the others, which may not use that one)",
    )
    ledger_opts.add_argument("--no-ledger", action="store_true", help="no ledger: restore nothing, record nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished jobs only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with study_lock(out):
            return _run(parser, args, parts, out)
    except StudyBusyError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, parts: list[str], out: Path) -> int:
    """:func:`main` once it holds the study folder."""
    profile = PROFILES[args.profile]
    uri = tracking_uri(out, args.tracking_uri)
    jobs = build_jobs(out, profile, parts, uri)
    rerun = _matching(jobs, args.rerun) if args.rerun else []
    if args.rerun and not rerun:
        parser.error(f"--rerun {args.rerun!r} matches no job of the parts {', '.join(parts)}")
    todo = jobs
    if args.only:
        todo = _matching(jobs, args.only)
        if not todo:
            parser.error(f"--only {args.only!r} matches no job of the parts {', '.join(parts)}")
        todo += [j for j in rerun if j not in todo]
        needed = {a for j in todo for a in j.after}
        todo = [j for j in jobs if j in todo or j.name in needed]
    ledger_dir = None if args.no_ledger else args.ledger or (LEDGER if args.profile == "full" else None)
    if ledger_dir is not None and args.profile != "full" and ledger_dir.resolve() == LEDGER:
        parser.error(f"the repository's ledger keeps the full profile only; give the {args.profile} profile another")
    ledger = Ledger(ledger_dir, out, jobs) if ledger_dir is not None else None
    if ledger is not None:
        # a report runs nothing, so no job needs another's model: everything the ledger holds is restored
        plan = plan_study(jobs, [] if args.report_only else todo, out, ledger, {j.name for j in rerun})
        for name, reason in plan.reasons.items():
            print(f"{name}: {reason}", flush=True)
        print(
            f"ledger {ledger}: {len(plan.restored)} jobs restored, {len(plan.here)} finished in {out} "
            f"({len(plan.recorded)} of them added to the ledger), {len(plan.run)} to run",
            flush=True,
        )
        todo = plan.run
    elif rerun:
        _set_aside_finished(out, rerun)
    if not args.report_only:
        t0 = time.perf_counter()
        init_store(uri)
        if todo:
            prepare_data(out, profile, parts)
        run_jobs(todo, out, workers=args.workers, threads=args.threads, progress=not args.no_progress, ledger=ledger)
        print(f"all {len(todo)} jobs finished ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    path = write_report(out, jobs, args.profile, publish=args.publish)
    print(f"report: {path}" + (f" (published to {args.publish / 'RESULTS.md'})" if args.publish else ""), flush=True)
    return 0
