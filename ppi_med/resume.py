"""Resuming a killed training run: what a checkpoint must hold beyond the weights, and loading the latest one.

Every epoch the bundles' :class:`monai.handlers.CheckpointSaver` writes ``checkpoint_epoch=N.pt`` (ignite
writes it to a temporary file and renames it, so a kill during the write leaves the previous one whole, and
removes the previous one only after). Beside the network and the optimiser it holds the learning-rate
schedule and a :class:`TrainingProgress`: the trainer's counters (epoch, iteration), the best validation
metric so far, the checkpoint it chose, and the random number generators. :class:`ResumeHandler` loads the
newest of these files when the trainer starts, with MONAI's :class:`~monai.handlers.CheckpointLoader`
(weights only), and training goes on from the epoch after it, into the same run folder and MLflow run.

Example::

    python -m monai.bundle run --config_file bundles/ga_ppi.json --resume_from runs/ga-ppi_wbp-20261127-101500
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

__all__ = ["ResumeHandler", "TrainingProgress", "latest_checkpoint"]

_EPOCH_FILE = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The epoch checkpoint of the highest epoch in ``ckpt_dir`` (``None`` if there is none)."""
    found = []
    for path in Path(ckpt_dir).glob("checkpoint_epoch=*.pt"):
        m = _EPOCH_FILE.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def _rng_state() -> dict[str, Any]:
    # plain lists and tensors only, so the checkpoint loads with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingProgress:
    """The state of a run that lives outside the network, optimiser and schedule.

    Attach it to the trainer and put it in the epoch :class:`monai.handlers.CheckpointSaver`'s ``save_dict``:
    a resumed run then gets back the trainer's epoch and iteration, the best validation metric and its epoch
    (so the next validation does not overwrite ``model_best.pt`` with a worse model), the best-checkpoint
    saver's record, and the random number generators (torch, NumPy, Python, CUDA). It holds the trainer
    itself rather than being given it, because a bundle's trainer is built from its handlers.

    Args:
        evaluator: the validation engine whose ``best_metric`` and ``best_metric_epoch`` are kept.
        best_saver: the evaluator's key-metric :class:`~monai.handlers.CheckpointSaver`.
        best_filename: the file that saver writes (its ``key_metric_filename``).
    """

    def __init__(self, evaluator: Engine, best_saver: Any = None, best_filename: str = "model_best.pt") -> None:
        self.evaluator = evaluator
        self.best_saver = best_saver
        self.best_filename = best_filename
        self.trainer: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            raise RuntimeError("TrainingProgress is not attached to a trainer")
        state = self.evaluator.state
        return {
            "epoch": int(self.trainer.state.epoch),
            "iteration": int(self.trainer.state.iteration),
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.trainer is None:
            raise RuntimeError("TrainingProgress is not attached to a trainer")
        self.trainer.state.epoch = state["epoch"]
        self.trainer.state.iteration = state["iteration"]
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        if self.best_saver is not None:
            # the saver keeps a checkpoint only if it beats the best it knows of: tell it which one that is
            saved = [(state["best_metric"], self.best_filename)] if state["best_metric_epoch"] > 0 else []
            self.best_saver.load_state_dict({"_saved": saved})
        _set_rng_state(state["rng"])


class ResumeHandler:
    """Load the newest epoch checkpoint of a run folder when the trainer starts, if asked to.

    Args:
        ckpt_dir: the run's checkpoint folder.
        load_dict: name -> object with ``load_state_dict``, as in the epoch saver's ``save_dict`` (with the
            :class:`TrainingProgress`).
        enabled: resume (``True``) or start afresh (``False``: the handler does nothing).
        map_location: passed to ``torch.load``.

    Raises:
        FileNotFoundError: resuming, but ``ckpt_dir`` holds no epoch checkpoint (names the folder).
    """

    def __init__(self, ckpt_dir: str | Path, load_dict: dict[str, Any], enabled: bool = True, map_location=None):
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = load_dict
        self.enabled = bool(enabled)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise FileNotFoundError(
                f"nothing to resume in {self.ckpt_dir}: no checkpoint_epoch=N.pt (the run was killed before its "
                "first epoch ended; start it afresh without resume_from)"
            )
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location)(engine)
        engine.logger.info(f"resumed from {path}: epoch {engine.state.epoch} of {engine.state.max_epochs} done")
