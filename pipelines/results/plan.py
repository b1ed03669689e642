"""Before jobs start: what the ledger and the study folder already hold, what is restored and what runs.

Each job of the study is, after :func:`plan_study`:

- ``here``: finished in this study folder by today's command (with its checkpoints); added to the ledger when
  the ledger lacks it or holds a damaged or stale entry of it (but a folder whose run is the ledger's entry,
  stale because a bundle file changed since, runs again: it was made from the old files);
- ``ledger``: restored from a usable ledger entry (a restored copy already in the folder is kept when it is
  of the same entry);
- ``run``: to run, because the ledger has no usable entry (missing, refused, stale), ``--rerun`` names it, a
  job it runs after runs again, or a job that must run reads its model (the ledger keeps no checkpoints, so
  a restored job whose models another job reads is run again; a job that reads only what the ledger keeps of
  the jobs it runs after, as a merge of site studies, runs on their restored copies).

A finished folder that is not used is moved aside (``<name>.attempt-<time>``), never deleted; a restored copy
is only a copy of its entry and is deleted when it is not used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .jobs import Job
from .ledger import Ledger, job_command, sha256_file

__all__ = ["Plan", "finished_command", "plan_study"]


@dataclass
class Plan:
    """What :func:`plan_study` decided.

    Attributes:
        run: the jobs to run, in order.
        restored: jobs restored from the ledger (or whose restored copy was kept).
        here: jobs finished in the study folder by today's command.
        recorded: jobs of ``here`` added to the ledger now.
        reasons: job -> why it runs (or is left out) instead of being restored.
    """

    run: list[Job] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    here: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


def finished_command(folder: Path, job: Job) -> list[str] | None:
    """The command a finished job folder was made by: its ``done.json``'s, else its log's first line.

    A ``done.json`` written before the command was recorded has none; its log's ``$ argv`` line is compared
    with today's ``argv`` then (both name the same study folder).

    Returns:
        The portable command, ``job_command(job)`` where the log line matches today's, else ``None``.
    """
    try:
        done = json.loads((folder / "done.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(done.get("command"), list):
        return done["command"]
    log = folder / "log.txt"
    if log.is_file():
        with open(log, errors="replace") as fh:
            if fh.readline().rstrip("\n") == f"$ {' '.join(job.argv)}":
                return job_command(job)
    return None


def _set_aside(folder: Path, stamp: str) -> Path:
    """Rename a job folder to ``<name>.attempt-<stamp>`` (a number added where that is taken)."""
    target, n = folder.with_name(f"{folder.name}.attempt-{stamp}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.attempt-{stamp}-{n}")
    folder.rename(target)
    return target


def plan_study(
    jobs: Sequence[Job], todo: Sequence[Job], out: Path, ledger: Ledger, rerun: Collection[str] = ()
) -> Plan:
    """Restore the jobs the ledger holds, add this folder's finished ones to it, and say which jobs run.

    Args:
        jobs: every job of the chosen parts, a job after those it runs after.
        todo: the jobs this run may start (``--only``, with the jobs they run after).
        out: the study folder.
        ledger: the ledger.
        rerun: names of jobs to run again whatever is finished or kept.

    Returns:
        The plan; the study folder and the ledger already reflect it (restored, set aside, recorded).
    """
    names = {j.name for j in jobs}
    allowed = {j.name for j in todo} | set(rerun)
    state: dict[str, str] = {}
    ids: dict[str, str | None] = {}  # the entry id each job's ledger entry will have once the plan is carried out
    record: set[str] = set()
    plan = Plan()
    ledger.remove_temporaries()
    for job in jobs:
        folder = out / "jobs" / job.name
        deps = [d for d in job.after if d in names]
        after_ids = {d: ids.get(d) for d in deps}
        if job.name in rerun:
            state[job.name], ids[job.name] = "run", None
            plan.reasons[job.name] = "--rerun names it"
            continue
        entry = ledger.state(job, after_ids)
        restored = ledger.restored_entry(job.name)
        finished = (folder / "done.json").is_file()
        if finished and restored is None and all(state.get(d) == "here" for d in deps):
            ran_here = ledger.done_sha(job.name) == sha256_file(folder / "done.json")
            if ran_here and ledger.changed_bundle_files(job):  # the entry is this folder's run: old bundle files
                plan.reasons[job.name] = f"{entry.reason} (this folder's run is that entry's)"
            elif finished_command(folder, job) == job_command(job):
                state[job.name] = "here"
                same = entry.kind == "usable" and ran_here
                if entry.kind == "usable" and not same:  # another machine's run of it, in the ledger: it wins
                    state[job.name], ids[job.name] = "ledger", entry.entry_id
                    plan.reasons[job.name] = "the ledger holds another run of it; this folder's is set aside"
                elif same:
                    ids[job.name] = entry.entry_id
                else:
                    record.add(job.name)
                    ids[job.name] = None
                continue
            else:
                plan.reasons[job.name] = "this folder's run was made by another command"
        if entry.kind == "usable":
            state[job.name], ids[job.name] = "ledger", entry.entry_id
        else:
            state[job.name], ids[job.name] = "run", None
            plan.reasons.setdefault(job.name, entry.reason)
    # a job that runs reads the models of the jobs it runs after: those cannot come from the ledger; and a job
    # restored or kept after one that runs again would not match it
    changed = True
    while changed:
        changed = False
        for job in jobs:
            deps = [d for d in job.after if d in names]
            if state[job.name] == "run" and job.name in allowed and job.reads_models:
                for d in deps:
                    if state[d] == "ledger":
                        state[d], ids[d], changed = "run", None, True
                        plan.reasons[d] = f"{job.name} runs and needs its model (the ledger keeps no checkpoints)"
                        allowed.add(d)
            elif state[job.name] != "run" and any(state[d] == "run" for d in deps):
                ran = next(d for d in deps if state[d] == "run")
                state[job.name], ids[job.name], changed = "run", None, True
                plan.reasons[job.name] = f"{ran} runs again"
                record.discard(job.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for job in jobs:
        folder = out / "jobs" / job.name
        restored = ledger.restored_entry(job.name)
        if state[job.name] == "ledger" and restored is not None and restored == ledger.entry_id(job.name):
            if (folder / "done.json").is_file():
                plan.restored.append(job.name)
                continue
        if restored is not None:
            ledger.remove_restored(job.name)
        elif folder.exists() and state[job.name] != "here":
            _set_aside(folder, stamp)
        if state[job.name] == "ledger":
            ledger.restore(job)
            plan.restored.append(job.name)
        elif state[job.name] == "here":
            plan.here.append(job.name)
            if job.name in record:
                ledger.record(job)
                plan.recorded.append(job.name)
        elif job.name in allowed:
            plan.run.append(job)
    return plan
