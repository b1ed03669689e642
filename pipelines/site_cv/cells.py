"""One cell of a site-wise cross-validation: a (method, training site, seed) trained with the bundle and scored.

A cell trains the bundle in-process (``monai.bundle.ConfigWorkflow``) with ``train_sites=[site]`` and
``val_sites=None`` (the site's subjects split into training and held-out parts by the bundle's ``seed`` and
``val_fraction``), then scores, with the bundle's own ``preprocessing`` and ``network`` and both the best and
the final checkpoint, the site's held-out records and every record of every other site of the datalist.

Layout of a cell in the output folder::

    cells/<key>/key.json                 what the key hashes (bundle, datalist, overrides, method, site, seed)
    cells/<key>/attempt-<n>/models/      the bundle's checkpoints (model_best.pt, model_final.pt)
    cells/<key>/attempt-<n>/predictions.csv
    cells/<key>/attempt-<n>/cell.json    the record, written last: an attempt without it did not finish

The cell's MLflow run is the bundle's own (its ``RunTracker``), tagged as a child of the parent run and with
``cv_key``/``cv_attempt``; ``auc_<site>`` (best checkpoint) and ``auc_final_<site>`` are logged into it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ppi_med.atomic import atomic_write_json
from ppi_med.tracking import metric_key

from ..bundle_config import open_workflow
from .config import SiteCVError
from .methods import method_overrides
from .predict import TensorCache, predict_probabilities
from .tables import cell_auc

__all__ = [
    "BUNDLE_READS",
    "BUNDLE_SETS",
    "CELL_FORMAT",
    "Cell",
    "CellRunner",
    "StudySettings",
    "cell_key",
    "check_bundle",
    "sha256_file",
]

CELL_FORMAT = 1


#: The contract between site CV and a bundle (docs/DESIGN.md section 5). Ids site CV reads from the bundle ...
BUNDLE_READS = (
    "datalist", "seed", "val_fraction", "tracking_uri", "max_epochs", "batch_size", "device", "common#network",
    "common#preprocessing", "common#ckpt_dir", "common#chosen_checkpoint", "train#datalist", "validate#datalist",
    "ppi",
)  # fmt: skip
#: ... and ids it sets for every cell (``test#datalist`` is read when the bundle has a test part).
BUNDLE_SETS = (
    "train_sites", "val_sites", "seed", "experiment_name", "tracking_uri", "run_name", "runs_dir", "output_dir",
    "run_tags", "max_epochs", "test_fraction", "ppi#enabled", "ppi#saliency", "ppi#mask",
)  # fmt: skip


def check_bundle(parser: Any, config_file: Path) -> None:
    """Stop with every id of :data:`BUNDLE_READS` and :data:`BUNDLE_SETS` that ``config_file`` lacks.

    Raises:
        SiteCVError: the bundle lacks ids site CV reads or sets.
    """
    missing = [i for i in dict.fromkeys((*BUNDLE_READS, *BUNDLE_SETS)) if i not in parser]
    if missing:
        raise SiteCVError(
            f"{config_file} lacks the bundle ids site CV reads or sets: {', '.join(missing)} "
            "(the contract is in docs/DESIGN.md section 5)"
        )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
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


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else absolute."""
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(root.resolve()).as_posix()
    return str(path.resolve())


def _case_id(image: str, root: Path) -> str:
    """A case's name: its image path relative to the datalist's folder (absolute when outside it)."""
    path = Path(image)
    with contextlib.suppress(ValueError):
        return path.resolve().relative_to(root.resolve()).as_posix()
    return str(path)


@dataclass(frozen=True)
class Cell:
    """A (method, training site, seed) of the cross-validation and its key."""

    method: str
    site: str
    seed: int
    key: str
    material: dict[str, Any]

    @property
    def label(self) -> str:
        """How the cell is named in messages."""
        return f"{self.method} trained on {self.site}, seed {self.seed}"


@dataclass(frozen=True)
class StudySettings:
    """What every cell of one site-CV invocation shares.

    Attributes:
        config_file: the bundle config.
        meta_file: the bundle metadata (or ``None``).
        overrides: bundle overrides for every cell (the user's, plus ``bundle_root``).
        out_dir: the study's output folder (cells go to ``out_dir/cells``).
        datalist: the resolved datalist file.
        items: its records (from :func:`ppi_med.data.load_datalist`).
        tracking_uri: the MLflow store's URI (passed to the bundle).
        experiment: the MLflow experiment name.
        experiment_id: its id.
        parent_run_id: the invocation's parent run.
        bundle_logging: apply the bundle's ``logging.conf`` rather than keeping MONAI quiet.
        min_steps: optimiser steps a cell gets at least (its epochs are raised to reach them; 0: the bundle's).
    """

    config_file: Path
    meta_file: Path | None
    overrides: Mapping[str, Any]
    out_dir: Path
    datalist: Path
    items: list[dict]
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    bundle_logging: bool = False
    min_steps: int = 0


