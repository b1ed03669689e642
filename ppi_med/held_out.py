"""Score the chosen checkpoint once on records that neither trained it nor chose it.

A validation AUC that also picked the checkpoint is optimistic, all the more on a small fold. The bundles
therefore keep a third, held-out part (``test#datalist``: GA's ``test_fraction``, LIDC's ``test_fold``) and
:class:`HeldOutTestHandler` scores it when training ends, with the checkpoint the validation chose:

- metrics ``test_auc``, ``test_auc_lo``, ``test_auc_hi`` (DeLong 95 % interval, :func:`ppi_med.stats.auc_ci`),
  ``test_n``, ``test_n_pos`` in the trainer's MLflow run;
- ``test_predictions.csv`` (one row per record: ``image``, ``label``, ``prob``, plus ``site`` / ``patient_id`` /
  ``fold`` when the record has them) in the run's output folder and as an artifact, so that studies can pool
  cases and compare methods on the same cases with DeLong's paired test.

With no held-out records (the default GA split) it does nothing.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from .cases import class1_probabilities, preprocess_case
from .stats import auc_ci
from .tracking import log_batch
from .weights import load_checkpoint

__all__ = ["HeldOutTestHandler", "predict_records"]

#: Record fields copied into ``test_predictions.csv`` when present.
CARRIED = ("site", "subject", "patient_id", "fold", "nodule_id")


def predict_records(
    network: nn.Module,
    records: Sequence[dict[str, Any]],
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    image_key: str = "image",
) -> np.ndarray:
    """Probability of class 1 for every record, in order (the network in eval mode, no augmentation).

    Raises:
        ValueError: a record whose preprocessing fails (named).
    """
    tensors = [preprocess_case(rec, preprocessing, image_key, invertible=False) for rec in records]
    return class1_probabilities(network, tensors, device, batch_size)


class HeldOutTestHandler:
    """When training completes, score the best checkpoint on held-out records and log it.

    Attach it before the :class:`ppi_med.tracking.RunTracker` that closes the run (handlers run in the order
    they were attached), so the metrics land in the open run.

    Args:
        records: the held-out records (``image``, ``label``); empty: nothing is done.
        preprocessing: the bundle's deterministic preprocessing.
        network: the trained network (a copy is loaded with the checkpoint; the trainer's own is untouched).
        checkpoint: the validation-chosen weights (``model_best.pt``); missing: the final weights, with a warning.
        output_dir: where ``test_predictions.csv`` goes (``None``: not written).
        tracker: the MLflow handler of the run (``None``: only printed).
        device: where to run.
        batch_size: records per forward.
    """

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        preprocessing: Callable[[dict[str, Any]], dict[str, Any]],
        network: nn.Module,
        checkpoint: str | Path,
        output_dir: str | Path | None = None,
        tracker: Any = None,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> None:
        self.records = list(records)
        self.preprocessing = preprocessing
        self.network = network
        self.checkpoint = Path(checkpoint)
        self.output_dir = Path(output_dir) if output_dir else None
        self.tracker = tracker
        self.device = device
        self.batch_size = int(batch_size)
        self.metrics: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        if self.records:
            engine.add_event_handler(Events.COMPLETED, self._run)

    def _run(self, engine: Engine) -> None:
        net = deepcopy(self.network)
        if self.checkpoint.is_file():
            load_checkpoint(net, self.checkpoint)
            chosen = self.checkpoint.name
        else:
            warnings.warn(f"held-out test: no {self.checkpoint}; scoring the final weights instead", stacklevel=2)
            chosen = "final weights"
        probs = predict_records(net, self.records, self.preprocessing, device=self.device, batch_size=self.batch_size)
        labels = np.asarray([int(rec["label"]) for rec in self.records])
        n_pos = int(labels.sum())
        self.metrics = {"test_n": float(len(labels)), "test_n_pos": float(n_pos)}
        if min(n_pos, len(labels) - n_pos) >= 2:
            res = auc_ci(labels, probs)
            self.metrics.update(test_auc=res.auc, test_auc_lo=res.ci_low, test_auc_hi=res.ci_high)
            text = f"{res.auc:.4f} (95% CI {res.ci_low:.3f}-{res.ci_high:.3f})"
        else:
            self.metrics["test_auc"] = math.nan
            text = f"undefined ({n_pos} positive of {len(labels)}: DeLong needs >= 2 of each class)"
        run = getattr(self.tracker, "cur_run", None)
        path = self._write(probs) if self.output_dir is not None else None
        if run is not None:
            log_batch(self.tracker.client, run.info.run_id, metrics=self.metrics)
            if path is not None:
                self.tracker.client.log_artifact(run.info.run_id, str(path))
        print(f"held-out test AUC ({len(labels)} records, {chosen}): {text}", flush=True)

    def _write(self, probs: np.ndarray) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "test_predictions.csv"
        extra = [k for k in CARRIED if any(k in rec for rec in self.records)]
        with open(path, "x", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "label", "prob", *extra])
            for rec, p in zip(self.records, probs):
                writer.writerow([rec["image"], int(rec["label"]), f"{p:.6f}", *(rec.get(k, "") for k in extra)])
        return path
