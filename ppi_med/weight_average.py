"""Validate and keep an exponential moving average of the trained weights instead of the last step's weights.

With few steps an epoch and a high learning rate, the weights after an epoch's last step are one noisy point of
the trajectory: on GA the validation AUC of the plain baseline moves by up to 0.075 from one epoch to the next,
and a PPI switch-on adds a transient of its own (docs/DESIGN.md section 4.6). An average of the weights over
the last epochs (Polyak and Juditsky 1992; the "model EMA" of Tan and Le 2019) follows the trajectory without
its last-step noise. Training itself is unchanged: the optimiser keeps stepping the raw weights.

At every epoch's end the network's weights are swapped for the average, so everything that reads the network
then (precise batch norm, validation, the best-checkpoint saver) sees the averaged model, and
:meth:`WeightAverage.restore` swaps the raw weights back before the epoch's resume checkpoint is written, which
stores the average beside them.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """Ignite handler: an exponential moving average of the network's weights, validated in their place.

    The average's horizon is given in epochs, so it means the same on a data set of any size: the decay per
    step is ``1 - 1 / (epochs * steps_per_epoch)``. Floating-point buffers (batch-norm statistics) are averaged
    too; integer ones are copied. At ``start_epoch`` (a restart of training from new weights, JTT's second
    stage) the average starts again from the weights.

    Attach the handler before the validation (and precise batch norm) handlers, and attach :meth:`restore`
    after the validation handlers and before the resume checkpoint's saver. Put the handler in the saver's
    ``save_dict`` and the resume handler's ``load_dict`` so that a resumed run continues the same average.

    Example::

        average = WeightAverage(network, epochs=2, steps_per_epoch=len(train_loader))
        average.attach(trainer)            # before ValidationHandler
        ...
        average.restore.attach(trainer)    # after it, before the epoch checkpoint

    Args:
        network: the trained network.
        epochs: the average's horizon in epochs; ``None`` or 0 attaches nothing (the raw weights are validated).
        steps_per_epoch: optimiser steps per epoch.
        start_epoch: the epoch (1-based) at whose start the average begins again from the weights.

    Raises:
        ValueError: a negative horizon or fewer than one step an epoch.
    """

    def __init__(
        self, network: nn.Module, epochs: float | str | None, steps_per_epoch: int, start_epoch: int = 1
    ) -> None:
        epochs = _horizon(epochs)
        if epochs is not None and epochs < 0:
            raise ValueError(f"weight_average is a horizon in epochs (>= 0, or null for none), got {epochs}")
        if steps_per_epoch < 1:
            raise ValueError(f"weight_average needs at least one step an epoch, got {steps_per_epoch}")
        self.network = network
        self.enabled = bool(epochs)
        self.decay = 1.0 - 1.0 / (float(epochs or 1) * steps_per_epoch)
        self.start_epoch = int(start_epoch)
        self.average: dict[str, torch.Tensor] = {}
        self._raw: dict[str, torch.Tensor] | None = None
        self.restore = _Restore(self)

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.swap_in)

    def _start(self, engine: Engine) -> None:
        if not self.average or engine.state.epoch == self.start_epoch:
            self.average = {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    @torch.no_grad()
    def update(self, engine: Engine | None = None) -> None:
        """Move the average one step towards the current weights."""
        for name, value in self.network.state_dict().items():
            avg = self.average[name]
            if avg.is_floating_point():
                avg.lerp_(value.detach(), 1.0 - self.decay)
            else:
                avg.copy_(value)

    @torch.no_grad()
    def swap_in(self, engine: Engine | None = None) -> None:
        """Put the average into the network, keeping the raw weights for :meth:`swap_out`."""
        if self._raw is not None:
            return
        self._raw = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.network.load_state_dict(self.average)

    @torch.no_grad()
    def swap_out(self, engine: Engine | None = None) -> None:
        """Put the raw weights back (the average keeps whatever precise batch norm computed for it)."""
        if self._raw is None:
            return
        for name, value in self.network.state_dict().items():
            self.average[name].copy_(value)
        self.network.load_state_dict(self._raw)
        self._raw = None

    def state_dict(self) -> dict[str, Any]:
        return {"average": {k: v.clone() for k, v in self.average.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = {k: v.clone() for k, v in state.get("average", {}).items()}


def _horizon(value: float | str | None) -> float | None:
    """The horizon as a number; from the command line ``--weight_average null`` (or none, false, off) arrives as a
    string and means no average."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text in ("", "null", "none", "false", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"weight_average is a horizon in epochs or null, got {value!r}") from None


class _Restore:
    """The second half of :class:`WeightAverage`: swaps the raw weights back at the epoch's end."""

    def __init__(self, owner: WeightAverage) -> None:
        self.owner = owner

    def attach(self, engine: Engine) -> None:
        if self.owner.enabled:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.owner.swap_out)