class CellRunner:
    """Trains, scores and reuses cells for one invocation.

    Args:
        study: what the invocation's cells share.
        client: MLflow client of the study's tracking store.
    """

    def __init__(self, study: StudySettings, client: Any) -> None:
        self.study = study
        self.client = client
        # preprocessed test images, shared by the cells: every cell has the same overrides but for the
        # method, site and seed, which the evaluation preprocessing does not depend on
        self._tensors = TensorCache()

    def _run_ok(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.status == "FINISHED"
        except MlflowException:
            return False

    def _attempts(self, cell: Cell) -> list[Path]:
        folder = self.study.out_dir / "cells" / cell.key
        found = [p for p in folder.glob("attempt-*") if p.is_dir() and p.name[len("attempt-") :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len("attempt-") :]))

    def reusable(self, cell: Cell) -> dict[str, Any] | None:
        """The record of the latest complete attempt of ``cell`` whose MLflow run is FINISHED, if any."""
        for attempt in reversed(self._attempts(cell)):
            path = attempt / "cell.json"
            if not path.is_file():
                continue
            try:
                rec = json.loads(path.read_text())
            except ValueError:
                continue
            needed = [attempt / rec.get(k, "") for k in ("predictions", "checkpoint_best", "checkpoint_final")]
            if all(p.is_file() for p in needed) and self._run_ok(rec.get("run_id", "")):
                return rec
        return None

    def train(self, cell: Cell) -> dict[str, Any]:
        """Train one cell with the bundle, score every test case, and write the attempt's record."""
        import torch

        attempts = self._attempts(cell)
        n = int(attempts[-1].name[len("attempt-") :]) + 1 if attempts else 1
        cell_dir = self.study.out_dir / "cells" / cell.key
        attempt = cell_dir / f"attempt-{n}"
        attempt.mkdir(parents=True, exist_ok=False)
        (cell_dir / "key.json").write_text(json.dumps(cell.material, indent=2, default=str))
        run_name = f"cv-{cell.method}-{cell.site}-s{cell.seed}-{cell.key[:8]}" + (f"-a{n}" if n > 1 else "")
        overrides = {
            **self.study.overrides,
            **method_overrides(cell.method),
            "train_sites": [cell.site],
            "val_sites": None,
            "seed": cell.seed,
            "experiment_name": self.study.experiment,
            "tracking_uri": self.study.tracking_uri,
            "run_name": run_name,
            "runs_dir": str(cell_dir.resolve()),
            "output_dir": str(attempt.resolve()),
            "run_tags": {
                "mlflow.parentRunId": self.study.parent_run_id,
                "train_site": cell.site,
                "cv_method": cell.method,
                "cv_seed": cell.seed,
                "cv_key": cell.key,
                "cv_attempt": n,
            },
        }
        t0 = time.perf_counter()
        logging_file = None if self.study.bundle_logging else False
        try:
            with _quiet_monai(not self.study.bundle_logging):
                wf = open_workflow(
                    self.study.config_file,
                    meta_file=str(self.study.meta_file) if self.study.meta_file else None,
                    logging_file=logging_file,
                    workflow_type="train",
                    **overrides,
                )
            epochs, steps = self._epochs(wf.parser)
            wf.parser["max_epochs"] = epochs
            wf.initialize()
            wf.run()
            parse = wf.parser.get_parsed_content
            train_list, selection = parse("train#datalist"), parse("validate#datalist")
            # the diagonal: the bundle's test part when it has one, else the part that chose the checkpoint
            heldout = (parse("test#datalist") if "test" in wf.parser.config else None) or selection
            ckpt_dir = Path(parse("common#ckpt_dir"))
            # the model the bundle chose: model_best.pt, or DFR's retrained head
            best = Path(parse("common#chosen_checkpoint"))
            ckpts = {"best": best, "final": ckpt_dir / "model_final.pt"}
            for name, path in ckpts.items():
                if not path.is_file():
                    raise FileNotFoundError(f"{cell.label}: the bundle wrote no {name} checkpoint at {path}")
            cases = self._test_cases(cell.site, heldout, selection)
            scores = predict_probabilities(
                parse("common#network"),
                parse("common#preprocessing"),
                [c["image"] for c in cases],
                parse("device"),
                int(parse("batch_size")),
                ckpts,
                torch,
                cache=self._tensors,
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
            "experiment": self.study.experiment,
            "tracking_uri": self.study.tracking_uri,
            # relative to the attempt folder, so that a moved output folder still resumes
            "checkpoint_best": _relative(ckpts["best"], attempt),
            "checkpoint_final": _relative(ckpts["final"], attempt),
            "predictions": "predictions.csv",
            "train_subjects": sorted({str(it.get("subject", it["image"])) for it in train_list}),
            "heldout_subjects": sorted({str(it.get("subject", it["image"])) for it in heldout}),
            "n_train": len(train_list),
            "epochs": epochs,
            "optimiser_steps": epochs * steps,
            "n_heldout": len(heldout),
            "selection_subjects": sorted({str(it.get("subject", it["image"])) for it in selection}),
            "auc_best": aucs["best"],
            "auc_final": aucs["final"],
            "seconds": round(time.perf_counter() - t0, 2),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        atomic_write_json(attempt / "cell.json", rec, default=str)  # written last: marks a complete attempt
        return rec

    def _epochs(self, parser: Any) -> tuple[int, int]:
        """``(epochs, steps per epoch)`` of a cell: the bundle's epochs, raised to reach ``min_steps``."""
        parse = parser.get_parsed_content
        steps = max(1, math.ceil(len(parse("train#datalist")) / int(parse("batch_size"))))
        epochs = int(parse("max_epochs"))
        if self.study.min_steps:
            epochs = max(epochs, math.ceil(self.study.min_steps / steps))
        return epochs, steps

    def _test_cases(self, site: str, heldout: list[dict], selection: list[dict]) -> list[dict[str, Any]]:
        """The training site's held-out records, then every record of every other site of the datalist that
        did not choose the checkpoint (``oracle`` selection validates on a part of another site)."""
        root = self.study.datalist.parent
        cases = []
        chose = {str(it["image"]) for it in selection}
        elsewhere = [it for it in self.study.items if str(it.get("site")) != site and str(it["image"]) not in chose]
        for role, records in (("heldout", heldout), ("site", elsewhere)):
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

    def _child_runs(self, cell: Cell, attempt: int) -> list[Any]:
        # under this invocation's parent only: a study in another folder of the same store has the same keys
        return self.client.search_runs(
            [self.study.experiment_id],
            filter_string=f"tags.cv_key = '{cell.key}' and tags.cv_attempt = '{attempt}' "
            f"and tags.`mlflow.parentRunId` = '{self.study.parent_run_id}'",
        )

    def _child_run(self, cell: Cell, attempt: int) -> Any:
        runs = self._child_runs(cell, attempt)
        if len(runs) != 1:
            raise RuntimeError(
                f"{cell.label}: expected one MLflow run tagged cv_key={cell.key}, cv_attempt={attempt} in "
                f"experiment '{self.study.experiment}' of {self.study.tracking_uri}, found {len(runs)}"
            )
        return runs[0]

    def _fail_children(self, cell: Cell, attempt: int) -> None:
        """Mark the crashed attempt's run FAILED (it would stay RUNNING); the run itself is kept."""
        with contextlib.suppress(Exception):
            for run in self._child_runs(cell, attempt):
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, "FAILED")

    def _log_child_metrics(self, run_id: str, preds: pd.DataFrame) -> dict[str, dict[str, float | None]]:
        """Log ``auc_<site>`` (best checkpoint) and ``auc_final_<site>`` into the cell's run; return them.

        Where a test site's cases have one class, no AUC is logged and the tag ``auc_undefined_<site>`` says why.
        """
        aucs: dict[str, dict[str, float | None]] = {"best": {}, "final": {}}
        for site, g in preds.groupby("test_site", sort=True):
            for which, prefix in (("best", "auc_"), ("final", "auc_final_")):
                auc = cell_auc(g["label"].to_numpy(), g[f"score_{which}"].to_numpy())
                aucs[which][str(site)] = None if math.isnan(auc) else auc
                if not math.isnan(auc):
                    self.client.log_metric(run_id, prefix + metric_key(site), auc)
            if aucs["best"][str(site)] is None:  # a metric cannot say why it is missing; a tag can
                labels = sorted(set(g["label"].astype(int)))
                self.client.set_tag(
                    run_id,
                    "auc_undefined_" + metric_key(site),
                    f"one class in the {len(g)} test cases (label {labels[0]})" if labels else "no test cases",
                )
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
