"""The cases of an export folder (``OUT/index.csv`` of :mod:`ppi_med.export`) as the review page shows them.

Each case also says how the page lays it out: an OCT volume (a NIfTI in the ``(V, H, W)`` convention of
:mod:`data_prep.oct_nifti`, whose affine points its axes inferior, posterior and right) opens B-scan first
(``layout`` ``"bscan"``), anything else in three orthogonal planes (``"planes"``). The export's
``export.json`` may name the ``modality`` outright (``"OCT"``, ``"CT"``, ...); without it an image in the OCT
convention is taken for OCT.

Every file a case needs is looked up inside the export folder: the index may hold paths relative to the
folder the export ran in (``exports/ga/A-005_img/wbp_pred.nii.gz``) or absolute ones, so a path is taken as it
is when it lies inside the export, else by its last two parts (``<case>/<file>``, ``scans/<file>``) and then its
name. A file that cannot be found inside the export is left out and named in the case's ``problems``; nothing
outside the export folder is ever read.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from data_prep.oct_nifti import OCT_AXCODES

__all__ = [
    "ReviewInputError",
    "LAYOUTS",
    "Overlay",
    "Case",
    "REQUIRED_COLUMNS",
    "load_cases",
    "locate",
    "overlay_keys",
    "relative_url",
]

#: How the page shows a case: B-scan first with an en-face projection (OCT), or three orthogonal planes.
LAYOUTS = ("bscan", "planes")

#: Index columns the review needs (the export writes more).
REQUIRED_COLUMNS = ("case_id", "label", "predicted_class", "prob_predicted", "target", "method", "overlay")


class ReviewInputError(ValueError):
    """An export folder the review cannot use; the message names the file and the problem."""


@dataclass
class Overlay:
    """One saliency map of a case (a row of the index).

    Attributes:
        method: the saliency method (``wbp``, ``gradcam``, ...).
        target: the target as exported (``predicted``, ``label`` or a class index).
        target_class: the class explained.
        prob_target: the model's probability of that class.
        overlay: the map on the image's grid (relative to the export folder).
        scan_overlay: the map in the whole scan's grid, for a patch cut from a scan.
        montage: the PNG montage.
        peak_ras_mm: the saliency peak (RAS mm), where the viewer starts.
        peak_voxel: the peak's voxel in the image's array (for an OCT volume ``(B-scan, row, A-scan)``), or
            ``None`` without a peak or a readable image.
    """

    method: str
    target: str
    target_class: str
    prob_target: float | None
    overlay: str
    scan_overlay: str | None = None
    montage: str | None = None
    peak_ras_mm: list[float] | None = None
    peak_voxel: list[int] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.target)


@dataclass
class Case:
    """One case of the export with its overlays and the files the viewer opens.

    Attributes:
        case_id: the export's case id (its folder name).
        label: the record's label (``None`` when it had none).
        predicted_class: the model's class.
        prob_predicted: the model's probability of it.
        image: the scan the overlay lies on, relative to the export folder (``None`` when not inside it).
        scan_image: the whole scan of a patch (``None`` if none, or not inside the export).
        mask: the lesion or nodule mask on the image's grid (``None`` when the record had none).
        modality: ``"OCT"``, the export's ``modality``, or ``None`` when neither says.
        layout: ``"bscan"`` for an OCT volume in the ``(V, H, W)`` convention, else ``"planes"``.
        overlays: the case's maps, in index order.
        problems: files of the index that are missing from the export folder.
    """

    case_id: str
    label: int | None
    predicted_class: int
    prob_predicted: float | None
    image: str | None
    scan_image: str | None = None
    mask: str | None = None
    modality: str | None = None
    layout: str = "planes"
    overlays: list[Overlay] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        """``TP``, ``FP``, ``TN``, ``FN`` for a 0/1 task, ``correct``/``wrong`` otherwise, ``unlabelled``."""
        if self.label is None:
            return "unlabelled"
        if {self.label, self.predicted_class} <= {0, 1}:
            return {(1, 1): "TP", (0, 1): "FP", (0, 0): "TN", (1, 0): "FN"}[(self.label, self.predicted_class)]
        return "correct" if self.label == self.predicted_class else "wrong"

    def to_json(self) -> dict[str, Any]:
        """The case as the page's JSON: file paths become ``/files/...`` URLs."""
        return {
            "case_id": self.case_id,
            "label": self.label,
            "predicted_class": self.predicted_class,
            "prob_predicted": self.prob_predicted,
            "outcome": self.outcome,
            "image": relative_url(self.image),
            "scan_image": relative_url(self.scan_image),
            "mask": relative_url(self.mask),
            "modality": self.modality,
            "layout": self.layout,
            "problems": self.problems,
            "overlays": [
                {
                    "method": o.method,
                    "target": o.target,
                    "target_class": o.target_class,
                    "prob_target": o.prob_target,
                    "overlay": relative_url(o.overlay),
                    "scan_overlay": relative_url(o.scan_overlay),
                    "montage": relative_url(o.montage),
                    "peak_ras_mm": o.peak_ras_mm,
                    "peak_voxel": o.peak_voxel,
                }
                for o in self.overlays
            ],
        }


