"""Running the study's jobs side by side, and the done-store that lets an interrupted study resume.

A job has finished when ``OUT/jobs/<name>/done.json`` exists; a rerun skips those and starts the rest. With a
ledger (:mod:`.ledger`), each job's small outputs go into it as soon as the job has finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ppi_med.tracking import git_commit

from .jobs import Job
from .ledger import Ledger, job_command
from .machine import machine_info
from .paths import ROOT

__all__ = ["done_path", "run_jobs"]


def _tree_clean() -> bool:
    """Whether the repository's tracked files equal its checked-out commit (no uncommitted change)."""
    try:
        done = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def done_path(out: Path, job: Job) -> Path:
    """The record a finished job leaves (exit code, wall time, peak memory, commit, its ``meta``)."""
    return out / "jobs" / job.name / "done.json"


def run_jobs(
    jobs: Sequence[Job],
    out: Path,
    *,
    workers: int = 2,
    threads: int = 1,
    progress: bool = True,
    ledger: Ledger | None = None,
) -> None:
    """Run every unfinished job, ``workers`` at a time, each with ``threads`` CPU threads.

    A job's output goes to ``OUT/jobs/<name>/log.txt``; on success ``done.json`` records exit code, wall time,
    peak resident memory (of the job's process, from ``wait4``), the commit, the portable command and the
    machine, and the job is added to ``ledger``. A failed job's log is kept and named; the others still run.

    Args:
        jobs: the jobs; those already done are skipped.
        out: the study folder.
        workers: jobs at a time.
        threads: CPU threads per job (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``).
        progress: show a progress bar.
        ledger: where each finished job's entry is written (none: no ledger).

    Raises:
        RuntimeError: some jobs failed (each named with its log), a job waits on a failed one, or a finished
            job could not be added to the ledger (named; the next run adds it from the study folder).
    """
    pending = [j for j in jobs if not done_path(out, j).is_file()]
    names = {j.name for j in jobs}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # the Popen objects stay referenced: one dropped while its process runs is reaped by the next Popen (Python's
    # subprocess cleanup), and os.wait4 below would then wait for it forever
    running: dict[int, tuple[Job, float, object, str, bool, subprocess.Popen]] = {}
    failed: list[str] = []
    unrecorded: list[str] = []
    bar = tqdm(total=len(pending), desc="results", unit="job", disable=not progress)
    while pending or running:
        ready = [j for j in pending if all((out / "jobs" / a / "done.json").is_file() for a in j.after if a in names)]
        # a job whose models another job reads is followed by that one as soon as possible: the ledger keeps no
        # models, so a study cut short between the two would have to train the first again
        ready.sort(key=lambda j: not j.after)
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
            # the code a job runs is the tree at its start: another commit may land while a study runs
            commit, clean = git_commit(ROOT), _tree_clean()
            proc = subprocess.Popen(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[proc.pid] = (job, time.perf_counter(), log, commit, clean, proc)
        if not running:
            if pending:  # waiting on jobs outside this run that never finished
                raise RuntimeError(f"jobs wait on unfinished jobs: {[j.name for j in pending]}")
            break
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, t0, log, commit, clean, proc = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: the object must not wait again
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
            # False: tracked files differed from the commit when the job started, so the commit alone does not
            # name the code it ran
            "tree_clean": clean,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "meta": job.meta,
            "command": job_command(job),
            "machine": machine_info(),
        }
        done_path(out, job).write_text(json.dumps(record, indent=1))
        if ledger is not None:
            try:
                ledger.record(job)
            except OSError as err:  # the job stays finished here; the next run records it from this folder
                unrecorded.append(f"{job.name} ({err})")
                tqdm.write(f"job {job.name} finished but could not be added to the ledger {ledger}: {err}")
    bar.close()
    problems = []
    if failed:
        logs = ", ".join(f"{n} ({out / 'jobs' / n / 'log.txt'})" for n in failed)
        problems.append(f"{len(failed)} job(s) failed or could not run: {logs}")
    if unrecorded:
        problems.append(f"{len(unrecorded)} finished job(s) not added to the ledger {ledger}: {', '.join(unrecorded)}")
    if problems:
        raise RuntimeError("; ".join(problems))
