"""Resuming a killed training run: what a checkpoint must hold beyond the weights, and loading the latest one.

Every epoch the bundles' :class:`AtomicCheckpointSaver` writes ``checkpoint_epoch=N.pt``: to a temporary
file first, renamed when complete (:mod:`ppi_med.atomic`), and the previous epoch's file is removed only
after that, so a kill at any moment leaves a whole checkpoint behind (MONAI's own saver writes in place, and
ignite removes the old file before writing the new one: a kill in between left none, or a truncated one, in
our test). Beside the network and the optimiser it holds the learning-rate
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from .atomic import atomic_torch_save, stale_temporaries
from .console import write
from .engine import epoch_metrics

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "ResumeHandler", "TrainingProgress", "latest_epoch_checkpoint"]

_EPOCH_FILE = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def latest_epoch_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The epoch checkpoint of the highest epoch in ``ckpt_dir`` (``None`` if there is none)."""
    found = []
    for path in Path(ckpt_dir).glob("checkpoint_epoch=*.pt"):
        m = _EPOCH_FILE.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


class AtomicDiskSaver(DiskSaver):
    """ignite's :class:`~ignite.handlers.DiskSaver` that never leaves a run without a whole checkpoint.

    Each file goes to disk through :func:`ppi_med.atomic.atomic_torch_save` (a temporary file, fsync, one
    rename); a file the checkpointer asks to remove is removed only once the next one is on disk (ignite asks
    before writing). With ``filename`` every checkpoint goes to that one name (``model_best.pt``), replaced in
    one rename. Only the process of rank ``save_on_rank`` writes, as with ignite's saver.

    Args:
        dirname: the checkpoint folder.
        filename: a fixed file name, or ``None`` for the names the checkpointer gives.
        save_on_rank: the rank of the process that writes.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None, save_on_rank: int = 0) -> None:
        super().__init__(dirname=dirname, require_empty=False, save_on_rank=save_on_rank)
        self.filename = filename
        self._pending: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        written = self.filename or filename
        if idist.get_rank() == self.save_on_rank:
            atomic_torch_save(checkpoint, self.dirname / written)
            for old in self._pending:
                if old != written:
                    (self.dirname / old).unlink(missing_ok=True)
        self._pending.clear()

    def remove(self, filename: str) -> None:
        self._pending.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` whose every file is written by an :class:`AtomicDiskSaver`.

    Same arguments and files as MONAI's saver (``checkpoint_epoch=N.pt``, ``model_best.pt``,
    ``model_final.pt``); only how they reach the disk differs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the ignite checkpointers MONAI built (best, interval, final), whatever it names them
        for checkpointer in vars(self).values():
            if isinstance(checkpointer, Checkpoint) and isinstance(checkpointer.save_handler, DiskSaver):
                old = checkpointer.save_handler
                checkpointer.save_handler = AtomicDiskSaver(
                    old.dirname, getattr(old, "filename", None), getattr(old, "save_on_rank", 0)
                )


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
        #: ``(epoch, its metrics)`` of the checkpoint a resumed run started from; ``None`` when it did not resume
        self.resumed_from: tuple[int, dict[str, float]] | None = None

    def attach(self, engine: Engine) -> None:
        self.trainer = engine

    def state_dict(self) -> dict[str, Any]:
        if self.trainer is None:
            raise RuntimeError("TrainingProgress is not attached to a trainer")
        state = self.evaluator.state
        metrics = epoch_metrics(self.trainer, self.evaluator)
        return {
            "epoch": int(self.trainer.state.epoch),
            # the epoch's metrics: logged after this is written, so a kill in between can log them on resume
            "metrics": {
                str(getattr(k, "value", k)): float(v) for k, v in metrics.items() if isinstance(v, (int, float))
            },
            "iteration": int(self.trainer.state.iteration),
            "best_metric": float(getattr(state, "best_metric", -1)),
            "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.trainer is None:
            raise RuntimeError("TrainingProgress is not attached to a trainer")
        self.trainer.state.epoch = state["epoch"]
        self.resumed_from = (int(state["epoch"]), dict(state["metrics"]))
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
        tracker: the run's :class:`~ppi_med.tracking.RunTracker`, which logs after the checkpoint is written:
            if the kill came in between, the resumed-from epoch's metrics (kept in the checkpoint) are logged
            on resume, so every epoch is in MLflow once.
        optional: names in ``load_dict`` that a checkpoint written by an earlier version may lack (e.g. the
            weight average, added later): they are left as they are, and a line says so.

    Raises:
        FileNotFoundError: resuming, but ``ckpt_dir`` holds no epoch checkpoint (names the folder).
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        load_dict: dict[str, Any],
        enabled: bool = True,
        map_location: Any = None,
        tracker: Any = None,
        optional: Sequence[str] = (),
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.load_dict = load_dict
        self.optional = tuple(optional)
        self.enabled = bool(enabled)
        self.map_location = map_location
        self.tracker = tracker
        self._relogged = False

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)
            # by then the tracker has opened its run (it starts after this handler)
            engine.add_event_handler(Events.EPOCH_STARTED | Events.COMPLETED, self._relog)

    def _relog(self, engine: Engine) -> None:
        """Log the resumed-from epoch's metrics where the kill came between its checkpoint and its logging."""
        if self._relogged or self.tracker is None:
            return
        self._relogged = True
        progress = next((v for v in self.load_dict.values() if isinstance(v, TrainingProgress)), None)
        if progress is not None and progress.resumed_from is not None:
            epoch, metrics = progress.resumed_from
            self.tracker.log_missing(metrics, step=epoch)

    def __call__(self, engine: Engine) -> None:
        # temporary files of writes a kill cut short (``tmp*``: ignite's saver, used by runs before ppi_med.atomic)
        legacy = [p for p in self.ckpt_dir.glob("tmp*") if p.is_file() and p.suffix != ".pt"]
        for stale in legacy + stale_temporaries(self.ckpt_dir):
            stale.unlink()
        path = latest_epoch_checkpoint(self.ckpt_dir)
        if path is None:
            raise FileNotFoundError(
                f"nothing to resume in {self.ckpt_dir}: no checkpoint_epoch=N.pt (the run was killed before its "
                "first epoch ended; start it afresh without resume_from)"
            )
        load_dict = self.load_dict
        if self.optional:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            lacking = [k for k in self.optional if k in load_dict and k not in saved]
            load_dict = {k: v for k, v in load_dict.items() if k not in lacking}
            if lacking:
                write(f"{path.name} predates {', '.join(lacking)}: left as the run starts it")
        CheckpointLoader(load_path=str(path), load_dict=load_dict, map_location=self.map_location)(engine)
        # printed, not logged: the bundles keep the trainer's own INFO records quiet (ppi_med.console)
        write(f"resumed from {path}: epoch {engine.state.epoch} of {engine.state.max_epochs} done")
