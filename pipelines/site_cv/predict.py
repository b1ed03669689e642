"""Scores of a trained cell: each test image through the bundle's preprocessing and network, per checkpoint.

Shared by the cells and by :mod:`pipelines.cue_effect`, which scores the same models on the watermark twins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TensorCache", "predict_probabilities"]


class TensorCache:
    """Preprocessed images by path, up to a memory budget (beyond it, images are preprocessed every time).

    Args:
        max_bytes: the budget (4 GiB by default).
    """

    def __init__(self, max_bytes: int = 4 * 2**30) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        """The tensor stored for ``key``, or ``None``."""
        return self._items.get(key)

    def put(self, key: str, tensor: Any) -> None:
        """Keep ``tensor`` if it fits in the budget."""
        size = tensor.element_size() * tensor.nelement()
        if key not in self._items and self.nbytes + size <= self.max_bytes:
            self._items[key] = tensor
            self.nbytes += size


def _same_weights(a: Mapping[str, Any], b: Mapping[str, Any], torch: Any) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def predict_probabilities(
    network: Any,
    preprocessing: Any,
    images: Sequence[str],
    device: Any,
    batch_size: int,
    checkpoints: Mapping[str, Path],
    torch: Any,
    cache: TensorCache | None = None,
) -> dict[str, np.ndarray]:
    """Softmax probability of class 1 of every image, with each checkpoint's weights loaded in turn.

    Args:
        network: the bundle's network (on ``device``).
        preprocessing: the bundle's evaluation transforms, applied to ``{"image": path}``.
        images: image paths.
        device: the network's device.
        batch_size: images per forward pass.
        checkpoints: name -> checkpoint file (a state dict, or ``{"model": state dict, ...}``); a checkpoint
            with the same weights as an earlier one (best = final epoch) reuses its scores.
        torch: the torch module (imported by the caller, which keeps this module light to import).
        cache: preprocessed tensors by image path, filled and read here; share it only between calls with
            the same (deterministic) preprocessing.

    Returns:
        name -> probabilities, in the order of ``images``.

    Raises:
        ppi_med.weights.CheckpointMismatchError: a checkpoint of another network (keys and shapes named).
    """
    from ppi_med.cases import class1_probabilities, preprocess_case
    from ppi_med.weights import load_state, read_checkpoint

    cache = TensorCache() if cache is None else cache
    tensors = []
    for image in images:
        x = cache.get(image)
        if x is None:
            x = preprocess_case({"image": image}, preprocessing, invertible=False)
            cache.put(image, x)
        tensors.append(x)
    out: dict[str, np.ndarray] = {}
    seen: list[tuple[dict[str, Any], np.ndarray]] = []
    for name, path in checkpoints.items():
        # weights only; {"model": ..., "optimizer": ...} as CheckpointSaver writes it is unwrapped
        state = read_checkpoint(path, map_location=device)
        earlier = next((scores for st, scores in seen if _same_weights(st, state, torch)), None)
        if earlier is not None:
            out[name] = earlier
            continue
        load_state(network, state, path)  # names the checkpoint and every mismatching key or shape
        out[name] = class1_probabilities(network, tensors, device, batch_size)
        seen.append((state, out[name]))
    return out
