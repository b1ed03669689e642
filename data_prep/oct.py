"""Ingest real OCT volumes (NIfTI, NumPy, DICOM, Duke .mat, Heidelberg, Topcon, Zeiss) into NIfTI + a datalist.

Input, one of:

* a folder tree ``ROOT/<site>/<class>/<subject>.<ext>`` where ``<class>`` is ``GA`` (label 1) or
  ``normal`` (label 0), case-insensitive, and the subject id is the file name without its extension.
  A HEYEX XML export is a sub-folder ``<subject>/`` of the class folder holding exactly one ``.xml``
  file (and its images). Names starting with ``.`` (``.DS_Store``, ...) are ignored; anything else that
  does not fit the rule (a file directly under ROOT or a site folder, another class folder name, any
  other sub-folder inside a class folder, an unknown extension) is an error;
* a CSV file with the header ``path,label,site,subject`` (other columns are ignored); ``path`` is
  relative to the CSV's folder (or absolute), a HEYEX XML export folder or its ``.xml``; ``label`` is
  ``1``/``0`` or ``GA``/``normal``.

Formats (chosen by extension) and how each becomes a ``(V, H, W)`` = (B-scan, depth, lateral) array:

* ``.nii`` / ``.nii.gz``: already (V, H, W) as written by :mod:`data_prep.synth_oct`; its affine is kept.
* ``.npy``: a 3D array (V, H, W); spacing from ``spacing``.
* ``.dcm``: a multi-frame DICOM (Ophthalmic Tomography or any multi-frame grey image): frames are
  B-scans, rows are depth, columns are lateral. ``RescaleSlope``/``RescaleIntercept`` are applied when
  present (top level or the shared Pixel Value Transformation functional group). Spacing: PixelSpacing
  (row spacing = axial, column spacing = lateral) and SpacingBetweenSlices, else SliceThickness (between
  B-scans), read from the Shared, else the first Per-frame, Functional Groups' Pixel Measures, else the
  top level; missing values fall back to ``spacing``.
* ``.mat``: MATLAB file in the Duke layout, key ``images`` of shape (H, W, V) with the B-scans along
  the last axis; transposed to (V, H, W); spacing from ``spacing``. MATLAB v7.3 files are HDF5 and
  need h5py (it comes with the ``topcon-zeiss`` extra): without it the error says so.
* vendor files, read by :mod:`data_prep.oct_vendor` (optional extras ``heidelberg``: eyepy, and
  ``topcon-zeiss``: oct-converter; ``vendor-oct`` is both): Heidelberg ``.vol``, ``.e2e`` and HEYEX
  ``.xml``, Topcon ``.fda``/``.fds``, Zeiss ``.img``. The spacing comes from the file (``spacing`` is
  not used); B-scans whose recorded positions are not parallel and evenly spaced (within
  ``spacing_tolerance``) are refused, as are line, circle, radial and cross scans. The eye
  (``laterality``: ``OD``/``OS``, when the file says), ``scan_pattern`` and ``format`` go into the
  datalist record.

Trailing singleton axes beyond the third (e.g. a NIfTI of shape (V, H, W, 1)) are dropped. Every
volume is then checked, and the first problem stops the run with an :class:`OCTInputError` naming the
file: unreadable or corrupt, not 3D (with the shape found), an axis shorter than 2, non-numeric data,
NaN or infinite values (with counts), constant values, a shape different from the first volume's
(unless ``allow_varying_shape``: the bundle resizes), unknown extension, missing or invalid label,
duplicate (site, subject). All volumes are checked before anything is written.

Output (the same datalist format as :mod:`data_prep.synth_oct`, without masks and cues)::

    OUT/images/<site>/<subject>.nii.gz      float32 (V, H, W), intensities as stored (not rescaled)
    OUT/datalist.json                       {"name", "description", "labels", "sites", "generator",
                                             "numTraining", "training": [{"image", "label", "site",
                                             "subject", "source"[, "laterality", "scan_pattern",
                                             "format"]}, ...]}

``source`` is the absolute path of the original file. Site and subject are used in file names with
every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (two names that collide after that are an
error). If OUT already has a datalist, or any image this run would write exists, the run refuses
unless ``overwrite``; even then only those files are replaced and nothing else in OUT is deleted.

The affine follows :mod:`data_prep.oct_nifti` (axes to inferior, posterior, right).

CLI::

    python -m data_prep.oct --input /data/ga_tree --out data/ga_real --spacing 0.06,0.0039,0.006
    python -m data_prep.oct --input /data/ga.csv --out data/ga_real --allow-varying-shape
    python -m data_prep.oct --input /data/spectralis_tree --out data/ga_vol --spacing-tolerance 0.05
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from data_prep.oct_errors import OCTInputError
from data_prep.oct_nifti import oct_affine, save_oct_nifti
from data_prep.oct_vendor import SPACING_TOLERANCE, VENDOR_READERS, read_vendor_volume
from ppi_med.atomic import atomic_write_json

__all__ = [
    "DEFAULT_SPACING",
    "EXTENSIONS",
    "OCTInputError",
    "VolumeSource",
    "build_datalist",
    "collect_sources",
    "main",
    "read_volume",
    "read_volume_record",
]

#: Fallback voxel size (mm between B-scans, axial, lateral) when a file carries none.
DEFAULT_SPACING: tuple[float, float, float] = (0.06, 0.0039, 0.006)

#: Folder names of the two classes in the folder-tree input (matched case-insensitively).
CLASS_FOLDERS = {"ga": 1, "normal": 0}
_LABEL_WORDS = {"1": 1, "0": 0, "ga": 1, "normal": 0}
_CSV_COLUMNS = ("path", "label", "site", "subject")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class VolumeSource:
    """One input volume with its label, site and subject id."""

    path: Path
    label: int
    site: str
    subject: str


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    ext = _extension(path)
    return path.name[: -len(ext)] if ext else path.name


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _heyex_xml(folder: Path) -> Path:
    xmls = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml" and not _hidden(p))
    if len(xmls) != 1:
        found = f"{len(xmls)} .xml files" if xmls else "no .xml file"
        raise OCTInputError(
            folder,
            f"unexpected sub-folder ({found}); expected one volume file per subject, "
            "or a HEYEX XML export folder holding exactly one .xml file",
        )
    return xmls[0]


def _collect_tree(root: Path) -> list[VolumeSource]:
    sources = []
    for site_dir in sorted(p for p in root.iterdir() if not _hidden(p)):
        if not site_dir.is_dir():
            raise OCTInputError(site_dir, "unexpected file at the top level; expected one folder per site")
        for class_dir in sorted(p for p in site_dir.iterdir() if not _hidden(p)):
            if not class_dir.is_dir():
                raise OCTInputError(
                    class_dir, "missing label: files must sit inside a 'GA' or 'normal' folder of their site"
                )
            label = CLASS_FOLDERS.get(class_dir.name.lower())
            if label is None:
                raise OCTInputError(
                    class_dir, f"missing label: unknown class folder {class_dir.name!r} (expected 'GA' or 'normal')"
                )
            for path in sorted(p for p in class_dir.iterdir() if not _hidden(p)):
                if path.is_dir():
                    sources.append(VolumeSource(_heyex_xml(path), label, site_dir.name, path.name))
                else:
                    sources.append(VolumeSource(path, label, site_dir.name, _stem(path)))
    return sources


def _parse_label(value: str | None, where: Path, row: int) -> int:
    text = (value or "").strip()
    if not text:
        raise OCTInputError(where, f"row {row}: missing label")
    label = _LABEL_WORDS.get(text.lower())
    if label is None:
        raise OCTInputError(where, f"row {row}: invalid label {text!r} (expected 0/1 or GA/normal)")
    return label


def _collect_csv(csv_path: Path) -> list[VolumeSource]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in _CSV_COLUMNS if c not in header]
            if missing:
                raise OCTInputError(
                    csv_path, f"missing CSV column(s) {missing}; the header must include {list(_CSV_COLUMNS)}"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise OCTInputError(csv_path, f"unreadable CSV ({exc})") from exc
    sources = []
    for i, r in enumerate(rows, start=2):  # row 1 is the header
        for col in ("path", "site", "subject"):
            if not r.get(col):
                raise OCTInputError(csv_path, f"row {i}: missing {col}")
        label = _parse_label(r.get("label"), csv_path, i)
        path = Path(r["path"])
        path = path if path.is_absolute() else csv_path.parent / path
        if path.is_dir():
            path = _heyex_xml(path)
        if not path.is_file():
            raise OCTInputError(path, f"file not found (row {i} of {csv_path})")
        sources.append(VolumeSource(path, label, r["site"], r["subject"]))
    return sources


def collect_sources(input_path: str | Path) -> list[VolumeSource]:
    """List the input volumes of a folder tree or a CSV, with labels, sites and subjects.

    Args:
        input_path: Folder ``ROOT/<site>/{GA,normal}/<subject>.<ext>`` or CSV ``path,label,site,subject``.

    Returns:
        The volumes, in folder / row order.

    Raises:
        OCTInputError: for a missing input, a file outside the folder rule, a missing or invalid label,
            a missing file, an unknown extension, an empty input or a duplicate (site, subject).
    """
    root = Path(input_path)
    if root.is_dir():
        sources = _collect_tree(root)
    elif root.is_file() and root.suffix.lower() == ".csv":
        sources = _collect_csv(root)
    elif root.exists():
        raise OCTInputError(root, "input must be a folder tree or a .csv file")
    else:
        raise OCTInputError(root, "input not found")
    if not sources:
        raise OCTInputError(root, "no volumes found")
    seen: dict[tuple[str, str], Path] = {}
    for src in sources:
        if _extension(src.path) not in EXTENSIONS:
            raise OCTInputError(
                src.path, f"unknown extension {_extension(src.path)!r}; supported: {sorted(EXTENSIONS)}"
            )
        key = (src.site, src.subject)
        if key in seen:
            raise OCTInputError(src.path, f"duplicate subject {src.subject!r} at site {src.site!r} (also {seen[key]})")
        seen[key] = src.path
    return sources


def _read_nifti(path: Path, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


def _read_npy(path: Path, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path, allow_pickle=False), oct_affine(spacing)


def _vendor_reader(path: Path, tolerance: float) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    volume = read_vendor_volume(path, tolerance)
    info = {"scan_pattern": volume.scan_pattern, "format": volume.vendor_format}
    if volume.laterality is not None:
        info = {"laterality": volume.laterality, **info}
    return volume.data, oct_affine(volume.spacing), info


def _first_item(ds: object, keyword: str) -> object | None:
    seq = getattr(ds, keyword, None)
    return seq[0] if seq else None


def _dicom_value(places: Sequence[object], keyword: str) -> object | None:
    for place in places:
        if place is not None and getattr(place, keyword, None) not in (None, ""):
            return getattr(place, keyword)
    return None


def _positive(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) and number > 0 else None


def _read_dicom(path: Path, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    import pydicom

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise OCTInputError(path, "DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unsupported or broken pixel data
        raise OCTInputError(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames < 2:
        raise OCTInputError(
            path, f"single-frame DICOM with shape {arr.shape}; expected a multi-frame file whose frames are B-scans"
        )
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = _first_item(ds, "PerFrameFunctionalGroupsSequence")
    measures = [_first_item(g, "PixelMeasuresSequence") if g is not None else None for g in (shared, per_frame)]
    places = [*measures, ds]
    dv = _positive(_dicom_value(places, "SpacingBetweenSlices")) or _positive(_dicom_value(places, "SliceThickness"))
    pixel = _dicom_value(places, "PixelSpacing")
    dh = dw = None
    if pixel is not None and len(pixel) == 2:
        dh, dw = _positive(pixel[0]), _positive(pixel[1])
    affine = oct_affine((dv or spacing[0], dh or spacing[1], dw or spacing[2]))
    transforms = [_first_item(g, "PixelValueTransformationSequence") if g is not None else None for g in (shared,)]
    slope = _dicom_value([ds, *transforms], "RescaleSlope")
    intercept = _dicom_value([ds, *transforms], "RescaleIntercept")
    if slope is not None or intercept is not None:
        arr = arr.astype(np.float64) * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
    return arr, affine


def _read_mat(path: Path, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        contents = scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # scipy's signal for MATLAB v7.3 (HDF5) files
        return _read_mat_v73(path, spacing, exc)
    if "images" not in contents:
        keys = sorted(k for k in contents if not k.startswith("__"))
        raise OCTInputError(path, f"MATLAB file has no 'images' variable (Duke layout); variables found: {keys}")
    images = np.asarray(contents["images"])
    if images.ndim != 3:
        raise OCTInputError(
            path, f"wrong dimensionality: 'images' has shape {images.shape}, expected (H, W, V) with B-scans last"
        )
    return np.transpose(images, (2, 0, 1)), oct_affine(spacing)


def _read_mat_v73(path: Path, spacing: Sequence[float], cause: Exception) -> tuple[np.ndarray, np.ndarray]:
    if importlib.util.find_spec("h5py") is None:
        raise OCTInputError(
            path, "MATLAB v7.3 (HDF5) file; reading it needs h5py (pip install h5py), or re-save it with -v7"
        ) from cause
    import h5py

    with h5py.File(path, "r") as fh:
        if "images" not in fh:
            raise OCTInputError(path, f"MATLAB file has no 'images' variable; variables found: {sorted(fh)}")
        # HDF5 stores MATLAB's column-major (H, W, V) as (V, W, H).
        images = np.asarray(fh["images"])
    if images.ndim != 3:
        raise OCTInputError(path, f"wrong dimensionality: 'images' has shape {images.shape[::-1]} in MATLAB order")
    return np.transpose(images, (0, 2, 1)), oct_affine(spacing)


#: Supported extensions of the open formats and their readers; each returns the raw array (V, H, W) and an affine.
OPEN_FORMATS: dict[str, Callable[[Path, Sequence[float]], tuple[np.ndarray, np.ndarray]]] = {
    ".nii": _read_nifti,
    ".nii.gz": _read_nifti,
    ".npy": _read_npy,
    ".dcm": _read_dicom,
    ".mat": _read_mat,
}

#: Every supported extension: the open formats and the vendor formats of :mod:`data_prep.oct_vendor`.
EXTENSIONS: tuple[str, ...] = (*OPEN_FORMATS, *VENDOR_READERS)


def read_volume(path: str | Path, spacing: Sequence[float] = DEFAULT_SPACING) -> tuple[np.ndarray, np.ndarray]:
    """Read and check one OCT volume.

    Args:
        path: The file (extension chooses the reader, see the module docstring).
        spacing: Voxel size (dv, dh, dw) in mm for formats that carry none (and DICOM gaps).

    Returns:
        ``(array, affine)``: float32 (V, H, W) with finite, non-constant values, and its 4 x 4 affine.

    Raises:
        OCTInputError: naming the file and the problem (see the module docstring for the checks).
    """
    data, affine, _ = read_volume_record(path, spacing)
    return data, affine


def read_volume_record(
    path: str | Path, spacing: Sequence[float] = DEFAULT_SPACING, spacing_tolerance: float = SPACING_TOLERANCE
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Read and check one OCT volume, with what its file says about the eye and the scan.

    Args:
        path: The file (extension chooses the reader, see the module docstring).
        spacing: Voxel size (dv, dh, dw) in mm for formats that carry none (and DICOM gaps).
        spacing_tolerance: Relative tolerance of the B-scan spacing check of vendor files that record
            B-scan positions (see :func:`data_prep.oct_vendor.check_bscan_positions`).

    Returns:
        ``(array, affine, fields)``: as :func:`read_volume`, and the datalist fields the file gives
        (``laterality``, ``scan_pattern``, ``format`` for vendor files; empty for the open formats).

    Raises:
        OCTInputError: naming the file and the problem (see the module docstring for the checks).
    """
    path = Path(path)
    ext = _extension(path)
    if ext not in EXTENSIONS:
        raise OCTInputError(path, f"unknown extension {ext!r}; supported: {sorted(EXTENSIONS)}")
    try:
        if ext in OPEN_FORMATS:
            raw, affine = OPEN_FORMATS[ext](path, spacing)
            fields: dict[str, str] = {}
        else:
            raw, affine, fields = _vendor_reader(path, spacing_tolerance)
    except OCTInputError:
        raise
    except Exception as exc:  # any reader failure means the file is unreadable or corrupt
        raise OCTInputError(path, f"unreadable or corrupt file ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(raw)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise OCTInputError(
            path, f"wrong dimensionality: expected a 3D volume (B-scans, depth, lateral), found shape {arr.shape}"
        )
    if min(arr.shape) < 2:
        raise OCTInputError(path, f"degenerate shape {arr.shape}: every axis needs at least 2 voxels")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise OCTInputError(path, f"unsupported data type {arr.dtype}; expected integer or real values")
    n_nan = int(np.isnan(arr).sum()) if np.issubdtype(arr.dtype, np.floating) else 0
    n_inf = int(np.isinf(arr).sum()) if np.issubdtype(arr.dtype, np.floating) else 0
    with np.errstate(over="ignore", invalid="ignore"):
        data = arr.astype(np.float32)
    n_overflow = int((~np.isfinite(data)).sum()) - n_nan - n_inf
    if n_nan or n_inf or n_overflow:
        overflow = f", {n_overflow} beyond the float32 range" if n_overflow else ""
        raise OCTInputError(
            path, f"non-finite values: {n_nan} NaN and {n_inf} infinite{overflow} (of {data.size} voxels)"
        )
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise OCTInputError(path, f"constant volume: every voxel equals {lo}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise OCTInputError(path, "invalid affine (singular or non-finite voxel-to-world matrix)")
    return data, affine, fields


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)


