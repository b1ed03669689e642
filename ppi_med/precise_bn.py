"""Batch-norm statistics recomputed on clean training data before every validation ("precise BN").

A network in evaluation mode normalises with running statistics, an exponential average (momentum 0.1) of
the batch statistics of recent training steps. With few steps per epoch (the GA default: 10) and a high
learning rate the weights move faster than that average follows, so the evaluated network is not the trained
one: on GA its outputs for every eye swung between about 0 and about 1 from one epoch to the next, and the
pooled validation AUC with them (docs/DESIGN.md section 4.6). Recomputing the statistics as a plain average
over the training data with the current weights, as Wu and Johnson (2021, "Rethinking 'Batch' in BatchNorm")
recommend, removes that lag. It changes no weight, and the checkpoints saved after it carry the recomputed
statistics, so the saved model is the one that was validated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn

from .flags import as_bool

__all__ = ["PreciseBatchNorm", "recompute_batch_norm"]


def _norm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(
    network: nn.Module, loader: Iterable, device: torch.device | str, image_key: str = "image"
) -> int:
    """Replace every batch-norm layer's running statistics by their average over ``loader``'s batches.

    Under ``torch.distributed`` each rank averages its own batches and the ranks' statistics are then
    averaged, so every rank holds the same buffers.

    Args:
        network: the network (its training/evaluation mode is restored afterwards).
        loader: batches of dictionaries with ``image_key``, or of tensors; no augmentation.
        device: where the network runs.
        image_key: the image field of a dictionary batch.

    Returns:
        The number of samples averaged over (on this rank).

    Raises:
        ValueError: an empty loader.
    """
    layers = _norm_layers(network)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in layers]
    was_training = network.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    network.train()
    seen = 0
    try:
        for batch in loader:
            images = batch[image_key] if isinstance(batch, dict) else batch
            images = torch.as_tensor(images).to(device)
            network(images)
            seen += int(images.shape[0])
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        network.train(was_training)
    if seen == 0:
        for m, (mean, var, count) in zip(layers, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise ValueError("no training batch to recompute the batch-norm statistics from (empty loader)")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for m in layers:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(dist.get_world_size())
    return seen


class PreciseBatchNorm:
    """Ignite handler: recompute batch-norm statistics at every epoch's end, before validation reads them.

    Attach it before the validation and checkpoint handlers (the bundles list it first), so that both see the
    recomputed statistics.

    Example::

        PreciseBatchNorm(network, plain_train_loader, device).attach(trainer)

    Args:
        network: the trained network.
        loader: the training records without augmentation.
        device: where the network runs.
        enabled: ``False`` attaches nothing (the running averages of training are used, as before).
        image_key: the image field of a batch.
    """

    def __init__(
        self,
        network: nn.Module,
        loader: Iterable,
        device: torch.device | str,
        enabled: bool = True,
        image_key: str = "image",
    ) -> None:
        self.network = network
        self.loader = loader
        self.device = device
        self.enabled = as_bool(enabled, "precise_bn")
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        recompute_batch_norm(self.network, self.loader, self.device, self.image_key)
