"""What a training run prints: one line an epoch, written around the progress bar, and third-party noise kept out.

A bundle run prints, per epoch, the one line :class:`EpochSummary` writes (epoch, the loss terms, the
validation metric, the best so far and its epoch, seconds). The engines' own INFO records, MONAI's
nvImageCodec notices and MLflow's database set-up are held back by the bundles' ``logging.conf`` (the
loggers in :data:`QUIET_LOGGERS`) and, for the one Python warning among them, by the filter
:func:`quiet_known_warnings` installs when this module is imported. The bundle setting ``verbose`` (``--verbose
true``) sets those loggers back to INFO when the trainer is built, and turns the datasets' caching bars on
(``bundles/common/base.json``); records written before that (MLflow's set-up, nvImageCodec's notice) stay
quiet.

Everything printed while a progress bar may be open goes through :func:`write`, which clears the bar, writes
the line to stdout, flushes, and redraws the bar, so a bar and a line never share a terminal line (stdout is
block-buffered in a pipe: a line written without a flush can land inside the bar's later output).
"""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from ignite.engine import Engine, Events
from tqdm import tqdm

from .flags import as_bool

__all__ = ["NVIMGCODEC_WARNING", "QUIET_LOGGERS", "EpochSummary", "quiet_known_warnings", "restore_logs", "write"]

#: loggers that ``bundles/common/logging.conf`` sets above INFO (a test keeps the two in step), and why
QUIET_LOGGERS: dict[str, str] = {
    "ignite.engine.engine.SupervisedTrainer": "'Engine run resuming ...', 'Epoch[N] Complete', checkpoint saves",
    "ignite.engine.engine.SupervisedEvaluator": "the same, re-run every epoch, and 'Got new best metric'",
    "monai.data.nvimgcodec_pydicom_plugin": "'nvImageCodec is not available' (a WARNING: set to ERROR)",
    "mlflow.store.db.utils": "'Creating initial MLflow database tables...'",
    "alembic": "MLflow's schema migrations",
}

#: the start of MONAI's warning when the optional nvImageCodec DICOM decoder is missing (pydicom's own decoders
#: are used instead)
NVIMGCODEC_WARNING = "NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully"


def quiet_known_warnings() -> None:
    """Ignore the nvImageCodec fallback warning of ``monai.data.image_reader``, and no other warning.

    Idempotent (``warnings.filterwarnings`` replaces an identical filter instead of adding a second).
    """
    warnings.filterwarnings(
        "ignore", message=re.escape(NVIMGCODEC_WARNING), category=UserWarning, module=r"monai\.data\.image_reader"
    )


# the bundles import this module before they build their readers, which is when MONAI warns
quiet_known_warnings()


def restore_logs(names: Sequence[str] | None = None) -> None:
    """Set the loggers ``logging.conf`` quiets (:data:`QUIET_LOGGERS`, or ``names``) back to INFO.

    Args:
        names: the loggers; ``None``: every one in :data:`QUIET_LOGGERS`.
    """
    for name in QUIET_LOGGERS if names is None else names:
        logging.getLogger(name).setLevel(logging.INFO)


