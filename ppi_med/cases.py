"""One object per case, read once and carried through prediction, saliency and inversion to the source grid.

Export (:mod:`ppi_med.export`), saliency evaluation (:mod:`ppi_med.evaluation`), the held-out test
(:mod:`ppi_med.held_out`) and site CV all run a network over records the same way; this module is that way:

- records from a datalist, a list, or one path (:func:`resolve_cases`), each with a unique id (:func:`case_ids`);
- :class:`CasePipeline` turns each into a :class:`Case`: the preprocessed tensor with its transform trace, the
  model's probabilities and predicted class, read once; :meth:`CasePipeline.saliency` explains a class of it
  and :meth:`CasePipeline.on_source_grid` maps a map back onto the source image's grid with MONAI's inverse
  transforms, checked against that grid;
- :func:`class1_probabilities` scores many preprocessed cases in batches.

Example::

    pipeline = CasePipeline(network, preprocessing)
    for case in pipeline.cases(resolve_cases("datalist.json")):
        cls = case.target("predicted")
        s = pipeline.saliency(case, "wbp", cls)
        on_scan = pipeline.on_source_grid(case, s, src_shape, src_affine)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImage, LoadImaged
from monai.utils import TraceKeys
from torch import nn
from tqdm import tqdm

from .data import check_volume_shape
from .image_grid import same_grid
from .saliency import METHODS, compute

__all__ = [
    "Case",
    "CasePipeline",
    "SaliencyFn",
    "case_ids",
    "check_methods",
    "class1_probabilities",
    "device_of",
    "file_stem",
    "find_loader",
    "parse_targets",
    "preprocess_case",
    "resolve_cases",
    "resolve_target",
    "to_original_grid",
]

#: A saliency method given as a function ``(model, x, target) -> map shaped like x``.
SaliencyFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def find_loader(preprocessing: Compose, image_key: str = "image") -> LoadImage:
    """The ``LoadImage`` inside the preprocessing's ``LoadImaged`` for ``image_key`` (same reader options).

    Raises:
        ValueError: the preprocessing has no ``LoadImaged`` for that key.
    """
    transforms = preprocessing.flatten().transforms if isinstance(preprocessing, Compose) else [preprocessing]
    for t in transforms:
        if isinstance(t, LoadImaged) and image_key in t.keys:
            return t._loader
    raise ValueError(f"the preprocessing has no LoadImaged for key '{image_key}'; cannot read the source image")


def preprocess_case(
    record: Mapping[str, Any], preprocessing: Compose, image_key: str = "image", *, invertible: bool = True
) -> MetaTensor:
    """Run the preprocessing on one record and return its image tensor ``(C, *spatial)`` with its trace.

    Args:
        record: the datalist record.
        preprocessing: the evaluation transforms.
        image_key: the record's image key.
        invertible: require a ``MetaTensor`` (a map on it is to be inverted); ``False`` for scoring only,
            where any tensor will do.

    Raises:
        ValueError: the preprocessing failed on this case, or (``invertible``) returned no ``MetaTensor`` (it
            must keep MONAI's metadata tracking on, or nothing can be inverted).
    """
    try:
        out = preprocessing(dict(record))
    except Exception as err:
        raise ValueError(f"preprocessing failed on {record.get(image_key)}: {err}") from err
    image = out[image_key] if isinstance(out, Mapping) else None
    if not invertible and isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, MetaTensor):
        raise ValueError(
            f"preprocessing of {record.get(image_key)} returned {type(image).__name__} for '{image_key}', not a "
            "MetaTensor: keep metadata tracking on (EnsureTyped(track_meta=True)) so it can be inverted"
        )
    return image


# torch.nn.functional.interpolate-based transforms (the rest resample with grid_sample or scipy)
_INTERPOLATE_CLASSES = {"Resize", "Resized", "Zoom", "Zoomd", "RandZoom", "RandZoomd"}
_INTERP_STRINGS = {"nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area"}
_LINEAR_BY_NDIM = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _with_interp(ops: Any, interp: str, ndim: int) -> Any:
    """A copy of an applied-operations trace with its interpolation modes changed for the inverse.

    ``trace`` keeps each transform's own modes (e.g. ``area`` for a down-sizing ``Resize``, which up-sizes
    blockily); ``linear`` uses (tri)linear interpolation in both the interpolate- and grid-sample-based
    transforms; ``nearest`` uses nearest neighbour. Padding modes are left alone.
    """
    if interp == "trace":
        return deepcopy(ops)
    if isinstance(ops, (list, tuple)):
        return [_with_interp(o, interp, ndim) for o in ops]
    if not isinstance(ops, Mapping):
        return ops
    op = dict(ops)
    extra = op.get(TraceKeys.EXTRA_INFO)
    if isinstance(extra, Mapping):
        extra = dict(extra)
        mode = extra.get("mode")
        is_interp = isinstance(mode, (int, np.integer)) or (isinstance(mode, str) and mode in _INTERP_STRINGS)
        if is_interp:
            if isinstance(mode, (int, np.integer)):  # a spline order (scipy backend)
                extra["mode"] = 1 if interp == "linear" else 0
            elif op.get(TraceKeys.CLASS_NAME) in _INTERPOLATE_CLASSES:
                extra["mode"] = _LINEAR_BY_NDIM[ndim] if interp == "linear" else "nearest"
                if "align_corners" in extra:
                    extra["align_corners"] = False if interp == "linear" else TraceKeys.NONE
            else:
                extra["mode"] = "bilinear" if interp == "linear" else "nearest"
        op[TraceKeys.EXTRA_INFO] = {k: _with_interp(v, interp, ndim) for k, v in extra.items()}
    return op


def to_original_grid(
    saliency: torch.Tensor,
    image: MetaTensor,
    preprocessing: Compose,
    *,
    interp: str = "linear",
    image_key: str = "image",
) -> MetaTensor:
    """Map a map on the preprocessed grid back onto the original image's grid with MONAI's inverse transforms.

    Uses ``Invertd(keys=<map>, transform=preprocessing, orig_keys=image_key)``, i.e. the trace of operations
    recorded on ``image`` by the preprocessing, undone in reverse order (intensity transforms are skipped,
    they have no inverse and need none).

    Args:
        saliency: the map, ``(C, *spatial)`` on the grid of ``image`` (C may differ from the image's).
        image: the preprocessed image (a ``MetaTensor`` carrying its applied operations).
        preprocessing: the ``Compose`` that produced ``image``.
        interp: interpolation of the inverse resampling: ``linear`` (default), ``nearest``, or ``trace``
            (whatever each transform used forward).
        image_key: the key the preprocessing works on.

    Returns:
        The map on the original grid, ``(C, *original_spatial)``, with the original affine.

    Raises:
        ValueError: shapes disagree, a bad ``interp``, or the preprocessing could not be fully inverted.
    """
    if interp not in ("linear", "nearest", "trace"):
        raise ValueError(f"interp must be 'linear', 'nearest' or 'trace', got '{interp}'")
    if not isinstance(image, MetaTensor):
        raise ValueError("the preprocessed image must be a MetaTensor carrying its applied operations")
    sal = torch.as_tensor(saliency).detach().cpu().float()
    if sal.ndim != image.ndim or tuple(sal.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(f"saliency {tuple(sal.shape)} is not on the preprocessed grid {tuple(image.shape)}")
    sal = sal.as_subclass(torch.Tensor) if type(sal) is not torch.Tensor else sal
    ref = MetaTensor(torch.zeros(1), meta=deepcopy(image.meta))
    ref.applied_operations = _with_interp(image.applied_operations, interp, image.ndim - 1)
    key = "__saliency__"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI warns about every non-invertible (intensity) step
        inverted = Invertd(keys=key, transform=preprocessing, orig_keys=image_key, nearest_interp=False)(
            {image_key: ref, key: MetaTensor(sal)}
        )[key]
    if not isinstance(inverted, MetaTensor):
        raise ValueError("inverting the preprocessing did not return a MetaTensor")
    if inverted.applied_operations:
        names = [op.get(TraceKeys.CLASS_NAME) for op in inverted.applied_operations]
        raise ValueError(f"the preprocessing could not be fully inverted; left: {names}")
    return inverted


def resolve_cases(
    data: str | Path | Mapping | Sequence, image_key: str = "image", datalist_key: str = "training"
) -> list[dict]:
    """Records to export from a datalist JSON, a list of records or image paths, one record, or one image path.

    Raises:
        FileNotFoundError: an image (or datalist) that does not exist, named with its record.
        ValueError: a record without ``image_key``, or no records at all.
    """
    if isinstance(data, (str, Path)):
        if str(data).lower().endswith(".json"):
            from .data import load_datalist

            records = load_datalist(data, key=datalist_key, required=(image_key,))
        else:
            records = [{image_key: str(data)}]
    elif isinstance(data, Mapping):
        records = [dict(data)]
    else:
        records = [dict(r) if isinstance(r, Mapping) else {image_key: str(r)} for r in data]
    if not records:
        raise ValueError("no cases to export: the datalist is empty")
    for i, rec in enumerate(records):
        if image_key not in rec:
            raise ValueError(f"case {i} has no '{image_key}' entry: {rec}")
        if not Path(rec[image_key]).exists():
            raise FileNotFoundError(f"case {i}: image not found: {rec[image_key]}")
        try:  # a 2D or 4D NIfTI would be resized into a volume silently (or become channels)
            check_volume_shape(rec[image_key])
        except ValueError as err:
            raise ValueError(f"case {i}: {err}") from err
    return records


def file_stem(path: str | Path) -> str:
    """A file's name without its image extension (``.nii.gz``, ``.nii``, ``.dcm``, ``.npy``, ``.mat``)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".dcm", ".npy", ".mat"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def case_ids(records: Sequence[Mapping[str, Any]], image_key: str = "image") -> list[str]:
    """A unique, file-name-safe id per record: its ``case_id``, else ``<patient_id>_nodule<k>``, else the image
    file's name (the folder's name for a DICOM series); repeats get ``-2``, ``-3`` ..."""
    ids, seen = [], {}
    for rec in records:
        if rec.get("case_id"):
            base = str(rec["case_id"])
        elif rec.get("patient_id") is not None and rec.get("nodule_index") is not None:
            base = f"{rec['patient_id']}_nodule{rec['nodule_index']}"
        else:
            base = file_stem(rec[image_key])
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "case"
        n = seen.get(base, 0) + 1
        seen[base] = n
        ids.append(base if n == 1 else f"{base}-{n}")
    return ids


def parse_targets(targets: str | int | Iterable[str | int]) -> list[str | int]:
    """Normalise the target choice to a list of ``"predicted"``, ``"label"`` and class indices.

    Raises:
        ValueError: an unknown choice, a negative class, or none at all.
    """
    items = [targets] if isinstance(targets, (str, int)) else list(targets)
    out: list[str | int] = []
    for t in items:
        if isinstance(t, str) and t.strip().lstrip("-").isdigit():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, (str, int)):
            raise ValueError(f"unknown target {t!r}: use 'predicted', 'label' or a class index")
        if isinstance(t, str) and t not in ("predicted", "label"):
            raise ValueError(f"unknown target '{t}': use 'predicted', 'label' or a class index")
        if isinstance(t, int) and t < 0:
            raise ValueError(f"target class must be >= 0, got {t}")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError("no target given")
    return out


