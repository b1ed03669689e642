"""The ``make results`` ledger: entries written as jobs finish, restored into a new study folder, stale and
damaged entries run again and kept aside, no checkpoint ever kept; an entry is stale when a bundle file its
job reads changed (tests edit copies of the bundles, never the repository's).

Every ledger here is a temporary folder; the repository's ``results/ledger`` is never written (one test checks
that the quick profile leaves it as it was).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines.results.cli as results_cli
from pipelines.results import BUNDLES, PARTS, PROFILES, Job, build_jobs, main, run_jobs
from pipelines.results.jobs import portable_command
from pipelines.results.ledger import LEDGER, MANIFEST, RESTORED, STALE, Ledger, bundle_hashes, sha256_file
from pipelines.results.paths import ROOT
from pipelines.results.plan import plan_study
from pipelines.results.store import tracking_uri

# ----- jobs made by hand: a "training" job that leaves a model, and a job that reads it -------------------------

TRAIN = """
import pathlib, sys
run = pathlib.Path(sys.argv[1]) / "jobs" / "train" / "runs" / "r1"
run.mkdir(parents=True, exist_ok=True)
(run / "model.pt").write_bytes(b"weights" * 1000)
(run / "test_predictions.csv").write_text("image,label,prob\\na,1,0.9\\n")
(run / "store.db").write_bytes(b"sqlite")
"""
EXPLAIN = """
import pathlib, sys
out = pathlib.Path(sys.argv[1]) / "jobs"
weights = (out / "train" / "runs" / "r1" / "model.pt").read_bytes()  # fails without the model
(out / "explain").mkdir(exist_ok=True)
(out / "explain" / "eval.csv").write_text(f"method,n\\nwbp,{len(weights)}\\n")
"""


def _jobs(out: Path, explain_code: str = EXPLAIN) -> list[Job]:
    """``train`` and ``explain`` (after it), with portable commands as :func:`build_jobs` gives them."""
    jobs = [
        Job("train", "ga", [sys.executable, "-c", TRAIN, str(out)], keeps=("train/runs/*/*",)),
        Job("explain", "saliency", [sys.executable, "-c", explain_code, str(out)], ("train",), keeps=("explain/*",)),
    ]
    for job in jobs:
        job.command = portable_command(job.argv, out, ROOT, "sqlite://")
    return jobs


def _finish_by_hand(out: Path, job: Job, files: dict[str, bytes], commit: str = "a" * 40) -> None:
    """A finished job folder as the scheduler leaves it, without running anything."""
    folder = out / "jobs" / job.name
    for rel, data in files.items():
        (out / "jobs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / "jobs" / rel).write_bytes(data)
    done = {"job": job.name, "part": job.part, "returncode": 0, "wall_s": 1.0, "max_rss_mb": 1.0, "commit": commit}
    done.update(finished="2026-12-01 10:00:00", meta={}, command=job.command, machine={"cpus": 2, "gpu": None})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").write_text(json.dumps(done))


def _finish_both(out: Path, ledger: Ledger) -> list[Job]:
    jobs = _jobs(out)
    _finish_by_hand(out, jobs[0], {"train/runs/r1/model.pt": b"w" * 50, "train/runs/r1/test_predictions.csv": b"p"})
    ledger.record(jobs[0])
    _finish_by_hand(out, jobs[1], {"explain/eval.csv": b"e"})
    ledger.record(jobs[1])
    return jobs


class _Starts:
    """Records the job commands ``subprocess.Popen`` starts (git and other helpers pass through unrecorded)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.argvs: list[list[str]] = []
        real = subprocess.Popen

        def popen(args, *a, **kw):
            if kw.get("cwd") == ROOT and isinstance(args, list) and args and args[0] == sys.executable:
                self.argvs.append(list(args))
            return real(args, *a, **kw)

        monkeypatch.setattr(subprocess, "Popen", popen)

    def names(self, jobs: list[Job]) -> list[str]:
        return [j.name for a in self.argvs for j in jobs if j.argv == a]


# ----- fast: the ledger's own rules, on folders written by hand ------------------------------------------------