def build_datalist(
    input: str | Path,
    out_dir: str | Path,
    *,
    spacing: Sequence[float] = DEFAULT_SPACING,
    allow_varying_shape: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    spacing_tolerance: float = SPACING_TOLERANCE,
) -> Path:
    """Check every input volume, convert it to NIfTI (V, H, W) and write the datalist.

    Args:
        input: Folder tree or CSV (see the module docstring).
        out_dir: Output folder; ``images/`` and ``datalist.json`` go there.
        spacing: Voxel size (dv, dh, dw) in mm for .npy, .mat and DICOM files without spacing.
        allow_varying_shape: Accept volumes of different shapes (the bundle resizes).
        overwrite: Replace an existing datalist and same-named images in ``out_dir``.
        progress: Show tqdm progress bars.
        spacing_tolerance: Relative tolerance of the B-scan spacing check of vendor files.

    Returns:
        Path of ``out_dir/datalist.json``.

    Raises:
        OCTInputError: for any bad input file or entry, or an output that would overwrite existing
            files without ``overwrite``; nothing is written when an input is bad.
        ValueError: for an invalid ``spacing`` or ``spacing_tolerance``.
    """
    spacing = tuple(float(s) for s in spacing)
    oct_affine(spacing)  # validates the spacing before any file is read
    if not 0 < spacing_tolerance < 1:
        raise ValueError(f"spacing_tolerance must be a fraction between 0 and 1, got {spacing_tolerance!r}")
    input_path = Path(input).resolve()
    out = Path(out_dir).resolve()
    if input_path.is_dir() and (out == input_path or input_path in out.parents):
        raise OCTInputError(out, f"output folder is inside the input tree {input_path}; choose another folder")
    sources = collect_sources(input_path)

    names: dict[str, Path] = {}
    targets = []
    for src in sources:
        rel = f"images/{_safe(src.site)}/{_safe(src.subject)}.nii.gz"
        if rel in names:
            raise OCTInputError(
                src.path, f"site/subject names collide with {names[rel]} after making them file-safe ({rel})"
            )
        names[rel] = src.path
        targets.append(rel)

    datalist_path = out / "datalist.json"
    if not overwrite:
        if datalist_path.exists():
            raise OCTInputError(
                datalist_path, "a datalist already exists; pass overwrite=True (--overwrite) to replace it"
            )
        for rel in targets:
            if (out / rel).exists():
                raise OCTInputError(out / rel, "output image already exists; pass overwrite=True (--overwrite)")

    # Pass 1: read and check everything, so a bad file stops the run before anything is written.
    reference: tuple[tuple[int, ...], Path] | None = None
    for src in tqdm(sources, desc="checking OCT volumes", unit="vol", disable=not progress):
        data, _, _ = read_volume_record(src.path, spacing, spacing_tolerance)
        if reference is None:
            reference = (data.shape, src.path)
        elif data.shape != reference[0] and not allow_varying_shape:
            raise OCTInputError(
                src.path,
                f"shape {data.shape} differs from {reference[0]} of {reference[1]}; "
                "pass allow_varying_shape=True (--allow-varying-shape) if the pipeline resizes",
            )

    # Pass 2: convert.
    training = []
    for src, rel in tqdm(list(zip(sources, targets)), desc="writing NIfTI", unit="vol", disable=not progress):
        data, affine, fields = read_volume_record(src.path, spacing, spacing_tolerance)
        save_oct_nifti(data, affine, out / rel, np.float32)
        training.append(
            {
                "image": rel,
                "label": src.label,
                "site": src.site,
                "subject": src.subject,
                "source": str(src.path.resolve()),
                **fields,
            }
        )

    sites = sorted({src.site for src in sources})
    datalist = {
        "name": "oct-ga",
        "description": f"OCT volumes (V, H, W) = (B-scans, depth, lateral) ingested from {input_path} by data_prep.oct",
        "labels": {"0": "no GA", "1": "GA"},
        "sites": sites,
        "generator": {
            "tool": "data_prep.oct",
            "input": str(input_path),
            "spacing": list(spacing),
            "allow_varying_shape": bool(allow_varying_shape),
            "spacing_tolerance": float(spacing_tolerance),
        },
        "numTraining": len(training),
        "training": training,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(datalist_path, datalist)
    return datalist_path


def _spacing_arg(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
        if len(values) != 3:
            raise ValueError
        oct_affine(values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected three positive numbers DV,DH,DW in mm, got {text!r}") from exc
    return values  # type: ignore[return-value]


def _fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 when an input or output problem stopped the run (the reason is printed).
    """
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.oct",
        description=(
            "Check and convert OCT volumes (NIfTI, .npy, multi-frame DICOM, Duke .mat, Heidelberg .vol/.e2e/XML, "
            "Topcon .fda/.fds, Zeiss .img) to NIfTI (V, H, W) "
            "and write a MONAI datalist. INPUT is a folder SITE/{GA,normal}/<subject>.<ext> or a CSV with "
            "columns path,label,site,subject (paths relative to the CSV)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, type=Path, help="folder tree or CSV")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--spacing",
        type=_spacing_arg,
        default=DEFAULT_SPACING,
        metavar="DV,DH,DW",
        help="voxel size in mm (between B-scans, axial, lateral) for files that carry none",
    )
    parser.add_argument("--allow-varying-shape", action="store_true", help="accept volumes of different shapes")
    parser.add_argument(
        "--spacing-tolerance",
        type=_fraction_arg,
        default=SPACING_TOLERANCE,
        metavar="FRACTION",
        help="relative tolerance of the B-scan spacing check of VOL, E2E and XML files (irregular spacing is refused)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing datalist and same-named images")
    args = parser.parse_args(argv)
    try:
        path = build_datalist(
            args.input,
            args.out,
            spacing=args.spacing,
            allow_varying_shape=args.allow_varying_shape,
            overwrite=args.overwrite,
            spacing_tolerance=args.spacing_tolerance,
        )
    except OCTInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = json.loads(path.read_text(encoding="utf-8"))["numTraining"]
    print(f"datalist: {path} ({n} volumes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
