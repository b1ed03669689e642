"""Reading a network's weights back: weights-only, any of the bundles' checkpoint layouts, mismatches named."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["CheckpointMismatchError", "load_checkpoint", "load_state", "read_checkpoint"]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose parameter names or shapes do not fit the network (another architecture or size)."""


def read_checkpoint(checkpoint: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The state dict stored in a checkpoint file, read with ``weights_only=True`` (no code is unpickled).

    Accepts a plain ``state_dict`` (the bundle's ``model_best.pt``) or a dict holding it under ``model`` (the
    bundle's ``model_final.pt``, with the optimizer beside it); a ``module.`` prefix (DDP) is stripped.

    Args:
        checkpoint: the file.
        map_location: where the tensors are loaded.

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: the file is not a torch checkpoint of tensors, or holds no state dict.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError by the kind of damage
        raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({err})") from err
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (or a dict with one under 'model')")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _listed(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def load_state(network: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> nn.Module:
    """Load ``state`` into ``network`` (in place) after checking that every name and shape fits.

    Args:
        network: the model.
        state: a state dict (e.g. from :func:`read_checkpoint`).
        source: the checkpoint it came from, for the message.

    Raises:
        CheckpointMismatchError: keys missing from the checkpoint, keys the network lacks, or shapes that
            differ, each listed (the first few) with the checkpoint and the network named.
    """
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listed(missing)}")
        if unexpected:
            parts.append(f"not in the network: {_listed(unexpected)}")
        if shapes:
            parts.append(f"shape in checkpoint vs network: {_listed(shapes)}")
        raise CheckpointMismatchError(
            f"{source}: checkpoint does not fit {type(network).__name__} (trained with another network or "
            f"settings?); " + "; ".join(parts)
        )
    network.load_state_dict(state)
    return network


def load_checkpoint(network: nn.Module, checkpoint: str | Path) -> nn.Module:
    """Load a checkpoint's weights into ``network`` (in place) and return it.

    See :func:`read_checkpoint` for the accepted layouts.

    Raises:
        FileNotFoundError: no file at ``checkpoint``.
        ValueError: the file holds no state dict.
        CheckpointMismatchError: it does not fit ``network`` (a ``ValueError``).
    """
    return load_state(network, read_checkpoint(checkpoint), checkpoint)
