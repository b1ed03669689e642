"""Site-wise cross-validation of a MONAI bundle: train on each site, test on every site, DeLong-test PPI vs baseline.

For every training site X, method and seed, the bundle is trained in-process (``monai.bundle.ConfigWorkflow``)
with ``train_sites=[X]`` and ``val_sites=None``, so X's subjects are split (stratified, subject-level, by the
bundle's ``seed`` and ``val_fraction``) into a training part and a held-out part; every method of a seed sees
the same split. The best checkpoint (best validation AUC; ``--checkpoint final`` for the last epoch's) then
scores X's held-out part (the diagonal of the matrix) and every volume of every other site, with the
bundle's own ``preprocessing`` and ``network``. The tables are those of table 2.3 of the method's text (see
:mod:`pipelines.cv_tables`), with DeLong's paired test of each PPI method against the baseline in every cell
and on all off-diagonal cases pooled.

Methods: ``baseline`` (``ppi#enabled false``), ``ppi_<saliency>`` (e.g. ``ppi_wbp``, ``ppi_gradcam``),
``ppi_<saliency>_<mask>`` (e.g. ``ppi_wbp_box``), ``ppi_<saliency>_<guide>`` (e.g. ``ppi_wbp_partner``) and the
controls ``random_mask`` (PPI's interventions at random places) and ``random_erasing`` (augmentation only); the
names are those of :func:`ppi_med.methods.method_settings` (PPI names, controls and comparators).

MLflow: one parent run per invocation in ``--experiment``; each trained cell is the bundle's own run, made a
child of the parent through the ``mlflow.parentRunId`` tag, named ``cv-<method>-<site>-s<seed>-<key>``, with
``auc_<site>`` (best checkpoint) and ``auc_final_<site>`` logged into it for every test site.

Resuming: a cell is keyed by a hash of the bundle file, the datalist, the bundle overrides, the method, the
site and the seed; its checkpoints, predictions and record live in ``OUT/cells/<key>/attempt-<n>/``. A
cell whose record, checkpoints and predictions exist and whose MLflow run is FINISHED in the current
tracking store is reused, not retrained; a failed or unfinished attempt is kept and a new attempt made
beside it. An earlier report in OUT is moved to ``OUT/history/<time>/``, never deleted.

Output in OUT: ``summary.md``, ``summary.json``, ``cells.csv``, ``predictions.csv``, the matrices as CSV and
JSON (``auc_<method>``, ``pvalue_<method>_vs_baseline``, ...), ``pooled_offdiag.csv``, and the figures
``heatmap_auc_<method>.png``, ``heatmap_pvalue.png``, ``roc_<method>.png``.

CLI::

    python -m pipelines.site_cv --config_file bundles/ga_ppi.json --methods baseline,ppi_wbp \\
        --max_epochs 3 --synthetic#subjects_per_site 20

Any ``--<id> <value>`` that is not an option of this command is passed to the bundle as an override (the
value is read as JSON or a Python literal when it parses as one, e.g. ``false``, ``[4,32,48]``, otherwise
kept as a string), as ``python -m monai.bundle run`` does.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ppi_med.data import load_datalist
from ppi_med.robust import SELECTIONS, check_selection
from ppi_med.tracking import TrackingServerError, check_tracking_uri, ensure_experiment, git_commit, metric_key

from .cv_cells import (
    CELL_FORMAT,
    Cell,
    CellRunner,
    SiteCVError,
    StudySettings,
    cell_key,
    check_bundle,
    method_overrides,
    sha256_file,
)
from .cv_tables import SiteCVTables, site_cv_tables

__all__ = [
    "CELL_FORMAT",
    "RESERVED_OVERRIDES",
    "SiteCVConfig",
    "SiteCVError",
    "SiteCVResult",
    "build_parser",
    "cell_key",
    "main",
    "method_overrides",
    "one_class_sites",
    "parse_overrides",
    "run_site_cv",
    "run_site_cv_shard",
]

# bundle ids that the pipeline sets per cell; the user sets them through the command's own options
RESERVED_OVERRIDES = {
    "train_sites": "--sites",
    "val_sites": "(always null: the training site is split by subject)",
    "seed": "--first-seed / --seeds",
    "test_fraction": "--test-fraction",
    "selection": "--selection",
    "oracle_sites": "--oracle-sites",
    "run_name": "(set per cell)",
    "run_tags": "(set per cell)",
    "runs_dir": "--out",
    "output_dir": "--out",
    "ckpt_dir": "--out",
    "experiment_name": "--experiment",
    "tracking_uri": "--tracking-uri",
}
_REPORT_MARKER = "summary.json"
_REPO = Path(__file__).resolve().parents[1]


@dataclass
class SiteCVConfig:
    """What one invocation runs.

    Attributes:
        config_file: the bundle config (e.g. ``bundles/ga_ppi.json``).
        meta_file: the bundle's metadata (``metadata.json`` beside the config when ``None``).
        sites: training and test sites (every site of the datalist when ``None``).
        train_sites: the sites trained on, the rows of the matrices (every one of ``sites`` when ``None``);
            e.g. only the confounded site, scored on all the others.
        methods: names of :func:`pipelines.cv_cells.method_overrides`: ``baseline``, ``ppi_<saliency>[_<mask>]...``,
            the controls, the comparators ``groupdro``, ``jtt``, ``dfr`` and ``<PPI name>+dfr``.
        selection: how each cell chooses its checkpoint (the bundle's ``selection``): ``train`` (validation
            AUC on the training site's validation part), ``worst_site`` (the worst (site, label) group's accuracy
            there) or ``oracle`` (validation AUC on half of ``oracle_sites``' subjects, which are then not scored).
        oracle_sites: the sites ``oracle`` validates on (e.g. the site generated with the cue reversed).
        seeds: number of seeds.
        first_seed: the first seed (the bundle's ``seed`` when ``None``); seeds are consecutive.
        out_dir: output folder (``runs/site_cv/<time>`` when ``None``).
        tracking_uri: MLflow store (``MLFLOW_TRACKING_URI`` or the bundle's ``tracking_uri`` when ``None``).
        experiment: MLflow experiment of the parent and child runs.
        overrides: bundle overrides (``id#path -> value``) applied to every cell.
        checkpoint: ``best`` (best validation AUC) or ``final`` checkpoint for the tables.
        test_fraction: share of the training site's subjects kept as its test part (the diagonal): they
            neither train nor choose the checkpoint, which the validation part (``val_fraction``) does.
            0 scores the validation part on the diagonal, as before.
        min_steps: optimiser steps every cell gets at least: a cell whose ``max_epochs`` of its training site
            would take fewer trains for ``ceil(min_steps / steps_per_epoch)`` epochs instead (the bundle's
            one-cycle schedule and PPI warm-up scale with the epochs). 0 keeps the bundle's epochs. The default,
            360, is what the pooled GA default takes (120 training eyes in batches of 8, 24 epochs); one site's
            20 training eyes at the bundle's 24 epochs would get 72.
        shard: ``(i, n)``: run only the cells ``i, i + n, i + 2n ...`` (0-based, in the study's fixed cell
            order) and write no report; ``n`` workers with ``i = 0 .. n-1`` share the study over machines or
            GPUs against one output folder and one MLflow store, and a final run without ``shard`` reuses
            every finished cell and writes the report (it names any cell still missing, and trains it).
        bundle_logging: apply the bundle's ``logging.conf`` (the engines' INFO logs) instead of staying quiet.
        progress: show the tqdm bar.
        num_threads: CPU threads for torch during the invocation (torch's default when ``None``); on a shared
            machine with busy cores, 1 can be many times faster for small networks.
    """

    config_file: str | Path
    meta_file: str | Path | None = None
    sites: Sequence[str] | None = None
    train_sites: Sequence[str] | None = None
    methods: Sequence[str] = ("baseline", "ppi_wbp")
    selection: str = "train"
    oracle_sites: Sequence[str] | None = None
    seeds: int = 1
    first_seed: int | None = None
    out_dir: str | Path | None = None
    tracking_uri: str | None = None
    experiment: str = "ga_site_cv"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = "best"
    test_fraction: float = 0.25
    min_steps: int = 360
    shard: tuple[int, int] | None = None
    bundle_logging: bool = False
    progress: bool = True
    num_threads: int | None = None


@dataclass
class SiteCVResult:
    """What an invocation produced.

    Attributes:
        out_dir: the output folder.
        tables: the matrices (:class:`pipelines.cv_tables.SiteCVTables`).
        predictions: every case's score (the columns of :data:`pipelines.cv_tables.PREDICTION_COLUMNS`).
        cells: one row per (method, site, seed) cell: key, status (trained/reused), MLflow run, seconds.
        parent_run_id: the MLflow parent run.
        tracking_uri: the MLflow store.
        files: report files written in ``out_dir``.
        seconds: wall time of the invocation.
    """

    out_dir: Path
    tables: SiteCVTables
    predictions: pd.DataFrame
    cells: pd.DataFrame
    parent_run_id: str
    tracking_uri: str
    files: list[Path]
    seconds: float


def _parse_value(text: str) -> Any:
    """A command-line value as JSON, else a Python literal, else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Bundle overrides from ``--id#path value`` or ``--id#path=value`` tokens.

    Args:
        tokens: the command-line words this command did not recognise (a lone ``--`` is ignored).

    Returns:
        ``{"id#path": value}``, values parsed by JSON or as Python literals where they parse.

    Raises:
        SiteCVError: a word that is not an option, an option without a value, or a reserved id.
    """
    out: dict[str, Any] = {}
    words = [t for t in tokens if t != "--"]
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--") or len(word) <= 2:
            raise SiteCVError(f"unexpected argument '{word}': bundle overrides are written --<id> <value>")
        if "=" in word:
            key, value = word[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words):
                raise SiteCVError(f"bundle override '{word}' has no value")
            key, value = word[2:], words[i + 1]
            i += 2
        if key in RESERVED_OVERRIDES:
            raise SiteCVError(f"'--{key}' is set by the site CV for every cell; use {RESERVED_OVERRIDES[key]}")
        out[key] = _parse_value(value)
    return out


def one_class_sites(items: Sequence[Mapping[str, Any]], sites: Sequence[str]) -> dict[str, str]:
    """The sites whose records all carry one label, each with a description (``only label 0 (12 cases)``).

    Args:
        items: datalist records with ``site`` and ``label``.
        sites: the sites to look at.
    """
    out = {}
    for site in sites:
        labels = [int(it["label"]) for it in items if str(it.get("site")) == site]
        if labels and len(set(labels)) == 1:
            out[site] = f"only label {labels[0]} ({len(labels)} cases)"
    return out


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<folder>/mlruns``), as MONAI's MLflow handler puts them."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None


def _bundle_files(cfg: SiteCVConfig) -> tuple[Path, Path | None]:
    """The bundle config and its metadata file (``None`` when there is none beside it and none was given)."""
    config_file = Path(cfg.config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"bundle config file not found: {config_file}")
    meta = Path(cfg.meta_file) if cfg.meta_file else config_file.parent / "metadata.json"
    if cfg.meta_file and not meta.is_file():
        raise FileNotFoundError(f"bundle metadata file not found: {meta}")
    return config_file, (meta if meta.is_file() else None)


def _check_options(cfg: SiteCVConfig) -> None:
    """The study's own options, checked before the bundle is read."""
    if cfg.checkpoint not in ("best", "final"):
        raise SiteCVError(f"checkpoint must be 'best' or 'final', got '{cfg.checkpoint}'")
    if cfg.num_threads is not None and int(cfg.num_threads) < 1:
        raise SiteCVError(f"--num-threads must be at least 1, got {cfg.num_threads}")
    if int(cfg.seeds) < 1:
        raise SiteCVError(f"--seeds must be at least 1, got {cfg.seeds}")
    if not cfg.methods:
        raise SiteCVError("no method given")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise SiteCVError(f"a method is listed twice in {list(cfg.methods)}")
    if not 0.0 <= cfg.test_fraction < 1.0:
        raise SiteCVError(f"--test-fraction must lie in [0, 1), got {cfg.test_fraction}")
    if int(cfg.min_steps) < 0:
        raise SiteCVError(f"--min-steps must be >= 0, got {cfg.min_steps}")


def _overrides(cfg: SiteCVConfig, config_file: Path, methods: Sequence[str]) -> tuple[dict, dict]:
    """The bundle overrides of every cell, and those that enter the cell key.

    Raises:
        SiteCVError: an override site CV sets itself, or one that clashes with a method's own.
    """
    overrides = dict(cfg.overrides)
    for key in overrides:
        if key in RESERVED_OVERRIDES:
            raise SiteCVError(f"'{key}' is set by the site CV for every cell; use {RESERVED_OVERRIDES[key]}")
    for m in methods:
        mov = method_overrides(m)
        clash = sorted(set(mov) & set(overrides))
        if clash:
            raise SiteCVError(f"override(s) {clash} conflict with method '{m}', which sets {mov}")
    overrides.setdefault("bundle_root", str(config_file.parent.resolve()))
    # part of every cell's bundle overrides (and of its key when set, so cells of the two-way protocol,
    # whose diagonal was also the selection set, are never reused for the three-way one)
    key_overrides = dict(cfg.overrides)
    if cfg.test_fraction > 0:
        overrides["test_fraction"] = key_overrides["test_fraction"] = float(cfg.test_fraction)
    if cfg.selection != "train" or cfg.oracle_sites:  # in the key when set: cells chosen otherwise differ
        try:
            check_selection(cfg.selection, cfg.oracle_sites)
        except ValueError as err:
            raise SiteCVError(str(err)) from err
        overrides["selection"] = key_overrides["selection"] = cfg.selection
        if cfg.oracle_sites:
            overrides["oracle_sites"] = key_overrides["oracle_sites"] = list(cfg.oracle_sites)
    if cfg.min_steps:  # in the key only: the bundle knows no such id
        key_overrides["min_steps (site_cv)"] = int(cfg.min_steps)
    return overrides, key_overrides


def _tracking_uri(cfg: SiteCVConfig, parser: Any) -> str:
    """The MLflow store of the study, checked to answer before any cell trains."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking_uri and env_uri and cfg.tracking_uri != env_uri:
        raise SiteCVError(
            f"--tracking-uri {cfg.tracking_uri} differs from MLFLOW_TRACKING_URI={env_uri}, which MONAI's "
            "MLflow handler would use for the cells' runs; unset one of them"
        )
    uri = cfg.tracking_uri or env_uri or str(parser.get_parsed_content("tracking_uri"))
    check_tracking_uri(uri)  # a server that does not answer stops the study before any cell
    return uri


class _Study:
    """One invocation: resolved settings, the MLflow parent run, and the cells."""

    def __init__(self, cfg: SiteCVConfig) -> None:
        from monai.bundle import ConfigParser

        self.cfg = cfg
        self.config_file, self.meta_file = _bundle_files(cfg)
        _check_options(cfg)
        self.methods = list(cfg.methods)
        self.overrides, self.key_overrides = _overrides(cfg, self.config_file, self.methods)

        # resolve the datalist once (it may generate the synthetic default) to know the sites and hash it
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update(pairs=dict(self.overrides))
        check_bundle(parser, self.config_file)
        self.datalist = Path(parser.get_parsed_content("datalist"))
        self.items = load_datalist(self.datalist)
        self._resolve_sites(cfg)
        self.val_fraction = parser.get_parsed_content("val_fraction")
        first = int(parser.get_parsed_content("seed")) if cfg.first_seed is None else int(cfg.first_seed)
        self.seeds = [first + i for i in range(int(cfg.seeds))]
        self.tracking_uri = _tracking_uri(cfg, parser)
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "site_cv" / self.stamp
        self.bundle_sha = sha256_file(self.config_file)
        self.datalist_sha = sha256_file(self.datalist)
        self.cells = [
            Cell(m, site, seed, *cell_key(self.bundle_sha, self.datalist_sha, self.key_overrides, m, site, seed))
            for seed in self.seeds
            for site in self.train_sites
            for m in self.methods
        ]

    def _resolve_sites(self, cfg: SiteCVConfig) -> None:
        """The sites to score and to train on, from the datalist; one-class sites noted and not trained on."""
        items = self.items
        known = sorted({str(it.get("site")) for it in items if it.get("site") is not None})
        if not known:
            raise SiteCVError(f"{self.datalist}: no record has a 'site'; site-wise CV needs one per record")
        if cfg.sites:
            sites = [str(s) for s in cfg.sites]
            unknown = [s for s in sites if s not in known]
            if unknown:
                raise SiteCVError(f"unknown site(s) {unknown}: {self.datalist} has sites {known}")
            if len(set(sites)) != len(sites):
                raise SiteCVError(f"a site is listed twice in {sites}")
            self.sites = sites
        else:
            self.sites = known
        self.all_sites = known
        self.train_sites = [str(s) for s in cfg.train_sites] if cfg.train_sites else list(self.sites)
        outside = [s for s in self.train_sites if s not in self.sites]
        if outside:
            raise SiteCVError(f"training site(s) {outside} are not among the sites {self.sites}")
        # a site with one class: AUC is undefined on it, and a model trained on it learns nothing to rank with
        # (nor can its validation AUC choose a checkpoint); its cases still count in the pooled comparison
        self.one_class = one_class_sites(items, self.sites)
        untrainable = [s for s in self.train_sites if s in self.one_class]
        if untrainable and len(untrainable) == len(self.train_sites):
            raise SiteCVError(
                f"training site(s) {', '.join(f'{s} ({self.one_class[s]})' for s in untrainable)} of {self.datalist} "
                "have one class only; a classifier needs both labels to learn and to choose its checkpoint"
            )
        self.notes = [
            f"Site {s} has {self.one_class[s]}: "
            + ("not trained on (a classifier needs both labels); " if s in untrainable else "")
            + "AUC is undefined on it (n/a, DeLong skipped); its cases still enter the pooled off-diagonal test."
            for s in self.sites
            if s in self.one_class
        ]
        self.train_sites = [s for s in self.train_sites if s not in untrainable]

    # ----- MLflow -----------------------------------------------------------------------------------------

    def open_parent(self) -> None:
        """Create (or find) the experiment, start the parent run, and set up the cell runner."""
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        try:
            exp_id = ensure_experiment(
                self.client, self.cfg.experiment, artifact_location=_artifact_location(self.tracking_uri)
            )
        except ValueError as err:  # a deleted experiment
            raise SiteCVError(str(err)) from err
        self.experiment_id = exp_id
        tags = {
            "git_commit": git_commit(_REPO),
            "cv_kind": "site_cv_parent",
            "cv_out_dir": str(self.out_dir.resolve()),
            "bundle": self.config_file.name,
        }
        name = f"site-cv-{self.stamp}"
        if self.cfg.shard is not None:
            tags["cv_shard"] = "{}/{}".format(*self.cfg.shard)
            name += "-shard{}of{}".format(*self.cfg.shard)
        run = self.client.create_run(exp_id, run_name=name, tags=tags)
        self.parent_id = run.info.run_id
        params = {
            "config_file": str(self.config_file),
            "sites": ",".join(self.sites),
            "train_sites": ",".join(self.train_sites),
            "methods": ",".join(self.methods),
            "seeds": ",".join(map(str, self.seeds)),
            "checkpoint": self.cfg.checkpoint,
            "selection": self.cfg.selection,
            "oracle_sites": ",".join(self.cfg.oracle_sites or []),
            "datalist": str(self.datalist),
            "overrides": json.dumps(dict(self.cfg.overrides), sort_keys=True, default=str)[:500],
        }
        for k, v in params.items():
            self.client.log_param(self.parent_id, k, v)

        self.runner = CellRunner(
            StudySettings(
                config_file=self.config_file,
                meta_file=self.meta_file,
                overrides=self.overrides,
                out_dir=self.out_dir,
                datalist=self.datalist,
                items=self.items,
                tracking_uri=self.tracking_uri,
                experiment=self.cfg.experiment,
                experiment_id=self.experiment_id,
                parent_run_id=self.parent_id,
                bundle_logging=self.cfg.bundle_logging,
                min_steps=int(self.cfg.min_steps),
            ),
            self.client,
        )

    def close_parent(self, status: str) -> None:
        """End the parent run with ``status`` (FINISHED or FAILED)."""
        self.client.set_terminated(self.parent_id, status)


def _archive_previous_report(out_dir: Path) -> Path | None:
    """Move an earlier invocation's report files to ``history/<its time>/`` so nothing is overwritten."""
    marker = out_dir / _REPORT_MARKER
    if not marker.is_file():
        return None
    try:
        old = json.loads(marker.read_text())
    except ValueError:
        old = {}
    base = out_dir / "history" / str(old.get("stamp", time.strftime("%Y%m%d-%H%M%S")))
    dest, k = base, 1
    while dest.exists():  # two invocations in the same second
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    dest.mkdir(parents=True)
    names = set(old.get("files", [])) | {_REPORT_MARKER}
    for name in sorted(names):
        src = out_dir / name
        if src.is_file() and src.parent == out_dir:
            shutil.move(str(src), dest / name)
    return dest


def _collect_predictions(records: list[dict[str, Any]], out_dir: Path, checkpoint: str) -> pd.DataFrame:
    frames = []
    for rec in records:
        path = out_dir / "cells" / rec["key"] / f"attempt-{rec['attempt']}" / rec["predictions"]
        df = pd.read_csv(path, dtype={"test_site": str, "case": str, "subject": str})
        frames.append(
            pd.DataFrame(
                {
                    "method": rec["method"],
                    "train_site": rec["train_site"],
                    "seed": int(rec["seed"]),
                    "test_site": df["test_site"],
                    "case": df["case"],
                    "subject": df["subject"],
                    "label": df["label"].astype(int),
                    "score": df[f"score_{checkpoint}"].astype(float),
                    "role": df["role"],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def run_site_cv(cfg: SiteCVConfig) -> SiteCVResult:
    """Run (or resume) a site-wise cross-validation and write its report.

    Args:
        cfg: what to run.

    Returns:
        The tables, predictions, cells, MLflow parent run and report files.

    Raises:
        FileNotFoundError: the bundle config, metadata or datalist is missing.
        SiteCVError: an unknown site or method, a reserved or conflicting override.
        TrackingServerError: the MLflow tracking server does not answer (checked before any training).
        RuntimeError: a cell's training left no MLflow run.
    """
    t_start = time.perf_counter()
    study = _Study(cfg)
    with _torch_threads(cfg.num_threads):
        return _run(study, cfg, t_start)


def run_site_cv_shard(cfg: SiteCVConfig) -> pd.DataFrame:
    """Run (or reuse) only the cells of ``cfg.shard``; no report. See :class:`SiteCVConfig` ``shard``.

    Returns:
        The shard's cell table (method, site, seed, status, key, MLflow run ...).

    Raises:
        SiteCVError: a bad shard, plus everything :func:`run_site_cv` raises.
    """
    if cfg.shard is None:
        raise SiteCVError("run_site_cv_shard needs a shard (i, n)")
    index, count = cfg.shard
    if not (count >= 1 and 0 <= index < count):
        raise SiteCVError(f"--shard must be i/n with 0 <= i < n, got {index}/{count}")
    study = _Study(cfg)
    study.cells = study.cells[index::count]
    study.out_dir.mkdir(parents=True, exist_ok=True)
    with _torch_threads(cfg.num_threads):
        study.open_parent()
        status = "FAILED"
        try:
            _, cells = _run_cells(study, cfg)
            status = "FINISHED"
        finally:
            study.close_parent(status)
    return cells


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Set torch's intra-op thread count for the block, then restore it."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run(study: _Study, cfg: SiteCVConfig, t_start: float) -> SiteCVResult:
    """Open the parent run, run or reuse every cell, write the report; the parent ends FINISHED or FAILED."""
    study.out_dir.mkdir(parents=True, exist_ok=True)
    for note in study.notes:
        print(f"site CV: {note}", file=sys.stderr)
    study.open_parent()
    status = "FAILED"
    try:
        records, cells = _run_cells(study, cfg)
        preds = _collect_predictions(records, study.out_dir, cfg.checkpoint)
        preds = preds[preds["test_site"].isin(study.sites)].reset_index(drop=True)
        tables = site_cv_tables(preds, study.methods, study.train_sites, study.sites)
        files = _write_report(study, cfg, tables, preds, cells, t_start)
        status = "FINISHED"
        return SiteCVResult(
            out_dir=study.out_dir,
            tables=tables,
            predictions=preds,
            cells=cells,
            parent_run_id=study.parent_id,
            tracking_uri=study.tracking_uri,
            files=files,
            seconds=time.perf_counter() - t_start,
        )
    finally:
        study.close_parent(status)


def _run_cells(study: _Study, cfg: SiteCVConfig) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Reuse or train every cell, with a progress bar and one line per cell; their records and a cell table."""
    records, rows = [], []
    n = len(study.cells)
    with tqdm(total=n, desc="site CV", unit="cell", disable=not cfg.progress) as bar:
        for i, cell in enumerate(study.cells, 1):
            t0 = time.perf_counter()
            rec = study.runner.reusable(cell)
            state = "reused" if rec is not None else "trained"
            if rec is None:
                tqdm.write(f"[{i}/{n}] training {cell.label} (cell {cell.key}) ...")
                rec = study.runner.train(cell)
            aucs = rec[f"auc_{cfg.checkpoint}"]
            shown = " ".join(f"{s}={aucs[s]:.3f}" if aucs.get(s) is not None else f"{s}=n/a" for s in study.sites)
            undefined = [s for s in study.sites if aucs.get(s) is None]
            note = "; ".join(
                f"AUC on {s} undefined: {study.one_class.get(s, 'one class in its test cases')}" for s in undefined
            )
            shown += f" ({note})" if note else ""
            tqdm.write(
                f"[{i}/{n}] {cell.label}: {state} in {time.perf_counter() - t0:.1f} s; AUC {shown} "
                f"(run {rec['run_id']})"
            )
            records.append(rec)
            rows.append(
                {
                    "method": cell.method,
                    "train_site": cell.site,
                    "seed": cell.seed,
                    "status": state,
                    "key": cell.key,
                    "attempt": rec["attempt"],
                    "run_id": rec["run_id"],
                    "run_name": rec["run_name"],
                    "n_train": rec["n_train"],
                    "n_heldout": rec["n_heldout"],
                    "train_seconds": rec["seconds"],
                    "note": note,
                }
            )
            bar.update()
    return records, pd.DataFrame(rows)


def _notes(study: _Study, cfg: SiteCVConfig, tables: SiteCVTables) -> list[str]:
    """Caveats for the summary: what the diagonal means, missing tests, undefined cells."""
    where = f"Diagonal cells use the training site's held-out subjects (val_fraction {study.val_fraction}); "
    if cfg.checkpoint == "best":
        notes = [
            where + "they also chose the best checkpoint (best validation AUC), so the diagonal is optimistic; "
            "--checkpoint final scores the last epoch's weights instead."
        ]
    else:
        notes = [where + "the final checkpoint is scored, so they did not select the model."]
    if tables.reference is None:
        notes.append("No 'baseline' among the methods: no DeLong tests.")
    notes += study.notes
    undefined: dict[str, list[str]] = {}
    for m, df in tables.auc.items():
        for r in df.index:
            for c in study.sites:
                if not math.isfinite(float(df.loc[r, c])):
                    why = f"site {c} has {study.one_class[c]}" if c in study.one_class else "a class missing"
                    undefined.setdefault(why, []).append(f"{m} {r}->{c}")
    for why, cells in undefined.items():
        notes.append(f"AUC undefined ({why}; no DeLong test there) in: {', '.join(cells)}")
    return notes


def _write_report(
    study: _Study,
    cfg: SiteCVConfig,
    tables: SiteCVTables,
    preds: pd.DataFrame,
    cells: pd.DataFrame,
    t_start: float,
) -> list[Path]:
    """Files, figures and summary in the output folder, the same in the parent run, the tables on the console."""
    from . import report

    out_dir = study.out_dir
    archived = _archive_previous_report(out_dir)
    files = report.write_tables(tables, out_dir)
    preds.to_csv(out_dir / "predictions.csv", index=False)
    cells.to_csv(out_dir / "cells.csv", index=False)
    files += [out_dir / "predictions.csv", out_dir / "cells.csv"]
    figures = report.plot_auc_heatmaps(tables, out_dir)
    pfig = report.plot_pvalue_heatmap(tables, out_dir)
    figures += [pfig] if pfig is not None else []
    figures += report.plot_roc_grids(preds, tables, out_dir)
    files += figures

    seconds = time.perf_counter() - t_start
    n_trained = int((cells["status"] == "trained").sum())
    header = [
        f"- bundle: `{study.config_file}`; datalist: `{study.datalist}`",
        f"- sites: {', '.join(study.sites)} (trained on {', '.join(study.train_sites)}); "
        f"methods: {', '.join(study.methods)}; "
        f"seeds: {', '.join(map(str, study.seeds))}; checkpoint: {cfg.checkpoint}",
        f"- checkpoint selection: **{cfg.selection}**"
        + (
            f" (an oracle: chosen on half of {', '.join(cfg.oracle_sites or [])}'s subjects, which are not scored)"
            if cfg.selection == "oracle"
            else ""
        ),  # fmt: skip
        f"- bundle overrides: `{json.dumps(dict(cfg.overrides), default=str)}`",
        f"- MLflow: experiment `{cfg.experiment}`, parent run `{study.parent_id}`, store `{study.tracking_uri}`",
        f"- cells: {len(cells)} ({n_trained} trained, {len(cells) - n_trained} reused); "
        f"wall time {seconds:.1f} s; git {git_commit(_REPO)[:12]}",
    ]
    md = report.markdown_report(
        tables, header, figures, cells.drop(columns=["key"]), _notes(study, cfg, tables), base=out_dir
    )
    (out_dir / "summary.md").write_text(md)
    files.append(out_dir / "summary.md")
    summary = {
        "stamp": study.stamp,
        "command": sys.argv,
        "config_file": str(study.config_file),
        "datalist": str(study.datalist),
        "sites": study.sites,
        "methods": study.methods,
        "seeds": study.seeds,
        "checkpoint": cfg.checkpoint,
        "overrides": dict(cfg.overrides),
        "tracking_uri": study.tracking_uri,
        "experiment": cfg.experiment,
        "parent_run_id": study.parent_id,
        "n_trained": n_trained,
        "n_reused": len(cells) - n_trained,
        "wall_seconds": round(seconds, 2),
        "previous_report": str(archived) if archived else None,
        "summary_metrics": tables.to_dict()["summary_metrics"],
        "cells": cells.to_dict(orient="records"),
        "files": [f.name for f in files] + [_REPORT_MARKER],
    }
    (out_dir / _REPORT_MARKER).write_text(json.dumps(summary, indent=2, default=str))
    files.append(out_dir / _REPORT_MARKER)

    client, run_id = study.client, study.parent_id
    for name, value in tables.summary_metrics().items():
        if math.isfinite(value):
            client.log_metric(run_id, metric_key(name), value)
    client.log_metric(run_id, "n_trained_cells", n_trained)
    client.log_metric(run_id, "wall_seconds", seconds)
    for f in files:
        top = f.name in ("summary.md", _REPORT_MARKER)
        client.log_artifact(
            run_id, str(f), artifact_path="figures" if f.suffix == ".png" else None if top else "tables"
        )
    print("\n" + report.console_report(tables))
    print(f"\nreport: {out_dir / 'summary.md'}")
    if cfg.out_dir is None:
        print(f"  to resume or extend this study (more seeds, methods), run again with --out {out_dir}")
    print(f"MLflow parent run {run_id} in experiment '{cfg.experiment}' ({study.tracking_uri})")
    if study.tracking_uri.startswith("sqlite:///"):
        print(f"  open it with: mlflow ui --backend-store-uri {study.tracking_uri}")
    return files


def _comma_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got '{text}'")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (unknown ``--id value`` pairs are bundle overrides, see :func:`parse_overrides`)."""
    p = argparse.ArgumentParser(
        prog="python -m pipelines.site_cv",
        description=(
            "Site-wise cross-validation of a MONAI bundle (table 2.3): train on each site, test on the "
            "held-out subjects of that site and on every other site, for the baseline and PPI methods, with "
            "DeLong tests of every PPI-vs-baseline cell; logged to MLflow (a parent run, one child per cell). "
            "Any other --<id> <value> is passed to the bundle as an override, e.g. --max_epochs 3 "
            "--synthetic#subjects_per_site 20 --network_def#width 8."
        ),
        allow_abbrev=False,
    )
    p.add_argument(
        "--config_file", "--config-file", default="bundles/ga_ppi.json", help="bundle config (default: %(default)s)"
    )
    p.add_argument(
        "--meta_file", "--meta-file", default=None, help="bundle metadata (default: metadata.json beside the config)"
    )
    p.add_argument(
        "--sites", type=_comma_list, default=None, help="comma-separated sites (default: all sites of the datalist)"
    )
    p.add_argument(
        "--train-sites",
        type=_comma_list,
        default=None,
        help="comma-separated sites to train on, each scored on every site (default: all of --sites)",
    )
    p.add_argument(
        "--methods",
        type=_comma_list,
        default=["baseline", "ppi_wbp"],
        help="comma-separated methods: baseline, ppi_<saliency> (wbp, gradient, input_x_gradient, gradcam, lrp), "
        "ppi_<saliency>_<mask> (e.g. ppi_wbp_box), ppi_<saliency>_<guide> (e.g. ppi_wbp_partner, the pairing of "
        "the earlier default), the controls random_mask and random_erasing, the comparators groupdro, jtt and dfr, "
        "and <PPI method>+dfr (DFR on the PPI model) (default: baseline,ppi_wbp)",
    )
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="train",
        help="checkpoint selection of every cell: train (validation AUC on the training site's validation part), "
        "worst_site (accuracy of its worst site x label group; no cue labels needed) or oracle (validation AUC on "
        "half of --oracle-sites' subjects, not scored then; an oracle, labelled so in the tables) (default: train)",
    )
    p.add_argument(
        "--oracle-sites", type=_comma_list, default=None, help="comma-separated sites --selection oracle validates on"
    )
    p.add_argument(
        "--seeds", type=int, default=1, help="number of seeds; each seed also draws its own split (default: 1)"
    )
    p.add_argument("--first-seed", type=int, default=None, help="first seed (default: the bundle's seed)")
    p.add_argument(
        "--checkpoint",
        choices=("best", "final"),
        default="best",
        help="checkpoint scored: best validation AUC (chosen on the diagonal's subjects) or final (default: best)",
    )
    p.add_argument(
        "--test-fraction",
        type=float,
        default=0.25,
        help="share of the training site's subjects kept for the diagonal, apart from the checkpoint-selection "
        "part (default: %(default)s; 0: the diagonal is the selection part)",
    )
    p.add_argument(
        "--min-steps",
        type=int,
        default=360,
        help="optimiser steps every cell gets at least; a small site trains for more epochs (default: %(default)s, "
        "what the pooled GA default takes; 0: the bundle's max_epochs)",
    )
    p.add_argument(
        "--shard",
        default=None,
        help="i/n: run only every n-th cell from the i-th (0-based) and no report, so n workers (machines, GPUs, "
        "a SLURM array) share one study in one --out; then run once without --shard to gather the report",
    )
    p.add_argument("--out", default=None, help="output folder; rerun into it to resume (default: runs/site_cv/<time>)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the bundle's)"
    )
    p.add_argument("--experiment", default="ga_site_cv", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--bundle-logging", action="store_true", help="apply the bundle's logging.conf (engine INFO logs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own); 1 is often much faster on a busy shared CPU",
    )
    return p


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise SiteCVError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if not (count >= 1 and 0 <= index < count):
        raise SiteCVError(f"--shard must be i/n with 0 <= i < n, got '{text}'")
    return index, count


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``ppi-med-site-cv``).

    Args:
        argv: arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        0 on success, 2 on a bad request (message on stderr).
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(extra)
        cfg = SiteCVConfig(
            config_file=args.config_file,
            meta_file=args.meta_file,
            sites=args.sites,
            train_sites=args.train_sites,
            methods=args.methods,
            selection=args.selection,
            oracle_sites=args.oracle_sites,
            seeds=args.seeds,
            first_seed=args.first_seed,
            out_dir=args.out,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            overrides=overrides,
            checkpoint=args.checkpoint,
            test_fraction=args.test_fraction,
            min_steps=args.min_steps,
            shard=_parse_shard(args.shard),
            bundle_logging=args.bundle_logging,
            num_threads=args.num_threads,
            progress=not args.no_progress,
        )
        if cfg.shard is None:
            run_site_cv(cfg)
        else:
            cells = run_site_cv_shard(cfg)
            trained = int((cells["status"] == "trained").sum()) if len(cells) else 0
            print(
                f"shard {args.shard}: {len(cells)} cells ({trained} trained, {len(cells) - trained} reused) in "
                f"{cfg.out_dir}; when every shard is done, run the same command without --shard for the report"
            )
    except (SiteCVError, FileNotFoundError, TrackingServerError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
