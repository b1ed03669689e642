"""A site-CV study: its resolved settings and MLflow parent run, and the loop that trains or reuses its cells.

:func:`run_site_cv` runs (or resumes) a whole study and writes its report (:mod:`pipelines.site_cv.report`);
:func:`run_site_cv_shard` runs every n-th cell only, for workers that share one study.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from ppi_med.data import load_datalist
from ppi_med.robust import check_selection
from ppi_med.tracking import check_tracking_uri, datalist_inputs, ensure_experiment, git_commit

from ..bundle_config import open_config
from .cells import Cell, CellRunner, StudySettings, cell_key, check_bundle, sha256_file
from .config import RESERVED_OVERRIDES, SiteCVConfig, SiteCVError, check_options
from .methods import method_labels, method_overrides
from .report import write_study_report
from .tables import SiteCVTables, site_cv_tables

__all__ = [
    "SiteCVResult",
    "Study",
    "artifact_location",
    "one_class_sites",
    "run_site_cv",
    "run_site_cv_shard",
    "study_overrides",
]

_REPO = Path(__file__).resolve().parents[2]


@dataclass
class SiteCVResult:
    """What an invocation produced.

    Attributes:
        out_dir: the output folder.
        tables: the matrices (:class:`pipelines.site_cv.tables.SiteCVTables`).
        predictions: every case's score (the columns of :data:`pipelines.site_cv.tables.PREDICTION_COLUMNS`).
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


def artifact_location(tracking_uri: str) -> str | None:
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


def study_overrides(cfg: SiteCVConfig, config_file: Path, methods: Sequence[str]) -> tuple[dict, dict]:
    """The bundle overrides of every cell, and those that enter the cell key.

    Args:
        cfg: the invocation.
        config_file: the bundle config (its folder is the cells' ``bundle_root``).
        methods: the methods as given (each is checked against the overrides).

    Returns:
        ``(overrides, key_overrides)``.

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


def _bundle_ppi(config_file: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The bundle's resolved ``ppi`` under every override but the user's ``ppi`` ones: what labels are read against."""
    parser = open_config(config_file, {k: v for k, v in overrides.items() if k.split("#", 1)[0] != "ppi"})
    return dict(parser.get_parsed_content("ppi"))


class Study:
    """One invocation: resolved settings, the MLflow parent run, and the cells."""

    def __init__(self, cfg: SiteCVConfig) -> None:
        self.cfg = cfg
        self.config_file, self.meta_file = _bundle_files(cfg)
        check_options(cfg)
        self.overrides, self.key_overrides = study_overrides(cfg, self.config_file, list(cfg.methods))

        # resolve the datalist once (it may generate the synthetic default) to know the sites and hash it
        parser = open_config(self.config_file, self.overrides)
        check_bundle(parser, self.config_file)
        self.methods = method_labels(
            cfg.methods,
            _bundle_ppi(self.config_file, self.overrides),
            parser.get_parsed_content("ppi"),
            str(self.config_file),
        )
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
                self.client, self.cfg.experiment, artifact_location=artifact_location(self.tracking_uri)
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
        # the study's datalist as one input (its cells log their own training and validation parts)
        self.client.log_inputs(self.parent_id, datasets=datalist_inputs(self.datalist))

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
    study = Study(cfg)
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
    study = Study(cfg)
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


def _run(study: Study, cfg: SiteCVConfig, t_start: float) -> SiteCVResult:
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
        files = write_study_report(study, cfg, tables, preds, cells, t_start)
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


def _run_cells(study: Study, cfg: SiteCVConfig) -> tuple[list[dict[str, Any]], pd.DataFrame]:
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
