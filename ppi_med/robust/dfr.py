"""Deep feature reweighting: the last layer retrained on a group-balanced held-out set, the backbone frozen."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from ..atomic import atomic_torch_save
from ..weights import load_checkpoint
from .groups import batch_groups

__all__ = ["DFRHandler", "balanced_draws", "fit_last_layer", "last_linear", "penultimate_features"]


def last_linear(network: nn.Module) -> nn.Linear:
    """The network's last :class:`torch.nn.Linear` (its classification head).

    Raises:
        ValueError: a network without one.
    """
    linears = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"DFR needs a linear last layer; {type(network).__name__} has no nn.Linear")
    return linears[-1]


@torch.no_grad()
def penultimate_features(
    network: nn.Module, loader: Iterable[Mapping[str, Any]], device: torch.device
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What the last layer sees for every record (evaluation mode), with the labels and groups.

    Args:
        network: the classifier.
        loader: dict batches with ``image``, ``label`` and ``site`` or ``group`` (:func:`batch_groups`).
        device: where the network runs.

    Returns:
        Features ``(N, F)``, labels ``(N,)`` and group names.
    """
    head = last_linear(network)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    was_training = network.training
    network.eval()
    labels: list[int] = []
    groups: list[str] = []
    try:
        for batch in loader:
            network(torch.as_tensor(batch["image"]).as_subclass(torch.Tensor).to(device))
            labels += [int(v) for v in torch.as_tensor(batch["label"]).reshape(-1).tolist()]
            groups += batch_groups(batch)
    finally:
        hook.remove()
        network.train(was_training)
    return torch.cat(seen).numpy(), np.asarray(labels), groups


def balanced_draws(groups: Sequence[str], draws: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``draws`` index sets, each with as many records of every group as the smallest group has."""
    names = np.asarray([str(g) for g in groups])
    members = [np.flatnonzero(names == g) for g in sorted(set(names.tolist()))]
    size = min(len(m) for m in members)
    return [np.sort(np.concatenate([rng.choice(m, size, replace=False) for m in members])) for _ in range(draws)]


def fit_last_layer(
    features: np.ndarray,
    labels: np.ndarray,
    groups: Sequence[str],
    num_classes: int,
    c: float = 1.0,
    draws: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DFR's head (Kirichenko, Izmailov and Wilson 2022, "Last layer re-training is sufficient for robustness
    to spurious correlations"): L2 logistic regressions on standardised features, each fitted on a
    group-balanced subset, their coefficients averaged.

    Args:
        features: ``(N, F)`` penultimate features.
        labels: ``(N,)`` class indices.
        groups: each record's group (balanced in every draw).
        num_classes: the head's outputs.
        c: inverse L2 strength.
        draws: balanced subsets.
        seed: draws' seed.

    Returns:
        The head's ``weight`` ``(num_classes, F)`` and ``bias`` ``(num_classes,)``, in the features' own scale.

    Raises:
        ValueError: a balanced subset that lacks a class (every class must have records in the set).
    """
    from sklearn.linear_model import LogisticRegression

    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    z = (features - mean) / std
    coef = np.zeros((num_classes, features.shape[1]))
    intercept = np.zeros(num_classes)
    for idx in balanced_draws(groups, draws, np.random.default_rng(seed)):
        present = np.unique(labels[idx])
        if len(present) != num_classes:
            raise ValueError(
                f"DFR: a balanced subset of {len(idx)} records holds classes {present.tolist()}, "
                f"the head has {num_classes}; the held-out set needs records of every class"
            )
        model = LogisticRegression(C=c, max_iter=2000).fit(z[idx], labels[idx])
        if num_classes == 2:  # one logit difference: split it between the two outputs
            w, b = model.coef_[0], model.intercept_[0]
            coef += np.stack([-w / 2, w / 2])
            intercept += np.array([-b / 2, b / 2])
        else:
            coef += model.coef_
            intercept += model.intercept_
    coef, intercept = coef / draws, intercept / draws
    # fold the standardisation into the layer: w . (x - m) / s + b = (w / s) . x + (b - w . m / s)
    weight = coef / std
    bias = intercept - weight @ mean
    return torch.as_tensor(weight, dtype=torch.float32), torch.as_tensor(bias, dtype=torch.float32)


class DFRHandler:
    """When training completes, retrain the chosen checkpoint's last layer with DFR and save the result.

    The network of ``checkpoint`` (the validation-chosen ``model_best.pt``) is loaded into the trainer's
    network, :func:`fit_last_layer` retrains its head on ``loader``'s records (groups balanced), and the whole
    state is written to ``output`` (``model_dfr.pt``); no other parameter changes. Attach it before the
    held-out test handler, which should score ``output``.

    Args:
        network: the trainer's network (its head is replaced in place).
        loader: the DFR records without augmentation (``image``, ``label``, ``site`` or ``group``): a held-out part
            of the training sites, never the test part.
        checkpoint: the checkpoint to retrain; ``None`` or missing: the network's current weights.
        output: where the retrained network goes (``None``: not written).
        c, draws, seed: :func:`fit_last_layer`'s.
        device: where the network runs.
        enabled: ``False``: attach nothing (a bundle keeps the handler in its list for every method).
    """

    def __init__(
        self,
        network: nn.Module,
        loader: Iterable[Mapping[str, Any]],
        checkpoint: str | Path | None,
        output: str | Path | None,
        c: float = 1.0,
        draws: int = 10,
        seed: int = 0,
        device: torch.device | str = "cpu",
        enabled: bool = True,
    ) -> None:
        self.enabled = bool(enabled)
        self.network, self.loader = network, loader
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.output = Path(output) if output else None
        self.c, self.draws, self.seed = float(c), int(draws), int(seed)
        self.device = torch.device(device)
        self.groups: list[str] = []

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> Path | None:
        if self.checkpoint is not None and self.checkpoint.is_file():
            load_checkpoint(self.network, self.checkpoint)
        head = last_linear(self.network)
        features, labels, groups = penultimate_features(self.network, self.loader, self.device)
        weight, bias = fit_last_layer(features, labels, groups, head.out_features, self.c, self.draws, self.seed)
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(bias.to(head.bias))
        self.groups = sorted(set(groups))
        if self.output is not None:
            atomic_torch_save({"model": self.network.state_dict()}, self.output)
        if engine is not None:
            engine.state.metrics["dfr_records"] = float(len(labels))
            engine.state.metrics["dfr_groups"] = float(len(self.groups))
        return self.output