def test_portable_command_is_the_same_in_any_study_folder(tmp_path):
    out = ROOT / "runs" / "results"  # the default study folder lies inside the repository
    uri = f"sqlite:///{out}/mlflow.db"
    argv = [sys.executable, f"{ROOT}/benchmarks/b.py", "--out", f"{out}/jobs/x", "--tracking-uri", uri, str(out)]
    assert portable_command(argv, out, ROOT, uri) == [
        "{python}", "{root}/benchmarks/b.py", "--out", "{out}/jobs/x", "--tracking-uri", "{tracking_uri}", "{out}",
    ]  # fmt: skip
    other = tmp_path / "elsewhere"
    moved = [a.replace(str(out), str(other)) for a in argv]
    assert portable_command(moved, other, ROOT, uri.replace(str(out), str(other))) == portable_command(
        argv, out, ROOT, uri
    )
    # a folder whose name starts like the study folder's is not it
    assert portable_command([f"{out}-old/x"], out, ROOT, uri) == ["{root}/runs/results-old/x"]


def test_an_entry_keeps_the_listed_outputs_and_never_a_checkpoint_or_store(tmp_path, capsys):
    out, root = tmp_path / "out", tmp_path / "ledger"
    job = _jobs(out)[0]
    files = {
        "train/runs/r1/model.pt": b"w" * 5000,
        "train/runs/r1/store.db": b"db",
        "train/runs/r1/test_predictions.csv": b"image,label,prob\n",
        "train/runs/r1/big.csv": b"x" * (3 << 20),
        "train/log.txt": b"not asked for",
    }
    _finish_by_hand(out, job, files)
    ledger = Ledger(root, out, [job])
    entry = ledger.record(job)
    kept = sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*") if p.is_file())
    assert kept == ["jobs/train/done.json", "jobs/train/runs/r1/test_predictions.csv", MANIFEST]
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["command"][:2] == ["{python}", "-c"] and manifest["command"][-1] == "{out}"
    assert manifest["commit"] == "a" * 40 and manifest["machine"] == {"cpus": 2, "gpu": None}
    for rel, spec in manifest["files"].items():
        assert spec == {"bytes": (entry / rel).stat().st_size, "sha256": sha256_file(entry / rel)}
    # what was left out is counted, the checkpoint among the largest
    assert manifest["left_out"]["files"] == 4 and "jobs/train/runs/r1/model.pt" in manifest["left_out"]["largest"]
    # an output the report reads that is too large is named, in the manifest and when it is left out
    assert manifest["left_out"]["too_large"] == {"jobs/train/runs/r1/big.csv": 3 << 20}
    printed = capsys.readouterr().out
    assert "train's jobs/train/runs/r1/big.csv (3145728 bytes) is over 2097152 bytes: left out" in printed
    assert ledger.problems("train") == [] and ledger.state(job, {}).kind == "usable"
    assert not list(root.glob(".tmp-*"))


def test_a_damaged_entry_is_refused_and_named(tmp_path):
    out, root = tmp_path / "out", tmp_path / "ledger"
    jobs = _finish_both(out, Ledger(root, out))
    ledger = Ledger(root, out, jobs)
    preds = root / "train" / "jobs" / "train" / "runs" / "r1" / "test_predictions.csv"
    preds.write_bytes(b"q")  # same size, other bytes
    state = ledger.state(jobs[0], {})
    assert state.kind == "refused"
    assert f"ledger entry {root / 'train'} refused" in state.reason
    assert "jobs/train/runs/r1/test_predictions.csv: SHA-256 differs from the manifest" in state.reason
    preds.unlink()
    assert "jobs/train/runs/r1/test_predictions.csv is missing" in ledger.state(jobs[0], {}).reason
    (root / "explain" / "jobs" / "explain" / "extra.pt").write_bytes(b"w")
    problems = ledger.problems("explain")
    assert problems == [
        "jobs/explain/extra.pt is not in the manifest",
        "jobs/explain/extra.pt is a kind of file the ledger never keeps",
    ]
    (root / "explain" / MANIFEST).write_text("{not json")
    assert ledger.state(jobs[1], {}).reason.endswith(f"refused: no readable {MANIFEST}")


def test_an_entry_is_stale_for_another_command_or_another_run_of_what_it_needs(tmp_path):
    out, root = tmp_path / "out", tmp_path / "ledger"
    jobs = _finish_both(out, Ledger(root, out))
    ledger = Ledger(root, out, jobs)
    train_id = ledger.entry_id("train")
    assert ledger.state(jobs[1], {"train": train_id}).kind == "usable"
    state = ledger.state(jobs[1], {"train": None})
    assert state.kind == "stale" and state.reason.endswith("was made after another run of train")
    changed = dataclasses.replace(jobs[0], command=[*jobs[0].command[:-1], "{out}/other"])
    state = ledger.state(changed, {})
    assert state.kind == "stale" and "made by another command (argument 3: '{out}', now '{out}/other')" in state.reason


