"""Site-wise cross-validation of a MONAI bundle: train on each site, test on every site, DeLong-test PPI vs baseline.

For every training site X, method and seed, the bundle is trained in-process (``monai.bundle.ConfigWorkflow``)
with ``train_sites=[X]`` and ``val_sites=None``, so X's subjects are split (stratified, subject-level, by the
bundle's ``seed`` and ``val_fraction``) into a training part and a held-out part; every method of a seed sees
the same split. The best checkpoint (best validation AUC; ``--checkpoint final`` for the last epoch's) then
scores X's held-out part (the diagonal of the matrix) and every volume of every other site, with the
bundle's own ``preprocessing`` and ``network``. The tables are those of table 2.3 of the method's text (see
:mod:`pipelines.cv_tables`), with DeLong's paired test of each PPI method against the baseline in every cell
and on all off-diagonal cases pooled.

Methods: ``baseline`` (``ppi#enabled false``), ``ppi_<saliency>`` (e.g. ``ppi_wbp``, ``ppi_gradcam``) and
``ppi_<saliency>_<mask>`` (e.g. ``ppi_wbp_box``).

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
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ppi_med.data import load_datalist
from ppi_med.ppi.masks import MASKS
from ppi_med.saliency import METHODS as SALIENCY_METHODS
from ppi_med.tracking import git_commit

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
    "parse_overrides",
    "run_site_cv",
]

CELL_FORMAT = 1
# bundle ids that the pipeline sets per cell; the user sets them through the command's own options
RESERVED_OVERRIDES = {
    "train_sites": "--sites",
    "val_sites": "(always null: the training site is split by subject)",
    "seed": "--first-seed / --seeds",
    "run_name": "(set per cell)",
    "run_tags": "(set per cell)",
    "runs_dir": "--out",
    "output_dir": "--out",
    "ckpt_dir": "--out",
    "experiment_name": "--experiment",
    "tracking_uri": "--tracking-uri",
}
_REPORT_MARKER = "summary.json"


class SiteCVError(ValueError):
    """A bad request: unknown site or method, conflicting override, malformed option."""


@dataclass
class SiteCVConfig:
    """What one invocation runs.

    Attributes:
        config_file: the bundle config (e.g. ``bundles/ga_ppi.json``).
        meta_file: the bundle's metadata (``metadata.json`` beside the config when ``None``).
        sites: training and test sites (every site of the datalist when ``None``).
        methods: ``baseline``, ``ppi_<saliency>`` or ``ppi_<saliency>_<mask>``.
        seeds: number of seeds.
        first_seed: the first seed (the bundle's ``seed`` when ``None``); seeds are consecutive.
        out_dir: output folder (``runs/site_cv/<time>`` when ``None``).
        tracking_uri: MLflow store (``MLFLOW_TRACKING_URI`` or the bundle's ``tracking_uri`` when ``None``).
        experiment: MLflow experiment of the parent and child runs.
        overrides: bundle overrides (``id#path -> value``) applied to every cell.
        checkpoint: ``best`` (best validation AUC) or ``final`` checkpoint for the tables.
        bundle_logging: apply the bundle's ``logging.conf`` (the engines' INFO logs) instead of staying quiet.
        progress: show the tqdm bar.
    """

    config_file: str | Path
    meta_file: str | Path | None = None
    sites: Sequence[str] | None = None
    methods: Sequence[str] = ("baseline", "ppi_wbp")
    seeds: int = 1
    first_seed: int | None = None
    out_dir: str | Path | None = None
    tracking_uri: str | None = None
    experiment: str = "ga_site_cv"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str = "best"
    bundle_logging: bool = False
    progress: bool = True


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
    tables: Any
    predictions: pd.DataFrame
    cells: pd.DataFrame
    parent_run_id: str
    tracking_uri: str
    files: list[Path]
    seconds: float


def method_overrides(method: str) -> dict[str, Any]:
    """The bundle overrides that make a method.

    Args:
        method: ``baseline``, ``ppi_<saliency>`` or ``ppi_<saliency>_<mask>``.

    Returns:
        ``{"ppi#enabled": False}`` or ``{"ppi#enabled": True, "ppi#saliency": ..., ["ppi#mask": ...]}``.

    Raises:
        SiteCVError: an unknown method, saliency or mask.
    """
    if method == "baseline":
        return {"ppi#enabled": False}
    if method.startswith("ppi_"):
        rest = method[len("ppi_") :]
        for saliency in sorted(SALIENCY_METHODS, key=len, reverse=True):
            if rest == saliency:
                return {"ppi#enabled": True, "ppi#saliency": saliency}
            if rest.startswith(saliency + "_") and rest[len(saliency) + 1 :] in MASKS:
                return {"ppi#enabled": True, "ppi#saliency": saliency, "ppi#mask": rest[len(saliency) + 1 :]}
    raise SiteCVError(
        f"unknown method '{method}': use 'baseline', 'ppi_<saliency>' with saliency one of "
        f"{', '.join(SALIENCY_METHODS)}, or 'ppi_<saliency>_<mask>' with mask one of {', '.join(MASKS)} "
        "(e.g. ppi_wbp, ppi_gradcam, ppi_wbp_box)"
    )


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cell_key(
    bundle_sha256: str, datalist_sha256: str, overrides: Mapping[str, Any], method: str, site: str, seed: int
) -> tuple[str, dict[str, Any]]:
    """The key of a (method, site, seed) cell and the material it hashes.

    Args:
        bundle_sha256: hash of the bundle config file's bytes.
        datalist_sha256: hash of the datalist file's bytes.
        overrides: the user's bundle overrides.
        method: the method.
        site: the training site.
        seed: the seed.

    Returns:
        ``(key, material)``: 16 hex digits of the SHA-256 of ``material`` as canonical JSON.
    """
    material = {
        "format": CELL_FORMAT,
        "bundle_sha256": bundle_sha256,
        "datalist_sha256": datalist_sha256,
        "overrides": {k: overrides[k] for k in sorted(overrides)},
        "method": method,
        "train_site": site,
        "seed": int(seed),
    }
    text = json.dumps(material, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16], material


def _metric_name(site: str) -> str:
    """A site name as MLflow allows it in a metric key."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(site))


def _case_id(image: str, root: Path) -> str:
    path = Path(image)
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(root.resolve()).as_posix()
    return str(path)


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a local SQLite store (``<folder>/mlruns``), as MONAI's MLflow handler puts them."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    return None


@dataclass
class _Cell:
    method: str
    site: str
    seed: int
    key: str
    material: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.method} trained on {self.site}, seed {self.seed}"


class _Study:
    """One invocation: resolved settings, the MLflow parent run, and the cells."""

    def __init__(self, cfg: SiteCVConfig) -> None:
        from monai.bundle import ConfigParser

        self.cfg = cfg
        self.config_file = Path(cfg.config_file)
        if not self.config_file.is_file():
            raise FileNotFoundError(f"bundle config file not found: {self.config_file}")
        meta = Path(cfg.meta_file) if cfg.meta_file else self.config_file.parent / "metadata.json"
        if cfg.meta_file and not meta.is_file():
            raise FileNotFoundError(f"bundle metadata file not found: {meta}")
        self.meta_file = meta if meta.is_file() else None
        if cfg.checkpoint not in ("best", "final"):
            raise SiteCVError(f"checkpoint must be 'best' or 'final', got '{cfg.checkpoint}'")
        if int(cfg.seeds) < 1:
            raise SiteCVError(f"--seeds must be at least 1, got {cfg.seeds}")
        self.methods = list(dict.fromkeys(cfg.methods))
        if not self.methods:
            raise SiteCVError("no method given")
        if len(self.methods) != len(cfg.methods):
            raise SiteCVError(f"a method is listed twice in {list(cfg.methods)}")
        self.method_ov = {m: method_overrides(m) for m in self.methods}
        self.overrides = dict(cfg.overrides)
        for key in self.overrides:
            if key in RESERVED_OVERRIDES:
                raise SiteCVError(f"'{key}' is set by the site CV for every cell; use {RESERVED_OVERRIDES[key]}")
        for m, mov in self.method_ov.items():
            clash = sorted(set(mov) & set(self.overrides))
            if clash:
                raise SiteCVError(f"override(s) {clash} conflict with method '{m}', which sets {mov}")
        self.overrides.setdefault("bundle_root", str(self.config_file.parent.resolve()))

        # resolve the datalist once (it may generate the synthetic default) to know the sites and hash it
        parser = ConfigParser()
        parser.read_config(str(self.config_file))
        parser.update(pairs=dict(self.overrides))
        self.datalist = Path(parser.get_parsed_content("datalist"))
        items = load_datalist(self.datalist)
        self.items = items
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
        self.val_fraction = parser.get_parsed_content("val_fraction")
        first = int(parser.get_parsed_content("seed")) if cfg.first_seed is None else int(cfg.first_seed)
        self.seeds = [first + i for i in range(int(cfg.seeds))]

        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if cfg.tracking_uri and env_uri and cfg.tracking_uri != env_uri:
            raise SiteCVError(
                f"--tracking-uri {cfg.tracking_uri} differs from MLFLOW_TRACKING_URI={env_uri}, which MONAI's "
                "MLflow handler would use for the cells' runs; unset one of them"
            )
        self.tracking_uri = cfg.tracking_uri or env_uri or str(parser.get_parsed_content("tracking_uri"))
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else Path("runs") / "site_cv" / self.stamp
        self.bundle_sha = _sha256(self.config_file)
        self.datalist_sha = _sha256(self.datalist)
        self.cells = [
            _Cell(m, site, seed, *cell_key(self.bundle_sha, self.datalist_sha, cfg.overrides, m, site, seed))
            for seed in self.seeds
            for site in self.sites
            for m in self.methods
        ]

    # ----- MLflow -----------------------------------------------------------------------------------------

    def open_parent(self) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(
                self.cfg.experiment, artifact_location=_artifact_location(self.tracking_uri)
            )
        elif exp.lifecycle_stage != "active":
            raise SiteCVError(f"MLflow experiment '{self.cfg.experiment}' is deleted; restore it or choose another")
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        tags = {
            "git_commit": git_commit(),
            "cv_kind": "site_cv_parent",
            "cv_out_dir": str(self.out_dir.resolve()),
            "bundle": self.config_file.name,
        }
        run = self.client.create_run(exp_id, run_name=f"site-cv-{self.stamp}", tags=tags)
        self.parent_id = run.info.run_id
        params = {
            "config_file": str(self.config_file),
            "sites": ",".join(self.sites),
            "methods": ",".join(self.methods),
            "seeds": ",".join(map(str, self.seeds)),
            "checkpoint": self.cfg.checkpoint,
            "datalist": str(self.datalist),
            "overrides": json.dumps(dict(self.cfg.overrides), sort_keys=True, default=str)[:500],
        }
        for k, v in params.items():
            self.client.log_param(self.parent_id, k, v)

    def close_parent(self, status: str) -> None:
        self.client.set_terminated(self.parent_id, status)

    def _run_ok(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.status == "FINISHED"
        except MlflowException:
            return False

    # ----- cells ------------------------------------------------------------------------------------------

    def _attempts(self, cell: _Cell) -> list[Path]:
        folder = self.out_dir / "cells" / cell.key
        found = [p for p in folder.glob("attempt-*") if p.is_dir() and p.name[len("attempt-") :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len("attempt-") :]))

    def reusable(self, cell: _Cell) -> dict[str, Any] | None:
        """The record of the latest complete attempt of ``cell`` whose MLflow run is FINISHED, if any."""
        for attempt in reversed(self._attempts(cell)):
            path = attempt / "cell.json"
            if not path.is_file():
                continue
            try:
                rec = json.loads(path.read_text())
            except ValueError:
                continue
            needed = [
                attempt / rec.get("predictions", ""),
                Path(rec.get("checkpoint_best", "")),
                Path(rec.get("checkpoint_final", "")),
            ]
            if all(p.is_file() for p in needed) and self._run_ok(rec.get("run_id", "")):
                return rec
        return None

    def train(self, cell: _Cell) -> dict[str, Any]:
        """Train one cell with the bundle, score every test case, and write the attempt's record."""
        import torch
        from monai.bundle import ConfigWorkflow

        attempts = self._attempts(cell)
        n = int(attempts[-1].name[len("attempt-") :]) + 1 if attempts else 1
        cell_dir = self.out_dir / "cells" / cell.key
        attempt = cell_dir / f"attempt-{n}"
        attempt.mkdir(parents=True, exist_ok=False)
        (cell_dir / "key.json").write_text(json.dumps(cell.material, indent=2, default=str))
        run_name = f"cv-{cell.method}-{cell.site}-s{cell.seed}-{cell.key[:8]}" + (f"-a{n}" if n > 1 else "")
        overrides = {
            **self.overrides,
            **self.method_ov[cell.method],
            "train_sites": [cell.site],
            "val_sites": None,
            "seed": cell.seed,
            "experiment_name": self.cfg.experiment,
            "tracking_uri": self.tracking_uri,
            "run_name": run_name,
            "runs_dir": str(cell_dir.resolve()),
            "output_dir": str(attempt.resolve()),
            "run_tags": {
                "mlflow.parentRunId": self.parent_id,
                "train_site": cell.site,
                "cv_method": cell.method,
                "cv_seed": cell.seed,
                "cv_key": cell.key,
                "cv_attempt": n,
            },
        }
        t0 = time.perf_counter()
        logging_file = None if self.cfg.bundle_logging else False
        try:
            with _quiet_monai(not self.cfg.bundle_logging):
                wf = ConfigWorkflow(
                    config_file=str(self.config_file),
                    meta_file=str(self.meta_file) if self.meta_file else None,
                    logging_file=logging_file,
                    workflow_type="train",
                    **overrides,
                )
            wf.initialize()
            wf.run()
            parse = wf.parser.get_parsed_content
            train_list, heldout = parse("train#datalist"), parse("validate#datalist")
            ckpt_dir = Path(parse("ckpt_dir"))
            ckpts = {"best": ckpt_dir / "model_best.pt", "final": ckpt_dir / "model_final.pt"}
            for name, path in ckpts.items():
                if not path.is_file():
                    raise FileNotFoundError(f"{cell.label}: the bundle wrote no {name} checkpoint at {path}")
            cases = self._test_cases(cell.site, heldout)
            scores = _predict(
                parse("network"),
                parse("preprocessing"),
                [c["image"] for c in cases],
                parse("device"),
                int(parse("batch_size")),
                {k: p for k, p in ckpts.items()},
                torch,
            )
            wf.finalize()
        except BaseException:
            self._fail_children(cell, n)
            raise
        run = self._child_run(cell, n)
        preds = pd.DataFrame(
            {
                "test_site": [c["site"] for c in cases],
                "case": [c["case"] for c in cases],
                "subject": [c["subject"] for c in cases],
                "label": [c["label"] for c in cases],
                "role": [c["role"] for c in cases],
                "score_best": scores["best"],
                "score_final": scores["final"],
            }
        )
        preds.to_csv(attempt / "predictions.csv", index=False)
        aucs = self._log_child_metrics(run.info.run_id, preds)
        rec = {
            "key": cell.key,
            "material": cell.material,
            "method": cell.method,
            "train_site": cell.site,
            "seed": cell.seed,
            "attempt": n,
            "run_id": run.info.run_id,
            "run_name": run_name,
            "experiment": self.cfg.experiment,
            "tracking_uri": self.tracking_uri,
            "checkpoint_best": str(ckpts["best"].resolve()),
            "checkpoint_final": str(ckpts["final"].resolve()),
            "predictions": "predictions.csv",
            "train_subjects": sorted({str(it.get("subject", it["image"])) for it in train_list}),
            "heldout_subjects": sorted({str(it.get("subject", it["image"])) for it in heldout}),
            "n_train": len(train_list),
            "n_heldout": len(heldout),
            "auc_best": aucs["best"],
            "auc_final": aucs["final"],
            "seconds": round(time.perf_counter() - t0, 2),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        tmp = attempt / "cell.json.tmp"
        tmp.write_text(json.dumps(rec, indent=2, default=str))
        tmp.replace(attempt / "cell.json")  # written last: its presence marks a complete attempt
        return rec

    def _test_cases(self, site: str, heldout: list[dict]) -> list[dict[str, Any]]:
        """The training site's held-out records, then every record of every other site of the datalist."""
        root = self.datalist.parent
        cases = []
        for role, records in (("heldout", heldout), ("site", [it for it in self.items if str(it.get("site")) != site])):
            for it in records:
                cases.append(
                    {
                        "image": it["image"],
                        "site": str(it.get("site")),
                        "case": _case_id(it["image"], root),
                        "subject": str(it.get("subject", _case_id(it["image"], root))),
                        "label": int(it["label"]),
                        "role": role,
                    }
                )
        return cases

    def _child_runs(self, cell: _Cell, attempt: int) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.cv_key = '{cell.key}' and tags.cv_attempt = '{attempt}'",
        )

    def _child_run(self, cell: _Cell, attempt: int) -> Any:
        runs = self._child_runs(cell, attempt)
        if len(runs) != 1:
            raise RuntimeError(
                f"{cell.label}: expected one MLflow run tagged cv_key={cell.key}, cv_attempt={attempt} in "
                f"experiment '{self.cfg.experiment}' of {self.tracking_uri}, found {len(runs)}"
            )
        return runs[0]

    def _fail_children(self, cell: _Cell, attempt: int) -> None:
        """Mark the crashed attempt's run FAILED (it would stay RUNNING); the run itself is kept."""
        with contextlib.suppress(Exception):
            for run in self._child_runs(cell, attempt):
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, "FAILED")

    def _log_child_metrics(self, run_id: str, preds: pd.DataFrame) -> dict[str, dict[str, float | None]]:
        """Log ``auc_<site>`` (best checkpoint) and ``auc_final_<site>`` into the cell's run; return them."""
        from .cv_tables import cell_auc

        aucs: dict[str, dict[str, float | None]] = {"best": {}, "final": {}}
        for site, g in preds.groupby("test_site", sort=True):
            for which, prefix in (("best", "auc_"), ("final", "auc_final_")):
                auc = cell_auc(g["label"].to_numpy(), g[f"score_{which}"].to_numpy())
                aucs[which][str(site)] = None if math.isnan(auc) else auc
                if not math.isnan(auc):
                    self.client.log_metric(run_id, prefix + _metric_name(site), auc)
        return aucs


