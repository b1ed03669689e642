"""The settings saliency export and saliency evaluation share, as one object.

:func:`ppi_med.export.export_saliency` and :func:`ppi_med.evaluation.evaluate_saliency` both run a trained
network over records and explain classes of them; what they run and on what is a :class:`SaliencySpec`, and
each takes its own output options besides. The bundles build one per job::

    "export_job": {
        "_target_": "ppi_med.export.export_saliency",
        "spec": {"_target_": "ppi_med.saliency_spec.SaliencySpec", "network": "@network", ...},
        "out_dir": "@export_dir", ...
    }

Every setting is checked when the spec is built, before any case is read: the method names, the target
choices, the method options, and the checkpoint where one is required.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose
from torch import nn

from .cases import CasePipeline, SaliencyFn, check_methods, parse_targets, resolve_cases
from .weights import load_checkpoint

__all__ = ["SaliencySpec"]


@dataclass(frozen=True, eq=False)
class SaliencySpec:
    """What to explain: a network, its preprocessing, the records, the weights, the methods and the targets.

    Args:
        network: the classifier (logits ``(N, M)``).
        preprocessing: the bundle's evaluation transforms (a ``Compose`` of invertible MONAI transforms).
        data: a datalist JSON, a list of records (or image paths), one record, or one image path / DICOM folder.
        checkpoint: weights loaded into ``network`` by :meth:`pipeline` (``None``: use it as it is).
        require_checkpoint: refuse a spec without a checkpoint (the bundles set it: an untrained network's
            saliency is noise that looks like a result).
        methods: saliency methods: a name of :data:`ppi_med.saliency.METHODS`, a :data:`SaliencyFn`,
            ``"wbp,gradcam"``, or a list of these; stored as a tuple.
        targets: the class(es) explained: ``"predicted"``, ``"label"``, a class index, or a list of these
            (:func:`ppi_med.cases.parse_targets`); stored as a tuple. Evaluation takes exactly one.
        device: where the network runs (default: where its parameters are).
        method_kwargs: options of the methods, keyed by method name (``{"gradcam": {"layer": "backbone.layer4"}}``);
            with a single method its options may also be given directly (``{"layer": "backbone.layer4"}``).
        image_key: the records' image key.
        mask_key: the records' lesion/nodule mask key.
        label_key: the records' label key.
        progress: show a progress bar.

    Raises:
        ValueError: no or unknown methods, a method named twice, an unknown target, method options keyed by a
            name that is not one of the methods, or ``require_checkpoint`` without a checkpoint.
    """

    network: nn.Module
    preprocessing: Compose
    data: str | Path | Mapping | Sequence
    checkpoint: str | Path | None = None
    require_checkpoint: bool = False
    methods: str | SaliencyFn | Sequence[str | SaliencyFn] = "wbp"
    targets: str | int | Sequence[str | int] = "predicted"
    device: str | torch.device | None = None
    method_kwargs: Mapping[str, Any] | None = None
    image_key: str = "image"
    mask_key: str = "mask"
    label_key: str = "label"
    progress: bool = True
    method_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.require_checkpoint and not self.checkpoint:
            raise ValueError("no checkpoint given: pass --checkpoint PATH (e.g. runs/<run>/models/model_best.pt)")
        methods = tuple(_parse_methods(self.methods))
        names = tuple(m if isinstance(m, str) else getattr(m, "__name__", "custom") for m in methods)
        if len(set(names)) != len(names):
            raise ValueError(f"a saliency method is named twice: {list(names)}")
        # frozen: the normalised forms are set once, here
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "method_names", names)
        object.__setattr__(self, "targets", tuple(parse_targets(self.targets)))
        object.__setattr__(self, "method_kwargs", _kwargs_per_method(self.method_kwargs, names))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))

    @property
    def named_methods(self) -> dict[str, str | SaliencyFn]:
        """Method name -> the method (a name of :data:`ppi_med.saliency.METHODS` or a function), in order."""
        return dict(zip(self.method_names, self.methods))

    def single_target(self) -> str | int:
        """The one target choice, for a job that explains one class per case.

        Raises:
            ValueError: several targets.
        """
        if len(self.targets) != 1:
            raise ValueError(f"one target choice, please (got {list(self.targets)!r})")
        return self.targets[0]

    def records(self) -> list[dict[str, Any]]:
        """The spec's ``data`` as records (:func:`ppi_med.cases.resolve_cases`)."""
        return resolve_cases(self.data, self.image_key)

    def pipeline(self, interp: str = "linear") -> CasePipeline:
        """Load the checkpoint into the network (if one is given) and return its :class:`CasePipeline`.

        Args:
            interp: interpolation of the inverse resampling, see :func:`ppi_med.cases.to_original_grid`.

        Returns:
            The pipeline over the spec's network, preprocessing, device, image key and method options.
        """
        if self.checkpoint is not None:
            load_checkpoint(self.network, self.checkpoint)
        return CasePipeline(
            self.network,
            self.preprocessing,
            device=self.device,
            image_key=self.image_key,
            method_kwargs=self.method_kwargs,
            interp=interp,
        )


def _parse_methods(method: str | SaliencyFn | Sequence[str | SaliencyFn]) -> list[str | SaliencyFn]:
    """The methods: a name, ``"wbp,gradcam"``, a callable, or a list of these.

    Raises:
        ValueError: an unknown name, something that is neither a name nor a callable, or none at all.
    """
    if isinstance(method, str):
        items: list = [m.strip() for m in method.split(",") if m.strip()]
    elif callable(method):
        items = [method]
    else:
        items = list(method)
    if not items:
        raise ValueError("no saliency method given")
    for m in items:
        if not isinstance(m, str) and not callable(m):
            raise ValueError(f"method must be a name or a callable, got {type(m).__name__}")
    names = [m for m in items if isinstance(m, str)]
    if names:
        check_methods(names)
    return items


def _kwargs_per_method(kwargs: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Options per method name: ``kwargs`` keyed by method name, or (one method) that method's options.

    Raises:
        ValueError: several methods and a key that is not one of them, or options of a method that is not run.
    """
    kwargs = dict(kwargs or {})
    keyed = bool(kwargs) and all(isinstance(v, Mapping) for v in kwargs.values())
    if len(names) == 1 and not (keyed and set(kwargs) <= set(names)):
        return {names[0]: kwargs}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ValueError(f"method_kwargs must be keyed by the method names {list(names)}; unknown: {unknown}")
    return {n: dict(kwargs.get(n) or {}) for n in names}
