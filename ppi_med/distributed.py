"""Several processes, one model: what changes when a bundle runs under ``torchrun`` (``bundles/common/multi_gpu.json``).

The training skeleton (``bundles/common/base.json``) asks this module for its samplers, the network the
trainer steps and the handlers each rank attaches; outside a process group every answer is the single-process
one, so the same skeleton serves one process and many, and the override file only starts the group.

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

import torch
import torch.distributed as dist
from ignite.handlers import ProgressBar
from monai.data import DistributedSampler
from monai.handlers import CheckpointSaver, MLFlowHandler, StatsHandler

from .held_out import HeldOutTestHandler
from .reference import LinearReferenceHandler
from .robust import DFRHandler

__all__ = ["WRITERS", "for_this_rank", "for_training", "is_distributed", "rank", "sampler"]

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


def is_distributed() -> bool:
    """Whether this process belongs to an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def sampler(dataset: Any, training: bool) -> DistributedSampler | None:
    """The sampler of a bundle's loader: a shard per rank under ``torchrun``, ``None`` (the loader's own order) else.

    Args:
        dataset: the loader's dataset.
        training: the training loader's shards are shuffled and padded to equal length, so every rank runs the
            same number of steps (DDP all-reduces every step); the validation shards are neither.

    Returns:
        A :class:`monai.data.DistributedSampler`, or ``None`` outside a process group.
    """
    if not is_distributed():
        return None
    return DistributedSampler(dataset, even_divisible=training, shuffle=training)


def for_training(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The module the trainer steps: wrapped in DDP under ``torchrun``, ``network`` itself otherwise.

    Only the trainer sees the wrapper; everything else keeps ``network``, which shares its parameters.
    """
    if not is_distributed():
        return network
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids)


def for_this_rank(handlers: Sequence[Any]) -> list[Any]:
    """The handlers this process attaches: all on rank 0, all but the :data:`WRITERS` on the others.

    A nested list (the skeleton's own handlers, which a bundle lists as one item beside any it or MONAI's
    ``--tracking`` adds) is spliced in place. A component disabled on other ranks (the MLflow tracker) arrives
    as ``None``.
    """
    flat: list[Any] = []
    for h in handlers:
        flat.extend(h if isinstance(h, (list, tuple)) else [h])
    mine = [h for h in flat if h is not None]
    if rank() == 0:
        return mine
    return [h for h in mine if not isinstance(h, WRITERS)]