@contextlib.contextmanager
def _quiet_monai(quiet: bool):
    """Silence MONAI's 'logging file is False' warning when the bundle's logging config is skipped on purpose."""
    import logging

    if not quiet:
        yield
        return
    names = ["monai.bundle.workflows", "monai.bundle"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _load_weights(network: Any, path: Path, device: Any, torch: Any) -> None:
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # CheckpointSaver keeps {"model": ..., "optimizer": ...} when it saves several
    network.load_state_dict(state)


def _predict(
    network: Any,
    preprocessing: Any,
    images: Sequence[str],
    device: Any,
    batch_size: int,
    checkpoints: Mapping[str, Path],
    torch: Any,
) -> dict[str, np.ndarray]:
    """Softmax probability of class 1 of every image, with each checkpoint's weights loaded in turn."""
    tensors = []
    for image in images:
        item = preprocessing({"image": image})
        x = item["image"]
        tensors.append(x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x))
    out: dict[str, np.ndarray] = {}
    network.eval()
    for name, path in checkpoints.items():
        _load_weights(network, path, device, torch)
        probs = []
        with torch.no_grad():
            for i in range(0, len(tensors), batch_size):
                batch = torch.stack(tensors[i : i + batch_size]).to(device)
                probs.append(torch.softmax(network(batch).float(), dim=1)[:, 1].cpu().numpy())
        out[name] = np.concatenate(probs) if probs else np.zeros(0)
    return out


