"""Saliency overlays for radiologist review, written as NIfTI on the grid of the original scan.

A saliency map is computed on the preprocessed tensor (reoriented, resampled, cropped, resized...), which is
not where the scan lives. :func:`to_original_grid` maps it back with MONAI's inverse transforms: the
preprocessed image is a ``MetaTensor`` that records every operation applied to it, and ``Invertd`` (with
``transform=preprocessing``, ``orig_keys=image``, the model-zoo inference pattern) undoes them on the map. The
result is then checked against the source image read directly: same shape, same affine, or an error.

Per case, :class:`SaliencyExporter` writes into ``OUT/<case>/``:

- ``<method>_<target>.nii.gz``: the overlay, with exactly the source's shape and affine (for a NIfTI source
  its qform/sform and codes are copied from the source header); values are the saliency divided by its
  maximum absolute value (so in [-1, 1]; the scale is in the index);
- ``image.nii.gz``: the source as NIfTI (a DICOM series read with MONAI's ``PydicomReader``; a NIfTI source
  copied with its header and on-disk type), so that the export folder holds everything a viewer or the review
  page (``python -m pipelines.review``) opens; ``copy_sources=False`` keeps a NIfTI source where it is;
- ``mask.nii.gz``: the record's lesion/nodule ``mask`` as 0/1 on the image's grid, when it has one;
- ``<method>_<target>_in_scan.nii.gz``: for a patch cut from a whole scan (the record has ``scan_image``),
  the overlay resampled into the scan's grid through the two affines, zeros elsewhere (the scan is also
  written once as ``OUT/scans/<name>.nii.gz``);
- ``<method>_<target>.dcm`` (source is a DICOM series) or ``<method>_<target>_in_scan.dcm`` (the record's
  ``scan_dicom`` names the DICOM series of ``scan_image``, as LIDC records do): the overlay as a DICOM
  Parametric Map over that series, for a PACS (:mod:`ppi_med.dicom_overlay`);
- ``<method>_<target>_montage.png``: slices through the saliency peak along every axis (see
  :mod:`ppi_med.montage`) with the lesion mask outline when the record has a ``mask``;

``OUT/index.csv`` lists every case, method and target with label, prediction, probabilities and paths, and
``OUT/export.json`` the methods, targets and checkpoint (by which the review finds the training run in
MLflow). Several methods go into one export with ``method="wbp,gradcam"`` (or a list). Nothing is ever
overwritten: every output path is checked before any work starts, and each write refuses an existing file.

Targets: ``"predicted"`` (the model's class), ``"label"`` (the record's label), a class index, or a list of
these (e.g. ``["predicted", 1]``) for several overlays per case.

Open a case (ITK-SNAP / 3D Slicer)::

    itksnap -g OUT/<case>/image.nii.gz -o OUT/<case>/wbp_pred.nii.gz
    Slicer --python-code "b = slicer.util.loadVolume('IMAGE'); f = slicer.util.loadVolume('OVERLAY'); \
slicer.util.setSliceViewerLayers(background=b, foreground=f, foregroundOpacity=0.5)"

The index's ``view_command`` column holds the ITK-SNAP line of each row.

Bundle run id ``export`` (in ``bundles/ga_ppi.json`` and ``bundles/lidc_ppi.json``)::

    python -m monai.bundle run export --config_file bundles/ga_ppi.json \
        --checkpoint runs/<run>/models/model_best.pt --export_dir exports/ga-wbp \
        [--export_method wbp] [--export_target predicted] [--export_datalist DATALIST.json | IMAGE | DICOM_DIR]

Its ids: ``checkpoint`` (default: the newest ``runs/ga-*/models/model_best.pt``, ``lidc-*`` for LIDC),
``export_dir`` (default: a new ``runs/export-<method>-<time>-<pid>``), ``export_method`` (``wbp``),
``export_target`` (``predicted``; ``label``, a class index, or ``"['predicted',1]"``; ``export_method`` takes
several methods as ``wbp,gradcam``), ``export_datalist``
(default ``@validate#datalist``; a datalist JSON's ``training`` list, records, or one image path / DICOM folder),
``export_interp`` (``linear``), ``export_montage`` (``true``), and ``export_job``, the call itself.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImage, LoadImaged
from monai.utils import TraceKeys
from torch import nn
from tqdm import tqdm

from .data import check_volume_shape
from .dicom_overlay import DicomSeriesError, read_source_series, write_parametric_map
from .image_grid import (
    SourceImage,
    ensure_new,
    is_nifti,
    read_source,
    resample_to_grid,
    same_grid,
    voxel_to_world,
    write_nifti,
)
from .montage import peak_index, save_montage
from .saliency import compute

__all__ = [
    "INDEX_COLUMNS",
    "SaliencyFn",
    "SaliencyExporter",
    "export_saliency",
    "load_checkpoint",
    "load_state",
    "read_checkpoint",
    "CheckpointMismatchError",
    "to_original_grid",
    "find_loader",
    "preprocess_case",
    "resolve_cases",
    "case_ids",
    "parse_targets",
    "resolve_target",
]

#: A saliency method given as a function ``(model, x, target) -> map shaped like x``.
SaliencyFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

INDEX_COLUMNS = (
    "case_id",
    "label",
    "predicted_class",
    "prob_predicted",
    "target",
    "target_class",
    "prob_target",
    "method",
    "source",
    "image",
    "overlay",
    "montage",
    "scan_image",
    "scan_overlay",
    "peak_ras_mm",
    "saliency_scale",
    "view_command",
    "mask",
    "dicom_overlay",
)

# torch.nn.functional.interpolate-based transforms (the rest resample with grid_sample or scipy)
_INTERPOLATE_CLASSES = {"Resize", "Resized", "Zoom", "Zoomd", "RandZoom", "RandZoomd"}
_INTERP_STRINGS = {"nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area"}
_LINEAR_BY_NDIM = {1: "linear", 2: "bilinear", 3: "trilinear"}


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


def preprocess_case(record: Mapping[str, Any], preprocessing: Compose, image_key: str = "image") -> MetaTensor:
    """Run the preprocessing on one record and return its image tensor ``(C, *spatial)`` with its trace.

    Raises:
        ValueError: the preprocessing failed on this case, or returned no ``MetaTensor`` (it must keep
            MONAI's metadata tracking on, or nothing can be inverted).
    """
    try:
        out = preprocessing(dict(record))
    except Exception as err:
        raise ValueError(f"preprocessing failed on {record.get(image_key)}: {err}") from err
    image = out[image_key] if isinstance(out, Mapping) else None
    if not isinstance(image, MetaTensor):
        raise ValueError(
            f"preprocessing of {record.get(image_key)} returned {type(image).__name__} for '{image_key}', not a "
            "MetaTensor: keep metadata tracking on (EnsureTyped(track_meta=True)) so it can be inverted"
        )
    return image


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


def _stem(path: str | Path) -> str:
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
            base = _stem(rec[image_key])
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


def _target_tag(t: str | int) -> str:
    return {"predicted": "pred", "label": "label"}.get(t, f"class{t}") if isinstance(t, str) else f"class{t}"


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


class SaliencyExporter:
    """Computes saliency per case, maps it to the original scan and writes overlays, montages and an index.

    Args:
        network: the classifier (logits ``(N, M)``).
        preprocessing: the bundle's ``preprocessing`` (a ``Compose`` of invertible MONAI transforms).
        method: a method name of :func:`ppi_med.saliency.compute` (``wbp``, ``gradient``,
            ``input_x_gradient``, ``gradcam``, ``lrp``), a :data:`SaliencyFn`, or several of these (a list or
            ``"wbp,gradcam"``): one overlay per method and target.
        targets: ``"predicted"``, ``"label"``, a class index, or a list of these.
        checkpoint: weights to load into ``network`` first (``None``: use it as it is).
        device: where to run (default: the network's device).
        interp: interpolation of the inverse resampling, see :func:`to_original_grid`.
        normalise: divide each overlay by its maximum absolute value.
        montage: write the PNG montages.
        signed_montage: diverging colours for the signed map; default: only for methods whose maps are
            signed (all but ``gradcam``).
        image_key, mask_key, scan_key, label_key: record keys.
        scan_dicom_key: the record key naming the DICOM series folder of ``scan_image``.
        method_kwargs: options for the method (e.g. ``layer`` for gradcam); with several methods, keyed by
            method name (``{"gradcam": {"layer": "backbone.layer4"}}``).
        copy_sources: copy a NIfTI source and scan into the export too (a DICOM one is always written).
        dicom: write DICOM Parametric Maps where the scan came from a DICOM series.
        progress: show a progress bar.

    Raises:
        ValueError: an unknown method or target choice, a method named twice, or ``method_kwargs`` not keyed
            by method name with several methods.
    """

    def __init__(
        self,
        network: nn.Module,
        preprocessing: Compose,
        *,
        method: str | SaliencyFn | Sequence[str | SaliencyFn] = "wbp",
        targets: str | int | Sequence[str | int] = "predicted",
        checkpoint: str | Path | None = None,
        device: str | torch.device | None = None,
        interp: str = "linear",
        normalise: bool = True,
        montage: bool = True,
        signed_montage: bool | None = None,
        image_key: str = "image",
        mask_key: str = "mask",
        scan_key: str = "scan_image",
        label_key: str = "label",
        scan_dicom_key: str = "scan_dicom",
        method_kwargs: Mapping[str, Any] | None = None,
        copy_sources: bool = True,
        dicom: bool = True,
        progress: bool = True,
    ) -> None:
        methods = _parse_methods(method)
        names = [m if isinstance(m, str) else getattr(m, "__name__", "custom") for m in methods]
        if len(set(names)) != len(names):
            raise ValueError(f"a saliency method is named twice: {names}")
        if interp not in ("linear", "nearest", "trace"):
            raise ValueError(f"interp must be 'linear', 'nearest' or 'trace', got '{interp}'")
        self.network = network
        if checkpoint is not None:
            load_checkpoint(network, checkpoint)
        self.preprocessing = preprocessing
        self.methods = list(zip(names, methods))
        self.method, self.method_name = methods[0], names[0]  # the first method (the only one, usually)
        self.targets = parse_targets(targets)
        self.device = torch.device(device) if device is not None else _device_of(network)
        self.interp = interp
        self.normalise = normalise
        self.montage = montage
        self.signed_montage = signed_montage
        self.image_key, self.mask_key, self.scan_key, self.label_key = image_key, mask_key, scan_key, label_key
        self.scan_dicom_key = scan_dicom_key
        self.method_kwargs = _kwargs_per_method(method_kwargs, names)
        self.copy_sources = copy_sources
        self.dicom = dicom
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.progress = progress
        self.loader = find_loader(preprocessing, image_key)
        self._scan_cache: tuple[str, SourceImage, Path] | None = None
        self._series_cache: dict[str, Any] = {}

    # -- planning --------------------------------------------------------------------------------------------
    def _case_paths(self, out_dir: Path, cid: str, record: Mapping[str, Any]) -> dict[str, Any]:
        case_dir = out_dir / cid
        paths: dict[str, Any] = {"dir": case_dir, "targets": {}}
        dicom_source = not is_nifti(record[self.image_key]) and _is_dicom(record[self.image_key])
        if self.copy_sources or not is_nifti(record[self.image_key]):
            paths["image"] = case_dir / "image.nii.gz"
        if record.get(self.mask_key):
            paths["mask"] = case_dir / "mask.nii.gz"
        for name, _ in self.methods:
            for t in self.targets:
                stem = f"{name}_{_target_tag(t)}"
                p = {"overlay": case_dir / f"{stem}.nii.gz"}
                if self.montage:
                    p["montage"] = case_dir / f"{stem}_montage.png"
                if record.get(self.scan_key):
                    p["scan_overlay"] = case_dir / f"{stem}_in_scan.nii.gz"
                if self.dicom and dicom_source:
                    p["dicom"] = case_dir / f"{stem}.dcm"
                elif self.dicom and record.get(self.scan_key) and record.get(self.scan_dicom_key):
                    p["scan_dicom"] = case_dir / f"{stem}_in_scan.dcm"
                paths["targets"][(name, t)] = p
        return paths

    def _scan_copy_path(self, out_dir: Path, scan: str | Path) -> Path | None:
        if is_nifti(scan) and not self.copy_sources:
            return None
        return out_dir / "scans" / f"{_stem(scan)}.nii.gz"

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, data: str | Path | Mapping | Sequence, out_dir: str | Path) -> Path:
        """Export every case of ``data`` into ``out_dir`` and write ``out_dir/index.csv``.

        Args:
            data: a datalist JSON, a list of records (or image paths), one record, or one image path.
            out_dir: the output folder (created; existing files in it are never replaced).

        Returns:
            The path of the index CSV.

        Raises:
            FileExistsError: an output file already exists (checked for every case before any work).
            FileNotFoundError, ValueError: a bad case, named.
        """
        out_dir = Path(out_dir)
        records = resolve_cases(data, self.image_key)
        ids = case_ids(records, self.image_key)
        plans = [self._case_paths(out_dir, cid, rec) for cid, rec in zip(ids, records)]
        index = ensure_new(out_dir / "index.csv")
        scan_copies = {
            str(rec[self.scan_key])
            for rec in records
            if rec.get(self.scan_key) and self._scan_copy_path(out_dir, rec[self.scan_key]) is not None
        }
        for plan in plans:
            for p in [plan.get("image"), plan.get("mask")] + [q for t in plan["targets"].values() for q in t.values()]:
                if p is not None:
                    ensure_new(p)
        for scan in scan_copies:
            ensure_new(self._scan_copy_path(out_dir, scan))
        meta = ensure_new(out_dir / "export.json")
        out_dir.mkdir(parents=True, exist_ok=True)
        self._write_meta(meta, len(records))

        was_training = self.network.training
        self.network.eval()
        # the index grows case by case, so an interrupted export still lists what it wrote
        with open(index, "x", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
            writer.writeheader()
            try:
                desc = f"export {','.join(n for n, _ in self.methods)}"
                bar = tqdm(list(zip(ids, records, plans)), desc=desc, disable=not self.progress)
                for cid, rec, plan in bar:
                    bar.set_postfix_str(cid)
                    writer.writerows(self.export_case(rec, cid, plan, out_dir))
                    fh.flush()
            finally:
                self.network.train(was_training)
                self._scan_cache = None
                self._series_cache.clear()
        return index

    def _write_meta(self, path: Path, n_cases: int) -> None:
        """``export.json``: what was exported from which checkpoint (the review finds the MLflow run by it)."""
        import json
        import time

        from .tracking import git_commit

        meta = {
            "methods": [n for n, _ in self.methods],
            "targets": [str(t) for t in self.targets],
            "checkpoint": self.checkpoint,
            "n_cases": n_cases,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(Path(__file__).resolve().parent),
        }
        with open(path, "x") as fh:
            json.dump(meta, fh, indent=1)

    def _saliency(self, x: torch.Tensor, target: int, method: str | SaliencyFn | None = None) -> torch.Tensor:
        t = torch.tensor([target], device=x.device)
        method = self.method if method is None else method
        if isinstance(method, str):
            return compute(method, self.network, x, t, **self.method_kwargs.get(method, {}))
        sal = method(self.network, x, t)
        if tuple(sal.shape) != tuple(x.shape):
            raise ValueError(f"saliency function returned shape {tuple(sal.shape)} for input {tuple(x.shape)}")
        return sal

    def _scan(self, scan_path: str | Path, out_dir: Path) -> tuple[SourceImage, Path]:
        key = str(scan_path)
        if self._scan_cache is None or self._scan_cache[0] != key:
            scan = read_source(scan_path)
            copy = self._scan_copy_path(out_dir, scan_path)
            if copy is not None and not copy.exists():
                _write_copy(copy, scan, "ppi-med: source scan")
            self._scan_cache = (key, scan, copy or Path(scan_path))
        return self._scan_cache[1], self._scan_cache[2]

    def _mask_on(self, record: Mapping[str, Any], src: SourceImage, case: str) -> np.ndarray | None:
        if not record.get(self.mask_key):
            return None
        m = read_source(record[self.mask_key], self.loader)
        if same_grid(m.shape, m.affine, src.shape, src.affine):
            return m.array
        warnings.warn(f"case {case}: mask is on another grid than the image; resampled (nearest)", stacklevel=2)
        return resample_to_grid(m.array, m.affine, src.shape, src.affine, order=0)

    def export_case(
        self, record: Mapping[str, Any], cid: str, plan: Mapping[str, Any], out_dir: Path
    ) -> list[dict[str, Any]]:
        """Export one case (all targets); returns its index rows. See :meth:`run` for the layout."""
        x_pre = preprocess_case(record, self.preprocessing, self.image_key)
        src = read_source(record[self.image_key], self.loader)
        x = x_pre.as_tensor().unsqueeze(0).to(self.device)
        with torch.no_grad():
            logits = self.network(x)
        probs = torch.softmax(logits.float(), dim=1)[0].cpu()
        pred = int(probs.argmax())
        num_classes = probs.numel()
        label = record.get(self.label_key)
        image_path = Path(record[self.image_key])
        if "image" in plan:
            _write_copy(plan["image"], src, "ppi-med: source image")
            image_path = plan["image"]
        mask = self._mask_on(record, src, cid)
        if mask is not None and "mask" in plan:
            write_nifti(plan["mask"], mask > 0.5, src.affine, like=src.header, dtype=np.uint8, description="mask")
        scan = self._scan(record[self.scan_key], out_dir) if record.get(self.scan_key) else None

        rows = []
        for (method_name, spec), paths in plan["targets"].items():
            method = dict(self.methods)[method_name]
            cls = resolve_target(spec, pred, record, num_classes, cid)
            sal = self._saliency(x, cls, method)[0].detach().cpu().float().sum(0, keepdim=True)
            orig = to_original_grid(sal, x_pre, self.preprocessing, interp=self.interp, image_key=self.image_key)
            arr = orig[0].as_tensor().numpy().astype(np.float32)
            if not same_grid(arr.shape, orig.affine.numpy(), src.shape, src.affine):
                raise ValueError(
                    f"case {cid}: the inverted map ({arr.shape}) does not land on the source grid {src.shape}; "
                    f"affines\n{orig.affine.numpy()}\n{src.affine}"
                )
            scale = float(np.abs(arr).max())
            if self.normalise and scale > 0:
                arr = arr / scale
            desc = f"ppi-med {method_name} saliency, class {cls}"
            write_nifti(paths["overlay"], arr, src.affine, like=src.header, description=desc)
            row = {
                "case_id": cid,
                "label": "" if label is None else int(label),
                "predicted_class": pred,
                "prob_predicted": f"{float(probs[pred]):.6f}",
                "target": spec,
                "target_class": cls,
                "prob_target": f"{float(probs[cls]):.6f}",
                "method": method_name,
                "source": str(record[self.image_key]),
                "image": str(image_path),
                "overlay": str(paths["overlay"]),
                "montage": "",
                "scan_image": "",
                "scan_overlay": "",
                "peak_ras_mm": ";".join(f"{v:.3f}" for v in voxel_to_world(src.affine, peak_index(arr))),
                "saliency_scale": f"{scale:.6g}",
                "view_command": f"itksnap -g {image_path} -o {paths['overlay']}",
                "mask": str(plan["mask"]) if mask is not None and "mask" in plan else "",
                "dicom_overlay": "",
            }
            if "dicom" in paths:  # the source itself is a DICOM series: the map goes over it, for a PACS
                _dicom_map(paths["dicom"], arr, src.affine, record[self.image_key], desc, cid, self._series_cache)
                row["dicom_overlay"] = str(paths["dicom"])
            if scan is not None:
                scan_img, scan_file = scan
                placed = resample_to_grid(arr, src.affine, scan_img.shape, scan_img.affine, order=1)
                write_nifti(paths["scan_overlay"], placed, scan_img.affine, like=scan_img.header, description=desc)
                row["scan_image"], row["scan_overlay"] = str(scan_file), str(paths["scan_overlay"])
                if "scan_dicom" in paths:  # a patch of a scan read from DICOM: the map over that series
                    series = record[self.scan_dicom_key]
                    _dicom_map(paths["scan_dicom"], placed, scan_img.affine, series, desc, cid, self._series_cache)
                    row["dicom_overlay"] = str(paths["scan_dicom"])
            if self.montage:
                lab = "?" if label is None else int(label)
                title = (
                    f"{cid}  |  {method_name} saliency of class {cls} ({spec})  |  "
                    f"predicted {pred} (p={float(probs[pred]):.2f}), label {lab}"
                )
                codes = nib.aff2axcodes(src.affine)  # which way each array axis points, e.g. ('I', 'P', 'R')
                save_montage(
                    paths["montage"],
                    src.array,
                    arr,
                    mask=mask,
                    spacing=src.spacing,
                    title=title,
                    signed=(method_name != "gradcam") if self.signed_montage is None else self.signed_montage,
                    axis_names=[f"axis {a} (to {c})" for a, c in enumerate(codes)],
                )
                row["montage"] = str(paths["montage"])
            rows.append(row)
        return rows


def _parse_methods(method: str | SaliencyFn | Sequence[str | SaliencyFn]) -> list[str | SaliencyFn]:
    """The methods to export: a name, ``"wbp,gradcam"``, a callable, or a list of these.

    Raises:
        ValueError: an unknown name, something that is neither a name nor a callable, or none at all.
    """
    from .saliency import METHODS

    if isinstance(method, str):
        items: list = [m.strip() for m in method.split(",") if m.strip()]
    elif callable(method):
        items = [method]
    else:
        items = list(method)
    if not items:
        raise ValueError("no saliency method given")
    for m in items:
        if isinstance(m, str) and m not in METHODS:
            raise ValueError(f"unknown saliency method '{m}'; choose one of {', '.join(METHODS)}")
        if not isinstance(m, str) and not callable(m):
            raise ValueError(f"method must be a name or a callable, got {type(m).__name__}")
    return items


def _kwargs_per_method(kwargs: Mapping[str, Any] | None, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Options per method: with one method, ``kwargs`` are its options; with several, a mapping from method
    name to options (``{"gradcam": {"layer": "backbone.layer4"}}``).

    Raises:
        ValueError: several methods and a key that is not one of them.
    """
    kwargs = dict(kwargs or {})
    if len(names) == 1:
        return {names[0]: kwargs}
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ValueError(f"with several methods, method_kwargs must be keyed by method name; unknown: {unknown}")
    return {n: dict(kwargs.get(n) or {}) for n in names}


def _is_dicom(path: str | Path) -> bool:
    """A DICOM series folder or a ``.dcm`` file (what MONAI's loader reads as DICOM)."""
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith(".dcm")


def _write_copy(path: Path, src: SourceImage, description: str) -> Path:
    """The source as NIfTI in the export (so the export folder holds all a viewer opens): a NIfTI source keeps
    its header and, where its values fit, its on-disk type; anything else is written as float32."""
    dtype: np.dtype = np.dtype(np.float32)
    if src.header is not None:
        disk = np.dtype(src.header.get_data_dtype())
        if np.issubdtype(disk, np.integer):
            info = np.iinfo(disk)
            a = src.array
            if np.array_equal(a, np.round(a)) and a.min() >= info.min and a.max() <= info.max:
                dtype = disk
        elif np.issubdtype(disk, np.floating):
            dtype = disk
    return write_nifti(path, src.array, src.affine, like=src.header, dtype=dtype, description=description)


def _dicom_map(
    path: Path, overlay: np.ndarray, affine: np.ndarray, series: str | Path, desc: str, cid: str, cache: dict
) -> None:
    """:func:`ppi_med.dicom_overlay.write_parametric_map` with the case named when the series is unusable; the
    series' headers are read once per export (``cache``: folder -> series), not once per nodule and method."""
    try:
        key = str(series)
        if key not in cache:
            cache.clear()  # records come grouped by scan: one series at a time is enough
            cache[key] = read_source_series(series)
        write_parametric_map(path, overlay, affine, cache[key], description=desc)
    except DicomSeriesError as err:
        raise ValueError(f"case {cid}: no DICOM overlay over {series}: {err}") from err


def _device_of(network: nn.Module) -> torch.device:
    p = next(iter(network.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def export_saliency(
    network: nn.Module,
    preprocessing: Compose,
    data: str | Path | Mapping | Sequence,
    out_dir: str | Path,
    *,
    checkpoint: str | Path | None = None,
    require_checkpoint: bool = False,
    method: str | SaliencyFn = "wbp",
    targets: str | int | Sequence[str | int] = "predicted",
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> Path:
    """Export saliency overlays of ``data`` into ``out_dir``; the bundle's ``export`` run calls this.

    Args:
        network: the classifier.
        preprocessing: the bundle's ``preprocessing``.
        data: a datalist JSON, records, image paths, or one image path.
        out_dir: the output folder.
        checkpoint: weights for ``network``.
        require_checkpoint: refuse to run without a checkpoint (the bundle sets it: an untrained network's
            saliency is noise that looks like a result).
        method: see :class:`SaliencyExporter`.
        targets: see :class:`SaliencyExporter`.
        device: see :class:`SaliencyExporter`.
        **kwargs: more :class:`SaliencyExporter` options.

    Returns:
        The index CSV's path.

    Raises:
        ValueError: ``require_checkpoint`` without a checkpoint, and see :meth:`SaliencyExporter.run`.
    """
    if require_checkpoint and not checkpoint:
        raise ValueError("no checkpoint given: pass --checkpoint PATH (e.g. runs/<run>/models/model_best.pt)")
    exporter = SaliencyExporter(
        network, preprocessing, method=method, targets=targets, checkpoint=checkpoint, device=device, **kwargs
    )
    index = exporter.run(data, out_dir)
    names = ", ".join(n for n, _ in exporter.methods)
    print(f"saliency overlays ({names}) written to {Path(out_dir)}; index: {index}", flush=True)
    return index