def relative_url(rel: str | None) -> str | None:
    """The page's URL of a file given relative to the export folder."""
    return None if rel is None else "/files/" + "/".join(_quote(p) for p in Path(rel).parts)


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


def locate(root: Path, value: str) -> str | None:
    """A file named in the index, as a path relative to the export folder, or ``None`` if not inside it.

    Args:
        root: the export folder (resolved).
        value: the path as the index holds it.

    Returns:
        The relative POSIX path of an existing regular file inside ``root``, or ``None``.
    """
    if not value:
        return None
    p = Path(value)
    candidates = [p] if p.is_absolute() else []
    candidates += [root / Path(*p.parts[-2:]), root / p.name]
    for c in candidates:
        try:
            real = c.resolve()
        except OSError:
            continue
        if real.is_file() and real.is_relative_to(root):
            return real.relative_to(root).as_posix()
    return None


def _number(value: str, what: str, where: str) -> float | None:
    if value in ("", None):
        return None
    try:
        x = float(value)
    except ValueError as err:
        raise ReviewInputError(f"{where}: {what} {value!r} is not a number") from err
    if not math.isfinite(x):
        raise ReviewInputError(f"{where}: {what} {value!r} is not finite")
    return x


def _int(value: str, what: str, where: str, optional: bool = False) -> int | None:
    x = _number(value, what, where)
    if x is None:
        if optional:
            return None
        raise ReviewInputError(f"{where}: {what} is empty")
    if x != int(x):
        raise ReviewInputError(f"{where}: {what} {value!r} is not a class index")
    return int(x)


def _peak(value: str, where: str) -> list[float] | None:
    if not value:
        return None
    parts = value.split(";")
    if len(parts) != 3:
        raise ReviewInputError(f"{where}: peak_ras_mm {value!r} is not 'x;y;z'")
    return [_number(p, "peak_ras_mm", where) for p in parts]


def _export_modality(root: Path) -> str | None:
    """The ``modality`` of ``export.json``, if the export wrote one.

    Raises:
        ReviewInputError: ``export.json`` is not JSON, or its ``modality`` is not a non-empty string.
    """
    meta = root / "export.json"
    if not meta.is_file():
        return None
    try:
        value = json.loads(meta.read_text()).get("modality")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ReviewInputError(f"{meta}: not a JSON object ({err})") from err
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ReviewInputError(f"{meta}: modality {value!r} is not a name such as 'OCT' or 'CT'")
    return value.strip().upper()