def _small_repo(path: Path) -> Path:
    """A repository with one bundle laid out as the real ones: a link to its train config, which includes a
    shared file, and the metadata beside the link as a link too."""
    (path / "bundles" / "common").mkdir(parents=True)
    (path / "bundles" / "x" / "configs").mkdir(parents=True)
    (path / "bundles" / "common" / "base.json").write_text('{"lr": 0.1}')
    train = {"common": "%bundles/common/base.json", "ppi": "%bundles/common/base.json#lr", "own": "%ppi"}
    (path / "bundles" / "x" / "configs" / "train.json").write_text(json.dumps(train))
    (path / "bundles" / "x" / "configs" / "metadata.json").write_text('{"version": "0.1"}')
    (path / "bundles" / "x.json").symlink_to("x/configs/train.json")
    (path / "bundles" / "metadata.json").symlink_to("x/configs/metadata.json")
    return path


def test_bundle_hashes_follow_links_includes_and_the_metadata_beside_the_config(tmp_path):
    repo = _small_repo(tmp_path)
    hashes = bundle_hashes(["bundles/x.json"], repo)
    files = ["bundles/common/base.json", "bundles/x/configs/metadata.json", "bundles/x/configs/train.json"]
    assert list(hashes) == files and all(hashes[f] == sha256_file(repo / f) for f in files)
    assert bundle_hashes([], repo) == {}
    (repo / "bundles" / "common" / "base.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"bundles/x.json includes \['bundles/common/base.json'\]"):
        bundle_hashes(["bundles/x.json"], repo)
    (repo / "bundles" / "x" / "configs" / "train.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bundle file .*bundles/x.json is not JSON"):
        bundle_hashes(["bundles/x.json"], repo)


def test_every_bundle_job_names_the_bundle_files_it_reads_and_the_others_none():
    jobs = build_jobs(ROOT / "runs" / "results", PROFILES["quick"], PARTS, "sqlite://")
    named = {j.name: j.bundles for j in jobs}
    ga, saliency, lidc = (BUNDLES[k] for k in ("ga", "saliency", "lidc"))
    assert named["ga-baseline-s0"] == named["sites-baseline"] == named["sites-cue"] == (ga,)
    assert named["sites"] == ()  # the merge reads its parts' predictions; a part run again takes it along
    assert named["saliency-ppi_wbp"] == (ga, saliency) and named["lidc-baseline-f0"] == (lidc,)
    assert named["shortcut"] == named["cost"] == ()
    # the site studies pass the same bundle on their command line
    assert all(j.argv[j.argv.index("--config_file") + 1] == ga for j in jobs if j.name.startswith("sites-conf"))
    assert list(bundle_hashes([ga, saliency])) == [
        "bundles/common/base.json", "bundles/common/saliency.json",
        "bundles/ga_ppi/configs/metadata.json", "bundles/ga_ppi/configs/train.json",
    ]  # fmt: skip
    assert list(bundle_hashes([lidc])) == [
        "bundles/common/base.json", "bundles/lidc_ppi/configs/metadata.json", "bundles/lidc_ppi/configs/train.json",
    ]  # fmt: skip


def test_an_entry_is_stale_once_a_bundle_file_it_read_changed(tmp_path):
    repo, out, root = _small_repo(tmp_path / "repo"), tmp_path / "out", tmp_path / "ledger"
    jobs = _jobs(out)
    jobs[0].bundles = ("bundles/x.json",)
    _finish_by_hand(out, jobs[0], {"train/runs/r1/test_predictions.csv": b"p"})
    _finish_by_hand(out, jobs[1], {"explain/eval.csv": b"e"})
    ledger = Ledger(root, out, jobs, repo=repo)
    ledger.record(jobs[0])
    ledger.record(jobs[1])
    assert json.loads((root / "train" / MANIFEST).read_text())["bundles"] == bundle_hashes(jobs[0].bundles, repo)
    assert json.loads((root / "explain" / MANIFEST).read_text())["bundles"] == {}  # it runs no bundle
    assert Ledger(root, out, jobs, repo=repo).state(jobs[0], {}).kind == "usable"
    (repo / "bundles" / "common" / "base.json").write_text('{"lr": 0.2}')  # an included default changes
    state = Ledger(root, out, jobs, repo=repo).state(jobs[0], {})
    assert state.kind == "stale"
    assert state.reason.endswith(f"is stale: bundles/common/base.json changed since commit {'a' * 12}")
    # this folder's run is that entry: it was made from the old file, so it runs again and is set aside
    plan = plan_study(jobs, jobs, out, Ledger(root, out, jobs, repo=repo))
    assert [j.name for j in plan.run] == ["train", "explain"] and plan.here == []
    assert plan.reasons["train"] == f"{state.reason} (this folder's run is that entry's)"
    assert len(list((out / "jobs").glob("train.attempt-*/done.json"))) == 1
    # an entry written before the hashes were recorded cannot say what it was made from
    manifest = json.loads((root / "explain" / MANIFEST).read_text())
    del manifest["bundles"]
    (root / "explain" / MANIFEST).write_text(json.dumps(manifest))
    state = Ledger(root, out, jobs, repo=repo).state(jobs[1], {"train": Ledger(root, out).entry_id("train")})
    assert state.kind == "stale" and state.reason.endswith("was made before bundle hashes were recorded")


def test_writing_an_entry_is_all_or_nothing_and_keeps_the_one_it_replaces(tmp_path, monkeypatch):
    out, root = tmp_path / "out", tmp_path / "ledger"
    jobs = _finish_both(out, Ledger(root, out))
    ledger = Ledger(root, out, jobs)
    before = ledger.entry_id("train")
    calls = []
    real_copy = shutil.copyfile

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr("pipelines.results.ledger.shutil.copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        ledger.record(jobs[0])
    assert ledger.entry_id("train") == before and ledger.problems("train") == []
    assert not list(root.glob(".tmp-*")) and not (root / STALE).exists()
    monkeypatch.undo()
    _finish_by_hand(out, jobs[0], {}, commit="b" * 40)
    ledger.record(jobs[0])
    assert json.loads((root / "train" / MANIFEST).read_text())["commit"] == "b" * 40
    kept = root / STALE / f"train-{'a' * 12}"
    assert json.loads((kept / MANIFEST).read_text())["commit"] == "a" * 40
    assert sorted(ledger.names()) == ["explain", "train"]


def test_a_job_writing_into_another_jobs_folder_owns_those_files(tmp_path):
    out, root = tmp_path / "out", tmp_path / "ledger"
    study = Job("study", "sites", ["x"], keeps=("study/cv/*.md", "study/cv/cue/*"), command=["x"])
    cue = Job("cue", "sites", ["y"], ("study",), keeps=("study/cv/cue/*",), writes=("study/cv/cue",), command=["y"])
    _finish_by_hand(out, study, {"study/cv/summary.md": b"s", "study/cv/cue/effect.csv": b"c"})
    _finish_by_hand(out, cue, {})
    ledger = Ledger(root, out, [study, cue])
    assert sorted(ledger.payload(study)[0]) == ["jobs/study/cv/summary.md", "jobs/study/done.json"]
    assert ledger.payload(study)[2] == {}
    assert sorted(ledger.payload(cue)[0]) == ["jobs/cue/done.json", "jobs/study/cv/cue/effect.csv"]


def test_plan_restores_entries_and_runs_a_restored_job_again_when_a_dependant_needs_its_model(tmp_path):
    first, root = tmp_path / "first", tmp_path / "ledger"
    _finish_both(first, Ledger(root, first))
    # a new study folder: both restored, nothing runs
    new = tmp_path / "new"
    jobs = _jobs(new)
    plan = plan_study(jobs, jobs, new, Ledger(root, new, jobs))
    assert plan.restored == ["train", "explain"] and plan.run == []
    assert (new / "jobs" / "explain" / "eval.csv").read_bytes() == b"e"
    assert json.loads((new / "jobs" / "train" / RESTORED).read_text())["entry"] == Ledger(root, new).entry_id("train")
    # the same again keeps the restored copies
    assert plan_study(jobs, jobs, new, Ledger(root, new, jobs)).restored == ["train", "explain"]
    # explain must run again: the restored train has no model, so it runs first
    plan = plan_study(jobs, jobs, new, Ledger(root, new, jobs), rerun={"explain"})
    assert [j.name for j in plan.run] == ["train", "explain"]
    assert "needs its model (the ledger keeps no checkpoints)" in plan.reasons["train"]
    assert not (new / "jobs" / "train").exists()  # the restored copy is gone, not set aside: the ledger has it
    # only train asked for, and it runs again: explain's entry no longer matches it, so it is not restored
    other = tmp_path / "other"
    jobs = _jobs(other)
    plan = plan_study(jobs, jobs[:1], other, Ledger(root, other, jobs), rerun={"train"})
    assert [j.name for j in plan.run] == ["train"] and plan.restored == []
    assert plan.reasons["explain"].endswith("was made after another run of train")


def _train_in_ledger(tmp_path: Path) -> Path:
    """A ledger under ``tmp_path`` holding ``train`` alone (finished by hand in ``tmp_path/first``)."""
    first, root = tmp_path / "first", tmp_path / "ledger"
    jobs = _jobs(first)
    _finish_by_hand(first, jobs[0], {"train/runs/r1/model.pt": b"w", "train/runs/r1/test_predictions.csv": b"p"})
    Ledger(root, first).record(jobs[0])
    return root


def test_a_job_that_reads_only_kept_outputs_runs_on_restored_copies(tmp_path):
    """A merge of site studies reads their predictions, which the ledger keeps: they are restored, not rerun."""
    root = _train_in_ledger(tmp_path)
    new = tmp_path / "new"
    jobs = _jobs(new)
    jobs[1] = dataclasses.replace(jobs[1], reads_models=False)
    plan = plan_study(jobs, jobs, new, Ledger(root, new, jobs))
    assert plan.restored == ["train"] and [j.name for j in plan.run] == ["explain"]
    assert (new / "jobs" / "train" / "runs" / "r1" / "test_predictions.csv").read_bytes() == b"p"
    # and a part that runs again still takes the merge with it
    plan = plan_study(jobs, jobs, new, Ledger(root, new, jobs), rerun={"train"})
    assert [j.name for j in plan.run] == ["train", "explain"]


def test_a_report_restores_what_a_run_would_retrain_for_its_model(tmp_path):
    """With ``explain`` not in the ledger, a run retrains ``train`` for its model; a report (nothing may run)
    restores ``train`` instead, so its rows are in the report."""
    root = _train_in_ledger(tmp_path)
    new = tmp_path / "new"
    jobs = _jobs(new)
    running = plan_study(jobs, jobs, new, Ledger(root, new, jobs))
    assert [j.name for j in running.run] == ["train", "explain"] and running.restored == []
    report = tmp_path / "report"
    jobs = _jobs(report)
    plan = plan_study(jobs, [], report, Ledger(root, report, jobs))
    assert plan.restored == ["train"] and plan.run == []
    assert (report / "jobs" / "train" / "runs" / "r1" / "test_predictions.csv").read_bytes() == b"p"


def test_plan_adds_this_folders_finished_jobs_to_the_ledger_and_sets_aside_other_commands(tmp_path):
    out, root = tmp_path / "out", tmp_path / "ledger"
    jobs = _jobs(out)
    _finish_by_hand(out, jobs[0], {"train/runs/r1/model.pt": b"w", "train/runs/r1/test_predictions.csv": b"p"})
    _finish_by_hand(out, jobs[1], {"explain/eval.csv": b"e"})
    plan = plan_study(jobs, jobs, out, Ledger(root, out, jobs))
    assert plan.here == ["train", "explain"] and plan.recorded == ["train", "explain"] and plan.run == []
    assert Ledger(root, out).problems("explain") == []
    # today's explain command differs: this folder's run is set aside, not lost, and it runs again
    jobs = _jobs(out, EXPLAIN + "\n# changed\n")
    plan = plan_study(jobs, jobs, out, Ledger(root, out, jobs))
    assert [j.name for j in plan.run] == ["explain"] and plan.here == ["train"]
    assert plan.reasons["explain"] == "this folder's run was made by another command"
    assert len(list((out / "jobs").glob("explain.attempt-*/eval.csv"))) == 1


# ----- slow: jobs that run ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_damaged_entry_runs_again_and_is_kept_aside_once_the_new_one_is_written(tmp_path, monkeypatch, capsys):
    first, root = tmp_path / "first", tmp_path / "ledger"
    jobs = _jobs(first)
    ledger = Ledger(root, first, jobs)
    run_jobs(jobs, first, workers=1, progress=False, ledger=ledger)
    assert ledger.problems("train") == [] and ledger.problems("explain") == []
    assert not [p for p in root.rglob("*") if p.suffix in (".pt", ".db")]
    assert json.loads((root / "explain" / MANIFEST).read_text())["after"] == {"train": ledger.entry_id("train")}
    (root / "explain" / "jobs" / "explain" / "eval.csv").write_text("damaged")
    new = tmp_path / "new"
    jobs = _jobs(new)
    starts = _Starts(monkeypatch)
    ledger = Ledger(root, new, jobs)
    plan = plan_study(jobs, jobs, new, ledger)
    assert "refused: jobs/explain/eval.csv has 7 bytes" in plan.reasons["explain"]
    run_jobs(plan.run, new, workers=1, progress=False, ledger=ledger)
    # explain reads train's model: train ran again too, and both entries are new
    assert starts.names(jobs) == ["train", "explain"]
    assert ledger.problems("explain") == [] and ledger.state(jobs[1], {"train": ledger.entry_id("train")}).kind == (
        "usable"
    )
    stale = sorted(p.name.rsplit("-", 1)[0] for p in (root / STALE).iterdir())
    assert stale == ["explain", "train"]
    assert (root / STALE / next((root / STALE).glob("explain-*")).name / "jobs/explain/eval.csv").read_text() == (
        "damaged"
    )


QUICK = ["--profile", "quick", "--parts", "ga,saliency", "--only", "saliency-baseline", "--no-progress"]


@pytest.fixture(scope="module")
def ledger_study(tmp_path_factory):
    """The quick profile's seed-0 GA baseline and its saliency evaluation, run once into a temporary ledger."""
    base = tmp_path_factory.mktemp("ledger_study")
    out, root = base / "first", base / "ledger"
    # the bundle files the jobs read, copied as they run: a test edits the copy, never the repository's
    shutil.copytree(ROOT / "bundles", base / "repo" / "bundles", symlinks=True)
    assert main(["--out", str(out), "--ledger", str(root), *QUICK]) == 0
    return out, root


@pytest.mark.slow
def test_quick_jobs_enter_the_ledger_with_a_valid_manifest(ledger_study):
    out, root = ledger_study
    ledger = Ledger(root, out)
    assert ledger.names() == ["ga-baseline-s0", "saliency-baseline"]
    for name in ledger.names():
        assert ledger.problems(name) == []
        text = (root / name / MANIFEST).read_text()
        assert str(out) not in text and str(ROOT) not in text  # machine-independent
        manifest = json.loads(text)
        assert "{out}/jobs/" in " ".join(manifest["command"]) and manifest["command"][0] == "{python}"
        assert set(manifest["machine"]) == {"platform", "cpus", "python", "torch", "gpu"}
    ga = json.loads((root / "ga-baseline-s0" / MANIFEST).read_text())
    assert any(f.endswith("/test_predictions.csv") for f in ga["files"]) and any(
        f.endswith("/metrics.jsonl") for f in ga["files"]
    )
    assert any(f.endswith("model_best.pt") for f in ga["left_out"]["largest"])
    saliency = json.loads((root / "saliency-baseline" / MANIFEST).read_text())
    assert saliency["after"] == {"ga-baseline-s0": ledger.entry_id("ga-baseline-s0")}
    assert not [p for p in root.rglob("*") if p.suffix in (".pt", ".db")]


@pytest.mark.slow
def test_a_new_study_folder_is_restored_from_the_ledger_and_runs_nothing(ledger_study, tmp_path, monkeypatch):
    out, root = ledger_study
    new = tmp_path / "new"
    starts = _Starts(monkeypatch)
    assert main(["--out", str(new), "--ledger", str(root), *QUICK]) == 0
    assert starts.argvs == []
    for name in ("ga-baseline-s0", "saliency-baseline"):
        assert (new / "jobs" / name / "done.json").read_bytes() == (out / "jobs" / name / "done.json").read_bytes()
    # the report reads the restored files as it read the originals: every section is the same
    first, again = ((o / "RESULTS.md").read_text() for o in (out, new))
    assert again[again.index("\n## ") :] == first[first.index("\n## ") :]
    assert "**Accumulated:**" in again and "2 of them were restored from the ledger" in again
    assert "**Accumulated" not in first
    commit = json.loads((out / "jobs" / "ga-baseline-s0" / "done.json").read_text())["commit"][:12]
    assert f"*Rows from 1 job at commit {commit} (" in again


@pytest.mark.slow
def test_a_changed_command_reruns_exactly_that_job_and_keeps_the_old_entry_aside(
    ledger_study, tmp_path, monkeypatch, capsys
):
    first, original = ledger_study
    out, root = tmp_path / "out", tmp_path / "ledger"
    shutil.copytree(first, out)  # with the GA model, which the saliency job reads
    shutil.copytree(original, root)
    monkeypatch.setitem(PROFILES, "quick", dataclasses.replace(PROFILES["quick"], eval_ks="[10]"))
    starts = _Starts(monkeypatch)
    assert main(["--out", str(out), "--ledger", str(root), *QUICK]) == 0
    assert [a[a.index("--eval_ks") + 1] for a in starts.argvs] == ["[10]"] and len(starts.argvs) == 1
    printed = capsys.readouterr().out
    assert "saliency-baseline: this folder's run was made by another command" in printed
    stale = list((root / STALE).iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in stale] == ["saliency-baseline"]
    assert "[10,100]" in json.loads((stale[0] / MANIFEST).read_text())["command"]
    assert "[10]" in json.loads((root / "saliency-baseline" / MANIFEST).read_text())["command"]
    assert (root / "ga-baseline-s0").is_dir() and Ledger(root, out).entry_id("ga-baseline-s0") == Ledger(
        original, first
    ).entry_id("ga-baseline-s0")


@pytest.mark.slow
def test_a_quick_entry_is_restorable_until_a_copy_of_its_bundle_files_is_edited(ledger_study, tmp_path):
    first, original = ledger_study
    repo, root = tmp_path / "repo", tmp_path / "ledger"
    shutil.copytree(original.parent / "repo", repo, symlinks=True)  # the bundles as the fixture's jobs read them
    shutil.copytree(original, root)
    names = ("ga-baseline-s0", "saliency-baseline")

    def study(folder: str) -> tuple[list[Job], Ledger]:
        out = tmp_path / folder
        jobs = [j for j in build_jobs(out, PROFILES["quick"], ["ga", "saliency"], tracking_uri(out)) if j.name in names]
        return jobs, Ledger(root, out, jobs, repo=repo)

    jobs, ledger = study("same")
    unchanged = plan_study(jobs, jobs, tmp_path / "same", ledger)
    assert unchanged.restored == list(names) and unchanged.run == []
    manifest = json.loads((root / "saliency-baseline" / MANIFEST).read_text())
    assert "bundles/common/saliency.json" in manifest["bundles"]
    commit = manifest["commit"][:12]
    # the saliency runs' own config: only the evaluation's entry is stale, the GA model's still holds
    saliency = repo / "bundles" / "common" / "saliency.json"
    saliency.write_text(saliency.read_text() + "\n")
    jobs, ledger = study("saliency")
    ga_id = ledger.entry_id("ga-baseline-s0")
    assert ledger.state(jobs[0], {}).kind == "usable"
    state = ledger.state(jobs[1], {"ga-baseline-s0": ga_id})
    assert state.kind == "stale"
    assert state.reason.endswith(f"is stale: bundles/common/saliency.json changed since commit {commit}")
    # a PPI default of the GA bundle (read through the link bundles/ga_ppi.json): the model and its evaluation run
    train = repo / "bundles" / "ga_ppi" / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["ppi"]["warmup_epochs"] = 99
    train.write_text(json.dumps(config, indent=4))
    jobs, ledger = study("ga")
    plan = plan_study(jobs, jobs, tmp_path / "ga", ledger)
    assert [j.name for j in plan.run] == list(names) and plan.restored == []
    assert plan.reasons["ga-baseline-s0"].endswith(
        f"is stale: bundles/ga_ppi/configs/train.json changed since commit {commit}"
    )
    changed = "bundles/common/saliency.json, bundles/ga_ppi/configs/train.json changed"
    assert changed in plan.reasons["saliency-baseline"]


@pytest.mark.slow
def test_quick_profile_never_touches_the_repository_ledger(tmp_path, monkeypatch):
    def listing() -> list[str]:
        return sorted(str(p) for p in LEDGER.rglob("*")) if LEDGER.exists() else []

    before = listing()
    assert main(["--out", str(tmp_path), "--profile", "quick", "--parts", "cost", "--report-only"]) == 0
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path), "--profile", "quick", "--ledger", str(LEDGER), "--report-only"])
    assert err.value.code == 2
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--profile", "quick", "--rerun", "nothing-*"])
    assert listing() == before
    assert results_cli.LEDGER == LEDGER