def resolve_target(spec: str | int, predicted: int, record: Mapping[str, Any], num_classes: int, case: str) -> int:
    """The class index a target choice means for one case.

    Raises:
        ValueError: ``label`` for a record without one, or a class out of range.
    """
    if spec == "predicted":
        return predicted
    if spec == "label":
        if record.get("label") is None:
            raise ValueError(f"case {case}: target 'label' asked for, but the record has no label")
        cls = int(record["label"])
    else:
        cls = int(spec)
    if not 0 <= cls < num_classes:
        raise ValueError(f"case {case}: target class {cls} is out of range for a model with {num_classes} outputs")
    return cls


def device_of(network: nn.Module) -> torch.device:
    """The device of the network's parameters (CPU for a network without any)."""
    p = next(iter(network.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_methods(methods: Iterable[str]) -> list[str]:
    """The saliency method names, checked against :data:`ppi_med.saliency.METHODS` before any work.

    Raises:
        ValueError: none given, or names that are not methods (listed with the choices).
    """
    names = list(methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown saliency method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


@dataclass
class Case:
    """One record, preprocessed and scored once.

    Attributes:
        id: the case's unique, file-name-safe id (:func:`case_ids`).
        record: the datalist record.
        x_pre: the preprocessed image ``(C, *spatial)``, a ``MetaTensor`` carrying its transform trace.
        x: the network's input ``(1, C, *spatial)`` on its device.
        probs: the class probabilities ``(M,)`` on the CPU.
    """

    id: str
    record: Mapping[str, Any]
    x_pre: MetaTensor
    x: torch.Tensor
    probs: torch.Tensor

    @property
    def predicted(self) -> int:
        return int(self.probs.argmax())

    @property
    def num_classes(self) -> int:
        return int(self.probs.numel())

    def target(self, spec: str | int) -> int:
        """The class a target choice (``predicted``, ``label`` or an index) means for this case."""
        return resolve_target(spec, self.predicted, self.record, self.num_classes, self.id)


class CasePipeline:
    """A network and its preprocessing, run over cases one at a time (eval mode, restored afterwards).

    Args:
        network: the classifier (its weights already loaded).
        preprocessing: the bundle's evaluation transforms (metadata tracking on, so maps can be inverted).
        device: where the network runs (default: where its parameters are).
        image_key: the records' image key.
        method_kwargs: options per saliency method name (``{"gradcam": {"layer": ...}}``).
        interp: interpolation of the inverse resampling, see :func:`to_original_grid`.
    """

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Compose,
        *,
        device: str | torch.device | None = None,
        image_key: str = "image",
        method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        interp: str = "linear",
    ) -> None:
        self.network = network
        self.preprocessing = preprocessing
        self.device = torch.device(device) if device is not None else device_of(network)
        self.image_key = image_key
        self.method_kwargs = {k: dict(v) for k, v in (method_kwargs or {}).items()}
        self.interp = interp

    def case(self, record: Mapping[str, Any], cid: str) -> Case:
        """Preprocess and score one record."""
        x_pre = preprocess_case(record, self.preprocessing, self.image_key)
        x = x_pre.as_tensor().unsqueeze(0).to(self.device)
        with torch.no_grad():
            probs = torch.softmax(self.network(x).float(), dim=1)[0].cpu()
        return Case(cid, record, x_pre, x, probs)

    def cases(
        self, records: Sequence[Mapping[str, Any]], ids: Sequence[str] | None = None, *, desc: str = "", progress=False
    ) -> Iterator[Case]:
        """Every record as a :class:`Case`, in order, with the network in eval mode meanwhile."""
        ids = case_ids(records, self.image_key) if ids is None else list(ids)
        was_training = self.network.training
        self.network.eval()
        try:
            bar = tqdm(list(zip(ids, records)), desc=desc or "cases", disable=not progress)
            for cid, rec in bar:
                bar.set_postfix_str(cid)
                yield self.case(rec, cid)
        finally:
            self.network.train(was_training)

    def saliency(self, case: Case, method: str | SaliencyFn, target: int) -> torch.Tensor:
        """The map of ``target`` for the case by ``method`` (a name or a function), on the model's grid.

        Raises:
            ValueError: a function's map not shaped like the input.
        """
        t = torch.tensor([target], device=case.x.device)
        if isinstance(method, str):
            return compute(method, self.network, case.x, t, **self.method_kwargs.get(method, {}))
        sal = method(self.network, case.x, t)
        if tuple(sal.shape) != tuple(case.x.shape):
            raise ValueError(f"saliency function returned shape {tuple(sal.shape)} for input {tuple(case.x.shape)}")
        return sal

    def on_source_grid(
        self, case: Case, saliency: torch.Tensor, shape: Sequence[int], affine: np.ndarray
    ) -> np.ndarray:
        """A map of the case (``(1, C, ...)``, summed over channels) on the source image's grid, checked there.

        Raises:
            ValueError: the inverted map does not land on the grid ``shape``/``affine`` (both named).
        """
        s = saliency[0].detach().cpu().float().sum(0, keepdim=True)
        orig = to_original_grid(s, case.x_pre, self.preprocessing, interp=self.interp, image_key=self.image_key)
        arr = orig[0].as_tensor().numpy().astype(np.float32)
        if not same_grid(arr.shape, orig.affine.numpy(), tuple(shape), affine):
            raise ValueError(
                f"case {case.id}: the inverted map ({arr.shape}) does not land on the source grid {tuple(shape)}; "
                f"affines\n{orig.affine.numpy()}\n{affine}"
            )
        return arr


@torch.no_grad()
def class1_probabilities(
    network: nn.Module, tensors: Sequence[torch.Tensor], device: str | torch.device, batch_size: int = 8
) -> np.ndarray:
    """Probability of class 1 of every preprocessed image ``(C, *spatial)``, in order, in batches (eval mode)."""
    was_training = network.training
    network.eval()
    try:
        probs = []
        for i in range(0, len(tensors), batch_size):
            # plain tensors: MONAI's metadata tracking costs time and scoring needs none of it
            plain = [
                t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t) for t in tensors[i : i + batch_size]
            ]
            batch = torch.stack(plain).float().to(device)
            probs.append(torch.softmax(network(batch).float(), dim=1)[:, 1].cpu().numpy())
        return np.concatenate(probs) if probs else np.zeros(0)
    finally:
        network.train(was_training)
