"""Just Train Twice: train briefly, then train again with the first model's training errors upweighted."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from ..atomic import atomic_torch_save, atomic_write_text

__all__ = ["JTT", "JTTHandler", "training_errors"]


class JTT:
    """The second stage's per-record weights (Liu et al. 2021, "Just train twice: improving group robustness
    without training group information").

    A record of the error set weighs ``upweight`` (the paper's ``lambda_up``), every other record 1. The paper
    repeats error records ``lambda_up`` times in the data; a weighted mean over each batch has the same
    expectation, and keeps the epoch and the batches of the other methods.

    Args:
        upweight: ``lambda_up`` (>= 1).
    """

    def __init__(self, upweight: float = 6.0) -> None:
        if upweight < 1:
            raise ValueError(f"JTT upweight must be >= 1, got {upweight}")
        self.upweight = float(upweight)
        self.errors: frozenset[str] | None = None

    @property
    def active(self) -> bool:
        """Whether the error set is known (the second stage)."""
        return self.errors is not None

    def weights(self, cases: Sequence[Any], device: torch.device | None = None) -> torch.Tensor:
        """``(N,)`` weights of a batch's records (all 1 before the error set is known)."""
        errors = self.errors or frozenset()
        return torch.tensor([self.upweight if str(c) in errors else 1.0 for c in cases], device=device)


@torch.no_grad()
def training_errors(network: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device) -> list[str]:
    """The records the network gets wrong (``argmax`` of its logits differs from the label), in evaluation mode.

    Args:
        network: the classifier.
        loader: dict batches with ``image``, ``label`` and ``case``, without augmentation.
        device: where the network runs.
    """
    was_training = network.training
    network.eval()
    wrong: list[str] = []
    try:
        for batch in loader:
            x = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor).to(device)
            y = torch.as_tensor(batch["label"]).reshape(-1).to(device).long()
            miss = (network(x).argmax(dim=1) != y).cpu().tolist()
            wrong += [str(c) for c, m in zip(batch["case"], miss) if m]
    finally:
        network.train(was_training)
    return wrong


class JTTHandler:
    """Runs JTT inside one MONAI trainer.

    At the start it keeps the initial state of the network, optimiser and learning-rate schedule; at the end of
    epoch ``epochs`` (the paper's ``T``) it finds the training errors, writes them to ``error_set.csv`` in
    ``output_dir``, hands them to ``jtt`` and puts network, optimiser and schedule back to their initial state,
    so the remaining epochs train a fresh model with the errors upweighted. The schedule should span the second
    stage (the GA bundle's ``lr_cycle_epochs``): the first stage then runs its first ``T`` epochs.

    A run resumed after the restart reads the error set back from ``error_set.csv``; one resumed before it
    takes the initial state from ``jtt_initial.pt``.

    Args:
        jtt: the weights the trainer's loss reads.
        network, optimizer: the trainer's.
        loader: the training records without augmentation (``image``, ``label``, ``case``).
        epochs: ``T``.
        output_dir: where the error set and the initial state are written.
        lr_scheduler: the trainer's schedule (``None``: none).
        device: where the network runs.
        enabled: ``False``: attach nothing (a bundle keeps the handler in its list for every method).
    """

    def __init__(
        self,
        jtt: JTT,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Iterable[Mapping[str, Any]],
        epochs: int,
        output_dir: str | Path,
        lr_scheduler: Any | None = None,
        device: torch.device | str = "cpu",
        enabled: bool = True,
    ) -> None:
        self.enabled = bool(enabled)
        self.jtt = jtt
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.loader = loader
        self.epochs = int(epochs)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self._initial: dict[str, Any] | None = None

    @property
    def error_file(self) -> Path:
        return self.output_dir / "error_set.csv"

    @property
    def initial_file(self) -> Path:
        return self.output_dir / "jtt_initial.pt"

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        if self.epochs >= engine.state.max_epochs:
            raise ValueError(
                f"JTT's first stage ({self.epochs} epochs) leaves no epoch to retrain in {engine.state.max_epochs}"
            )
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.epochs), self._restart)

    def _state(self) -> dict[str, Any]:
        state = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return deepcopy(state)

    def _started(self, engine: Engine) -> None:
        if engine.state.epoch == 0:
            self._initial = self._state()
            atomic_torch_save(self._initial, self.initial_file)
        elif engine.state.epoch < self.epochs:
            self._initial = torch.load(self.initial_file, map_location=self.device, weights_only=False)
        elif self.jtt.errors is None:
            if not self.error_file.is_file():
                raise FileNotFoundError(f"JTT: resumed after its restart but {self.error_file} is missing")
            with self.error_file.open() as f:
                self.jtt.errors = frozenset(row["case"] for row in csv.DictReader(f))

    def _restart(self, engine: Engine) -> None:
        errors = training_errors(self.network, self.loader, self.device)
        lines = "case\n" + "".join(f"{c}\n" for c in errors)
        atomic_write_text(self.error_file, lines)
        self.jtt.errors = frozenset(errors)
        assert self._initial is not None
        self.network.load_state_dict(self._initial["network"])
        self.optimizer.load_state_dict(self._initial["optimizer"])
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(self._initial["lr_scheduler"])
        engine.state.metrics["jtt_errors"] = float(len(errors))
