"""Several processes, one model: what changes when a bundle runs under ``torchrun`` (``bundles/multi_gpu.json``).

Only the trainer sees :class:`~torch.nn.parallel.DistributedDataParallel`; the evaluator, the checkpoint
savers, the held-out test and the exports use the plain module, which shares its parameters. So checkpoints
keep their single-process keys (no ``module.`` prefix), and validation, whose shards may differ in length by a
batch, runs no collective inside its forward passes (MONAI's metric gathers the predictions once an epoch).

PPI under DDP: a PPI step runs a traced forward, a saliency backward with respect to the *input*
(``torch.autograd.grad(..., inputs=x)``), a forward of the contrasts, and one ``loss.backward()``. DDP's
reducer hooks fire when a parameter's gradient is accumulated; the saliency backward accumulates none, and in
the final backward every parameter's gradient arrives once, summed over both forwards, so one all-reduce per
step averages the ranks' gradients exactly as for a plain step: no ``no_sync`` is needed and none would be
right (it would skip the one reduction the step has). Pairs for ``L_ad`` and the batch-norm statistics are
per rank, so a DDP step equals the mean of the ranks' PPI losses on their own parts of the global batch (the
test checks the weights against exactly that, computed in one process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from ignite.handlers import ProgressBar
from monai.handlers import CheckpointSaver, MLFlowHandler, StatsHandler

from .held_out import HeldOutTestHandler
from .reference import LinearReferenceHandler
from .robust import DFRHandler

__all__ = ["WRITERS", "for_this_rank", "rank"]

#: handlers that write files, talk to MLflow or print progress: rank 0 only
WRITERS: tuple[type, ...] = (
    CheckpointSaver,
    MLFlowHandler,
    StatsHandler,
    ProgressBar,
    HeldOutTestHandler,
    LinearReferenceHandler,
    DFRHandler,  # refits and writes the chosen model, which only rank 0's held-out test reads
)


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def for_this_rank(handlers: Sequence[Any]) -> list[Any]:
    """The handlers this process attaches: all on rank 0, all but the :data:`WRITERS` on the others.

    A component the override file disables on other ranks (the MLflow tracker) arrives as ``None``.
    """
    mine = [h for h in handlers if h is not None]
    if rank() == 0:
        return mine
    return [h for h in mine if not isinstance(h, WRITERS)]