def _archive_previous_report(out_dir: Path) -> Path | None:
    """Move an earlier invocation's report files to ``history/<its time>/`` so nothing is overwritten."""
    marker = out_dir / _REPORT_MARKER
    if not marker.is_file():
        return None
    try:
        old = json.loads(marker.read_text())
    except ValueError:
        old = {}
    dest = out_dir / "history" / str(old.get("stamp", time.strftime("%Y%m%d-%H%M%S")))
    k = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('+')[0]}+{k}")
        k += 1
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
        RuntimeError: a cell's training left no MLflow run.
    """
    from . import report
    from .cv_tables import site_cv_tables

    t_start = time.perf_counter()
    study = _Study(cfg)
    out_dir = study.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    study.open_parent()
    status = "FAILED"
    try:
        records, cell_rows = [], []
        bar = tqdm(total=len(study.cells), desc="site CV", unit="cell", disable=not cfg.progress)
        for i, cell in enumerate(study.cells, 1):
            t0 = time.perf_counter()
            rec = study.reusable(cell)
            state = "reused" if rec is not None else "trained"
            if rec is None:
                tqdm.write(f"[{i}/{len(study.cells)}] training {cell.label} (cell {cell.key}) ...")
                rec = study.train(cell)
            row_aucs = " ".join(
                f"{s}={rec['auc_' + cfg.checkpoint][s]:.3f}"
                if rec["auc_" + cfg.checkpoint].get(s) is not None
                else f"{s}=n/a"
                for s in study.sites
            )
            tqdm.write(
                f"[{i}/{len(study.cells)}] {cell.label}: {state} in {time.perf_counter() - t0:.1f} s; "
                f"AUC {row_aucs} (run {rec['run_id']})"
            )
            records.append(rec)
            cell_rows.append(
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
                }
            )
            bar.update()
        bar.close()

        preds = _collect_predictions(records, out_dir, cfg.checkpoint)
        preds = preds[preds["test_site"].isin(study.sites)].reset_index(drop=True)
        tables = site_cv_tables(preds, study.methods, study.sites, study.sites)
        cells = pd.DataFrame(cell_rows)

        archived = _archive_previous_report(out_dir)
        files = report.write_tables(tables, out_dir)
        preds.to_csv(out_dir / "predictions.csv", index=False, float_format="%.6g")
        cells.to_csv(out_dir / "cells.csv", index=False)
        files += [out_dir / "predictions.csv", out_dir / "cells.csv"]
        figures = report.plot_auc_heatmaps(tables, out_dir)
        pfig = report.plot_pvalue_heatmap(tables, out_dir)
        figures += [pfig] if pfig is not None else []
        figures += report.plot_roc_grids(preds, tables, out_dir)
        files += figures

        seconds = time.perf_counter() - t_start
        n_trained = int((cells["status"] == "trained").sum())
        if cfg.checkpoint == "best":
            notes = [
                f"Diagonal cells use the training site's held-out subjects (val_fraction {study.val_fraction}); "
                "they also chose the best checkpoint (best validation AUC), so the diagonal is optimistic. "
                "--checkpoint final scores the last epoch's weights instead."
            ]
        else:
            notes = [
                f"Diagonal cells use the training site's held-out subjects (val_fraction {study.val_fraction}); "
                "the final checkpoint is scored, so they did not select the model."
            ]
        if tables.reference is None:
            notes.append("No 'baseline' among the methods: no DeLong tests.")
        nan_cells = [
            f"{m} {r}->{c}"
            for m, df in tables.auc.items()
            for r in df.index
            for c in study.sites
            if not math.isfinite(float(df.loc[r, c]))
        ]
        if nan_cells:
            notes.append(f"AUC undefined (a class missing) in: {', '.join(nan_cells)}")
        header = [
            f"- bundle: `{study.config_file}`; datalist: `{study.datalist}`",
            f"- sites: {', '.join(study.sites)}; methods: {', '.join(study.methods)}; "
            f"seeds: {', '.join(map(str, study.seeds))}; checkpoint: {cfg.checkpoint}",
            f"- bundle overrides: `{json.dumps(dict(cfg.overrides), default=str)}`",
            f"- MLflow: experiment `{cfg.experiment}`, parent run `{study.parent_id}`, store `{study.tracking_uri}`",
            f"- cells: {len(cells)} ({n_trained} trained, {len(cells) - n_trained} reused); "
            f"wall time {seconds:.1f} s; git {git_commit()[:12]}",
        ]
        md = report.markdown_report(tables, header, figures, cells.drop(columns=["key"]), notes, base=out_dir)
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
            "cells": cell_rows,
            "files": [f.name for f in files] + [_REPORT_MARKER],
        }
        (out_dir / _REPORT_MARKER).write_text(json.dumps(summary, indent=2, default=str))
        files.append(out_dir / _REPORT_MARKER)

        for name, value in tables.summary_metrics().items():
            if math.isfinite(value):
                study.client.log_metric(study.parent_id, name, value)
        study.client.log_metric(study.parent_id, "n_trained_cells", n_trained)
        study.client.log_metric(study.parent_id, "wall_seconds", seconds)
        for f in files:
            folder = (
                "figures" if f.suffix == ".png" else (None if f.name in ("summary.md", _REPORT_MARKER) else "tables")
            )
            study.client.log_artifact(study.parent_id, str(f), artifact_path=folder)
        print("\n" + report.console_report(tables))
        print(f"\nreport: {out_dir / 'summary.md'}")
        print(f"MLflow parent run {study.parent_id} in experiment '{cfg.experiment}' ({study.tracking_uri})")
        if study.tracking_uri.startswith("sqlite:///"):
            print(f"  open it with: mlflow ui --backend-store-uri {study.tracking_uri}")
        status = "FINISHED"
        return SiteCVResult(
            out_dir=out_dir,
            tables=tables,
            predictions=preds,
            cells=cells,
            parent_run_id=study.parent_id,
            tracking_uri=study.tracking_uri,
            files=files,
            seconds=seconds,
        )
    finally:
        study.close_parent(status)


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
        "--methods",
        type=_comma_list,
        default=["baseline", "ppi_wbp"],
        help="comma-separated methods: baseline, ppi_<saliency> (wbp, gradient, input_x_gradient, gradcam, lrp), "
        "ppi_<saliency>_<mask> (e.g. ppi_wbp_box) (default: baseline,ppi_wbp)",
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
    p.add_argument("--out", default=None, help="output folder; rerun into it to resume (default: runs/site_cv/<time>)")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the bundle's)"
    )
    p.add_argument("--experiment", default="ga_site_cv", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--bundle-logging", action="store_true", help="apply the bundle's logging.conf (engine INFO logs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


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
            methods=args.methods,
            seeds=args.seeds,
            first_seed=args.first_seed,
            out_dir=args.out,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            overrides=overrides,
            checkpoint=args.checkpoint,
            bundle_logging=args.bundle_logging,
            progress=not args.no_progress,
        )
        run_site_cv(cfg)
    except (SiteCVError, FileNotFoundError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
