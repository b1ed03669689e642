"""The ledger: a tracked folder with the small outputs of every finished job, so the study grows across days.

A study folder (``runs/results``) does not outlive the machine it was made on; the ledger (``results/ledger/``
in the repository, committed) does. Each finished job has one entry, ``LEDGER/<job name>/``:

- ``manifest.json``: the job, its command with the machine's paths replaced by placeholders
  (:func:`~pipelines.results.jobs.portable_command`), the SHA-256 of every bundle file the job reads
  (``bundles``: :func:`bundle_hashes`), the commit, wall time, finish time and machine it ran on, the entries
  of the jobs it ran after (``after``: name -> entry id), and every file with its size and SHA-256;
- ``jobs/...``: the files themselves, at the paths they have under the study folder: ``done.json`` and the
  outputs the report reads (:attr:`~pipelines.results.jobs.Job.keeps`), never checkpoints, MLflow stores,
  data sets (:data:`NEVER_KEPT`) or a file over :data:`MAX_FILE_BYTES`.

An entry's id is the SHA-256 of its ``manifest.json`` (first 16 hex digits). An entry is written in a
temporary folder beside the others and renamed into place, so it appears complete or not at all; an entry
it replaces is moved to ``LEDGER/.stale/<name>-<commit>/`` first, never deleted. A job restored from the
ledger into a study folder gets :data:`RESTORED` beside its ``done.json`` (the entry it came from and the
files copied), which marks the folder as a copy the next run may refresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ppi_med.atomic import atomic_write_bytes, atomic_write_json

from ..bundle_config import include_root, includes
from .jobs import Job
from .paths import ROOT

__all__ = [
    "FORMAT",
    "LEDGER",
    "MANIFEST",
    "MAX_FILE_BYTES",
    "NEVER_KEPT",
    "RESTORED",
    "STALE",
    "EntryState",
    "Ledger",
    "bundle_files",
    "bundle_hashes",
    "sha256_file",
]

#: the repository's ledger (``make results`` uses it with the full profile)
LEDGER = ROOT / "results" / "ledger"
MANIFEST = "manifest.json"
#: the file a restored job's folder holds beside ``done.json``
RESTORED = "ledger.json"
#: where replaced entries are kept, under the ledger
STALE = ".stale"
FORMAT = 1
#: a kept output larger than this is left out (and listed in the manifest): the ledger is committed
MAX_FILE_BYTES = 2 << 20
#: never kept, whatever a job's patterns match: model checkpoints, MLflow and other stores, image volumes
NEVER_KEPT = (".pt", ".pth", ".ckpt", ".safetensors", ".db", ".sqlite", ".nii", ".nii.gz", ".npy", ".npz", ".dcm")
_TEMPORARY = ".tmp-"


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _display(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it (the ledger's own), else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def bundle_files(configs: Sequence[str], repo: Path = ROOT) -> list[Path]:
    """Every bundle file a job that runs ``configs`` reads, symbolic links resolved.

    That is each config, the files its ``%path#id`` macros include (found as
    :func:`~pipelines.bundle_config.include_root` finds them, and their own includes in turn), and the
    ``metadata.json`` beside the first config as the command names it, which ``monai.bundle run`` and site CV
    read by default (``bundles/metadata.json`` links to the GA bundle's).

    Args:
        configs: bundle configs, relative to ``repo``, as the job's command names them (``Job.bundles``).
        repo: the repository they lie in.

    Returns:
        The files, each once, in the order they were found.

    Raises:
        FileNotFoundError: a config or an included file does not exist.
        ValueError: a config is not JSON.
    """
    pending = [repo / c for c in configs]
    if configs and (repo / configs[0]).parent.joinpath("metadata.json").is_file():
        pending.append((repo / configs[0]).parent / "metadata.json")
    found: list[Path] = []
    while pending:
        path = pending.pop(0)
        if not path.is_file():
            raise FileNotFoundError(f"bundle file {path} not found")
        if path.resolve() in found:
            continue
        found.append(path.resolve())
        try:
            config = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"bundle file {path} is not JSON: {err}") from err
        paths = includes(config)
        if paths:
            root = include_root(path, config)
            pending += [root / p for p in sorted(paths)]
    return found


def bundle_hashes(configs: Sequence[str], repo: Path = ROOT) -> dict[str, str]:
    """The SHA-256 of every file of :func:`bundle_files`, by its path relative to ``repo``.

    Raises:
        FileNotFoundError: a bundle file does not exist.
        ValueError: a config is not JSON, or a file lies outside ``repo`` (its path would name this machine).
    """
    top = Path(repo).resolve()
    hashes = {}
    for path in bundle_files(configs, repo):
        if not path.is_relative_to(top):
            raise ValueError(f"bundle file {path} lies outside the repository {top}")
        hashes[path.relative_to(top).as_posix()] = sha256_file(path)
    return dict(sorted(hashes.items()))


def job_command(job: Job) -> list[str]:
    """The command the ledger compares: the portable one, or ``argv`` for a job made by hand."""
    return list(job.command or job.argv)


@dataclass(frozen=True)
class EntryState:
    """What a job's ledger entry is worth today.

    Attributes:
        kind: ``usable``; ``missing`` (no entry); ``refused`` (damaged: a file missing, changed or unlisted, or
            no readable manifest); ``stale`` (made by another command, from other bundle files, or after another
            run of a job it needs).
        reason: why it cannot be used (empty when usable), naming the entry.
        entry_id: the entry's id (``None`` when missing or without a readable manifest).
    """

    kind: str
    reason: str = ""
    entry_id: str | None = None


class Ledger:
    """One ledger folder and the study folder whose jobs it keeps.

    Args:
        root: the ledger folder (created when the first entry is written).
        out: the study folder.
        jobs: the study's jobs (which folders each job writes into decides which entry a file belongs to).
        repo: the repository whose bundle files the jobs read (:attr:`~pipelines.results.jobs.Job.bundles`).
    """

    def __init__(self, root: Path, out: Path, jobs: Sequence[Job] = (), repo: Path = ROOT) -> None:
        self.root = Path(root).resolve()
        self.out = Path(out).resolve()
        self.repo = Path(repo)
        #: folders (relative to OUT/jobs) that a job other than their folder's own writes into
        self.claimed = {w.rstrip("/"): j.name for j in jobs for w in j.writes}
        self._bundle_hashes: dict[tuple[str, ...], dict[str, str]] = {}

    def __str__(self) -> str:
        return _display(self.root)

    # ----- reading entries --------------------------------------------------------------------------------

    def entry(self, name: str) -> Path:
        """The entry folder of job ``name``."""
        return self.root / name

    def names(self) -> list[str]:
        """The jobs that have an entry (stale and temporary folders left out)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def entry_id(self, name: str) -> str | None:
        """The id of ``name``'s entry: SHA-256 of its manifest's bytes (16 hex digits); ``None`` without one."""
        path = self.entry(name) / MANIFEST
        return sha256_file(path)[:16] if path.is_file() else None

    def manifest(self, name: str) -> dict | None:
        """``name``'s manifest, or ``None`` when it is missing or unreadable."""
        try:
            data = json.loads((self.entry(name) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def bundle_hashes(self, job: Job) -> dict[str, str]:
        """:func:`bundle_hashes` of ``job``'s bundle files, read once per ledger object.

        A study plans with the ledger it records with, so a job that finishes hours later is recorded with the
        bundle files as they were when the study started, not with an edit made while it ran.
        """
        if job.bundles not in self._bundle_hashes:
            self._bundle_hashes[job.bundles] = bundle_hashes(job.bundles, self.repo)
        return self._bundle_hashes[job.bundles]

    def changed_bundle_files(self, job: Job) -> list[str] | None:
        """The bundle files of ``job`` whose SHA-256 differs from its entry's (added or no longer read too).

        Returns:
            The paths, relative to the repository (empty when none changed); ``None`` when the entry (or its
            manifest) is missing or was made before bundle hashes were recorded.
        """
        recorded = (self.manifest(job.name) or {}).get("bundles")
        if not isinstance(recorded, dict):
            return None
        today = self.bundle_hashes(job)
        return sorted(p for p in recorded.keys() | today.keys() if recorded.get(p) != today.get(p))

    def problems(self, name: str) -> list[str]:
        """What is wrong with ``name``'s entry as stored: empty when every file matches its manifest.

        Args:
            name: the job.

        Returns:
            One line per problem: an unreadable manifest, a listed file missing or with another size or
            SHA-256, a file the manifest does not list, a file of a kind the ledger never keeps.
        """
        folder = self.entry(name)
        data = self.manifest(name)
        if data is None:
            return [f"no readable {MANIFEST}"]
        if data.get("format") != FORMAT or data.get("job") != name or not isinstance(data.get("files"), dict):
            return [f"{MANIFEST} is not a format-{FORMAT} manifest of job {name}"]
        found = []
        for rel, spec in sorted(data["files"].items()):
            path = folder / rel
            if not path.is_file():
                found.append(f"{rel} is missing")
            elif path.stat().st_size != spec.get("bytes"):
                found.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {spec.get('bytes')}")
            elif sha256_file(path) != spec.get("sha256"):
                found.append(f"{rel}: SHA-256 differs from the manifest")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST and rel not in data["files"]:
                found.append(f"{rel} is not in the manifest")
            if path.name.endswith(NEVER_KEPT):
                found.append(f"{rel} is a kind of file the ledger never keeps")
        return found

    def state(self, job: Job, after_ids: Mapping[str, str | None]) -> EntryState:
        """Whether ``job``'s entry can stand for a run of it today.

        Args:
            job: the job.
            after_ids: for each job it runs after, the id its entry will have in this study (``None``: that job
                runs again, so no earlier entry can match).

        Returns:
            The entry's state, with the reason when it is not usable.
        """
        where = _display(self.entry(job.name))
        if not self.entry(job.name).is_dir():
            return EntryState("missing", f"no ledger entry {where}")
        entry_id = self.entry_id(job.name)
        problems = self.problems(job.name)
        if problems:
            return EntryState("refused", f"ledger entry {where} refused: {'; '.join(problems)}", entry_id)
        data = self.manifest(job.name) or {}
        command = job_command(job)
        if data.get("command") != command:
            old = list(data.get("command") or [])
            at = next((i for i, (a, b) in enumerate(zip(old, command)) if a != b), min(len(old), len(command)))
            was = " ".join(old[at : at + 2]) or "(end)"
            now = " ".join(command[at : at + 2]) or "(end)"
            return EntryState(
                "stale", f"ledger entry {where} was made by another command (argument {at}: {was!r}, now {now!r})",
                entry_id,
            )  # fmt: skip
        changed = self.changed_bundle_files(job)
        if changed is None:
            return EntryState("stale", f"ledger entry {where} was made before bundle hashes were recorded", entry_id)
        if changed:
            commit = str(data.get("commit") or "unknown")[:12]
            reason = f"ledger entry {where} is stale: {', '.join(changed)} changed since commit {commit}"
            return EntryState("stale", reason, entry_id)
        recorded = data.get("after") or {}
        for dep in job.after:
            if recorded.get(dep) is None or recorded.get(dep) != after_ids.get(dep):
                return EntryState("stale", f"ledger entry {where} was made after another run of {dep}", entry_id)
        return EntryState("usable", "", entry_id)

    def done_sha(self, name: str) -> str | None:
        """The SHA-256 of the ``done.json`` that ``name``'s entry holds (``None`` without an entry)."""
        data = self.manifest(name) or {}
        return (data.get("files") or {}).get(f"jobs/{name}/done.json", {}).get("sha256")

    # ----- writing entries --------------------------------------------------------------------------------

    def _owner(self, rel: str) -> str:
        """The job whose entry a path relative to ``OUT/jobs`` belongs to."""
        for folder, job in self.claimed.items():
            if rel == folder or rel.startswith(folder + "/"):
                return job
        return rel.split("/", 1)[0]

    def payload(self, job: Job) -> tuple[dict[str, Path], dict[str, int], dict[str, int]]:
        """The files of ``job`` the ledger keeps, and those it leaves out, from the study folder.

        Args:
            job: a finished job.

        Returns:
            ``(kept, left_out, too_large)``: path relative to the study folder -> file; -> size in bytes, for
            every other file of the job's folders (checkpoints, logs the report does not read...); -> size, for
            the files :attr:`~pipelines.results.jobs.Job.keeps` asks for that are over :data:`MAX_FILE_BYTES`.

        Raises:
            FileNotFoundError: the job has no ``done.json``.
        """
        jobs_dir = self.out / "jobs"
        if not (jobs_dir / job.name / "done.json").is_file():
            raise FileNotFoundError(f"job {job.name} has no {jobs_dir / job.name / 'done.json'}: it has not finished")
        kept: dict[str, Path] = {}
        left: dict[str, int] = {}
        too_large: dict[str, int] = {}
        for pattern in (f"{job.name}/done.json", *job.keeps):
            for path in sorted(jobs_dir.glob(pattern)):
                rel = path.relative_to(jobs_dir).as_posix()
                if not path.is_file() or path.name == RESTORED or self._owner(rel) != job.name:
                    continue
                if path.name.endswith(NEVER_KEPT) or path.stat().st_size > MAX_FILE_BYTES:
                    left[f"jobs/{rel}"] = path.stat().st_size
                    if not path.name.endswith(NEVER_KEPT):
                        too_large[f"jobs/{rel}"] = path.stat().st_size
                else:
                    kept[f"jobs/{rel}"] = path
        for folder in (job.name, *job.writes):
            for path in (jobs_dir / folder).rglob("*"):
                rel = path.relative_to(jobs_dir).as_posix()
                if path.is_file() and f"jobs/{rel}" not in kept and self._owner(rel) == job.name:
                    left[f"jobs/{rel}"] = path.stat().st_size
        return kept, left, too_large

    def record(self, job: Job) -> Path:
        """Write ``job``'s entry from the study folder, replacing (and keeping aside) the one it had.

        The files are copied into a temporary folder inside the ledger, hashed there, the manifest written,
        and the folder renamed into place: the entry appears complete or not at all. An output the report
        reads that is over :data:`MAX_FILE_BYTES` is left out, listed in the manifest (``left_out``,
        ``too_large``) and named on stdout: the report will lack it for a restored job.

        Args:
            job: a finished job (its ``done.json`` is in the study folder).

        Returns:
            The entry's folder.

        Raises:
            FileNotFoundError: the job has not finished.
            OSError: a file could not be copied (the ledger is left as it was).
        """
        kept, left, too_large = self.payload(job)
        for rel, size in too_large.items():
            print(f"ledger {self}: {job.name}'s {rel} ({size} bytes) is over {MAX_FILE_BYTES} bytes: left out")
        done = json.loads(kept[f"jobs/{job.name}/done.json"].read_text())
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMPORARY}{job.name}-", dir=self.root))
        try:
            files = {}
            for rel, src in sorted(kept.items()):
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
                files[rel] = {"bytes": dst.stat().st_size, "sha256": sha256_file(dst)}
            manifest = {
                "format": FORMAT,
                "job": job.name,
                "part": job.part,
                "command": job_command(job),
                "bundles": self.bundle_hashes(job),
                "commit": done.get("commit"),
                "finished": done.get("finished"),
                "wall_s": done.get("wall_s"),
                "machine": done.get("machine"),
                "after": {dep: self.entry_id(dep) for dep in job.after},
                "files": files,
                "left_out": {
                    "files": len(left),
                    "bytes": sum(left.values()),
                    "largest": _largest(left),
                    "too_large": too_large,
                },
            }
            atomic_write_json(tmp / MANIFEST, manifest, indent=1)
            target = self.entry(job.name)
            if target.exists():
                self.set_aside(job.name)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def set_aside(self, name: str) -> Path:
        """Move ``name``'s entry to ``.stale/<name>-<commit>`` (a number added where that is taken).

        Returns:
            Where it went.
        """
        data = self.manifest(name) or {}
        commit = str(data.get("commit") or "unknown")[:12]
        base = self.root / STALE / f"{name}-{commit}"
        target, n = base, 1
        while target.exists():
            n += 1
            target = base.with_name(f"{base.name}-{n}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.entry(name), target)
        return target

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary folders of entries whose writing was cut short; returns them."""
        found = sorted(self.root.glob(f"{_TEMPORARY}*")) if self.root.is_dir() else []
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        return found

    # ----- restoring into the study folder ----------------------------------------------------------------

    def restore(self, job: Job) -> None:
        """Copy ``job``'s entry into the study folder, ``done.json`` last, with :data:`RESTORED` beside it.

        Args:
            job: a job whose entry is usable.
        """
        data = self.manifest(job.name) or {}
        done = f"jobs/{job.name}/done.json"
        files = sorted(data.get("files", {}))
        for rel in [r for r in files if r != done]:
            dst = self.out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.entry(job.name) / rel, dst)
        marker = {"entry": self.entry_id(job.name), "ledger": str(self), "restored": time.strftime("%Y-%m-%d %H:%M")}
        atomic_write_json(self.out / "jobs" / job.name / RESTORED, {**marker, "files": files}, indent=1)
        atomic_write_bytes(self.out / done, (self.entry(job.name) / done).read_bytes())

    def restored_entry(self, name: str) -> str | None:
        """The entry id a restored job's folder came from; ``None`` for a folder the job ran in (or none)."""
        path = self.out / "jobs" / name / RESTORED
        try:
            return json.loads(path.read_text()).get("entry") if path.is_file() else None
        except (OSError, ValueError):
            return "unreadable"

    def remove_restored(self, name: str) -> None:
        """Delete a restored copy from the study folder: the files it listed and its own folder."""
        path = self.out / "jobs" / name / RESTORED
        try:
            listed = json.loads(path.read_text()).get("files", [])
        except (OSError, ValueError):
            listed = []
        for rel in listed:
            (self.out / rel).unlink(missing_ok=True)
        shutil.rmtree(self.out / "jobs" / name, ignore_errors=True)


def _largest(left: Mapping[str, int], n: int = 3) -> dict[str, int]:
    """The ``n`` largest files left out (path -> bytes): what a checkpoint of the job weighs."""
    return dict(sorted(left.items(), key=lambda kv: -kv[1])[:n])