def _image_grid(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """The affine and shape of a NIfTI image (its header only)."""
    img = nib.load(path)
    return np.asarray(img.affine, dtype=np.float64), tuple(int(n) for n in img.shape)


def _lay_out(root: Path, case: Case, modality: str | None) -> np.ndarray | None:
    """Set the case's ``modality`` and ``layout`` from its image; return the image's affine (``None`` if unread)."""
    case.modality = modality
    if case.image is None:
        return None
    try:
        affine, shape = _image_grid(root / case.image)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as err:
        case.problems.append(f"the scan {case.image} cannot be read as NIfTI ({err})")
        return None
    in_convention = len(shape) == 3 and nib.aff2axcodes(affine) == OCT_AXCODES
    if modality is None and in_convention:
        case.modality = "OCT"
    if case.modality == "OCT":
        if in_convention:
            case.layout = "bscan"
        else:
            case.problems.append(
                f"the scan {case.image} is not in the OCT (B-scan, depth, lateral) convention "
                f"(axes {''.join(nib.aff2axcodes(affine))}, shape {shape}, expected IPR); shown in three planes"
            )
    return affine


def _peak_voxel(affine: np.ndarray | None, peak: list[float] | None) -> list[int] | None:
    if affine is None or peak is None:
        return None
    ijk = np.linalg.solve(affine[:3, :3], np.asarray(peak, dtype=np.float64) - affine[:3, 3])
    return [int(v) for v in np.rint(ijk)]


def load_cases(export_dir: str | Path) -> tuple[Path, list[Case]]:
    """Read ``export_dir/index.csv`` into cases, one per ``case_id``, in the index's order.

    Args:
        export_dir: an export folder written by :mod:`ppi_med.export`.

    Returns:
        The resolved export folder and its cases.

    Raises:
        ReviewInputError: no folder or no index, an index without the needed columns, no rows, a row whose
            numbers do not parse, a case whose rows disagree about its label or prediction, or an
            ``export.json`` with a bad ``modality`` (each named).
    """
    root = Path(export_dir)
    if not root.is_dir():
        raise ReviewInputError(f"{root}: not a folder; give the export folder (the one holding index.csv)")
    root = root.resolve()
    index = root / "index.csv"
    if not index.is_file():
        raise ReviewInputError(
            f"{index}: not found; export overlays first (python -m monai.bundle run export --config_file "
            "bundles/ga_ppi.json --export_dir DIR) and give that DIR"
        )
    with open(index, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewInputError(f"{index}: not an export index, columns {missing} are missing")
        rows = list(reader)
    if not rows:
        raise ReviewInputError(f"{index}: has no rows; the export wrote no case")
    modality = _export_modality(root)
    cases: dict[str, Case] = {}
    affines: dict[str, np.ndarray | None] = {}
    for n, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{index}, line {n}"
        cid = row["case_id"]
        if not cid:
            raise ReviewInputError(f"{where}: empty case_id")
        label = _int(row["label"], "label", where, optional=True)
        pred = _int(row["predicted_class"], "predicted_class", where)
        case = cases.get(cid)
        if case is None:
            image_value = row.get("image", "")
            case = Case(
                case_id=cid,
                label=label,
                predicted_class=pred,
                prob_predicted=_number(row["prob_predicted"], "prob_predicted", where),
                image=locate(root, image_value),
            )
            if case.image is None:
                case.problems.append(f"the scan {image_value or '(none)'} is not inside the export folder")
            scan = row.get("scan_image", "")
            if scan:
                case.scan_image = locate(root, scan)
                if case.scan_image is None:
                    case.problems.append(f"the whole scan {scan} is not inside the export folder")
            if row.get("mask"):
                case.mask = locate(root, row["mask"])
                if case.mask is None:
                    case.problems.append(f"the mask {row['mask']} is not inside the export folder")
            affines[cid] = _lay_out(root, case, modality)
            cases[cid] = case
        elif (case.label, case.predicted_class) != (label, pred):
            raise ReviewInputError(f"{where}: case {cid} has another label or prediction than on its first row")
        overlay = locate(root, row["overlay"])
        if overlay is None:
            case.problems.append(f"the overlay {row['overlay']} is not inside the export folder")
            continue
        ov = Overlay(
            method=row["method"],
            target=row["target"],
            target_class=row.get("target_class", ""),
            prob_target=_number(row.get("prob_target", ""), "prob_target", where),
            overlay=overlay,
            scan_overlay=locate(root, row.get("scan_overlay", "")),
            montage=locate(root, row.get("montage", "")),
            peak_ras_mm=_peak(row.get("peak_ras_mm", ""), where),
        )
        ov.peak_voxel = _peak_voxel(affines[cid], ov.peak_ras_mm)
        if ov.key in {o.key for o in case.overlays}:
            raise ReviewInputError(f"{where}: case {cid} lists method {ov.method}, target {ov.target} twice")
        case.overlays.append(ov)
    return root, list(cases.values())


def overlay_keys(cases: list[Case]) -> Mapping[str, set[tuple[str, str]]]:
    """Per case id, the (method, target) pairs it can be graded on."""
    return {c.case_id: {o.key for o in c.overlays} for c in cases}