def write(line: str) -> None:
    """Print ``line`` to stdout around any open tqdm bar (cleared first, redrawn after) and flush it at once."""
    with tqdm.external_write_mode(file=sys.stdout):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class EpochSummary:
    """Print one line per training epoch: its loss terms, the validation metrics, the best so far, seconds.

    The losses are the trainer's epoch metrics that :class:`ppi_med.engine.EpochLossAverages` publishes
    (``loss``, ``loss_cls``, ``loss_con``, ``loss_reg``, ``loss_ad``, ``grad_norm``: those the run has). The line
    is printed after every other handler of the epoch's end (it is registered when the trainer starts, once
    all are attached), so validation has run and the epoch's checkpoint is written and logged when it appears.
    A line reads (on one line)::

        epoch  3/24  loss 2.3934  loss_cls 0.9279  loss_con 0.5412  loss_reg 0.0333  loss_ad 0.9210
        grad_norm 30.22  val_auc 0.5000  best 0.5000 (epoch 2)  5.1 s

    Validation metrics are shown only for epochs that validated (``val_interval``); the best is the
    evaluator's key metric, the one ``model_best.pt`` holds. Before ``first_epoch`` the best is marked
    ``(epoch N; selection starts at epoch M)``: it is forgotten when the checkpoint-selection window opens
    (:class:`ppi_med.engine.SelectionWindow`), so the best may fall at epoch M. Seconds run from the epoch's
    start to the line, validation, checkpoint and logging included. Only rank 0 prints under ``torchrun``.

    Args:
        evaluator: the validation engine (``None``: losses only).
        first_epoch: the first epoch whose checkpoint may be chosen (the bundles' ``checkpoint_from_epoch``).
        verbose: ``True`` (or a command-line string such as ``"true"``) sets the loggers that the bundles'
            ``logging.conf`` quiets back to INFO when attached (:func:`restore_logs`).

    Raises:
        ValueError: ``verbose`` is not a true/false value.
    """

    #: the loss terms in the order printed; other ``loss*`` metrics follow, then ``grad_norm``
    LOSS_ORDER = ("loss", "loss_cls", "loss_con", "loss_reg", "loss_ad")

    def __init__(self, evaluator: Engine | None = None, first_epoch: int = 1, verbose: bool | str = False) -> None:
        self.evaluator = evaluator
        self.first_epoch = int(first_epoch)
        self.verbose = as_bool(verbose, "verbose")
        self._started = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        """Register the epoch timer and the line on ``engine``; with ``verbose``, restore the quieted logs."""
        if self.verbose:
            restore_logs()
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.STARTED, self._print_last)

    def _print_last(self, engine: Engine) -> None:
        # registered once every handler is attached, so the line comes after the epoch's checkpoint and MLflow
        # logging and its seconds include them
        if not engine.has_event_handler(self._print, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._print)

    def _start(self, engine: Engine) -> None:
        self._started = time.perf_counter()

    def _print(self, engine: Engine) -> None:
        if _is_main_process():
            write(self.line(engine, time.perf_counter() - self._started))

    def line(self, engine: Engine, seconds: float) -> str:
        """The summary line of ``engine``'s current epoch.

        Args:
            engine: the trainer, at the end of an epoch.
            seconds: how long the epoch took.
        """
        state = engine.state
        width = len(str(state.max_epochs))
        parts = [f"epoch {state.epoch:>{width}}/{state.max_epochs}"]
        metrics = state.metrics
        others = sorted(k for k in metrics if k.startswith("loss") and k not in self.LOSS_ORDER)
        for key in [*self.LOSS_ORDER, *others]:
            if key in metrics:
                parts.append(f"{key} {float(metrics[key]):.4f}")
        if "grad_norm" in metrics:
            parts.append(f"grad_norm {float(metrics['grad_norm']):.2f}")
        parts += self._validation(state.epoch)
        parts.append(f"{seconds:.1f} s")
        return "  ".join(parts)

    def _validation(self, epoch: int) -> list[str]:
        """The key metric (and ``val_auc`` beside another key metric) of this epoch's validation, and the best."""
        ev = self.evaluator
        if ev is None or ev.state.epoch != epoch or not ev.state.metrics:
            return []  # no validation this epoch: the evaluator still holds an earlier epoch's metrics
        key = getattr(ev.state, "key_metric_name", None) or next(iter(ev.state.metrics))
        names = [key] + (["val_auc"] if key != "val_auc" and "val_auc" in ev.state.metrics else [])
        parts = [f"{n} {_number(ev.state.metrics.get(n))}" for n in names]
        best = getattr(ev.state, "best_metric", -1)
        best_epoch = getattr(ev.state, "best_metric_epoch", -1)
        if best is not None and best_epoch is not None and best_epoch > 0:
            window = f"; selection starts at epoch {self.first_epoch}" if epoch < self.first_epoch else ""
            parts.append(f"best {_number(best)} (epoch {best_epoch}{window})")
        return parts


def _number(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)
