"""Saliency overlays for radiologist review, written as NIfTI on the grid of the original scan.

A saliency map is computed on the preprocessed tensor (reoriented, resampled, cropped, resized...), which is
not where the scan lives. :func:`ppi_med.cases.to_original_grid` maps it back with MONAI's inverse transforms: the
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
MLflow). Nothing is ever overwritten: every output path is checked before any work starts, and each write
refuses an existing file.

What is exported is a :class:`ppi_med.saliency_spec.SaliencySpec` (shared with saliency evaluation): several
methods go into one export with ``methods="wbp,gradcam"`` (or a list); its ``targets`` are ``"predicted"``
(the model's class), ``"label"`` (the record's label), a class index, or a list of these (e.g.
``["predicted", 1]``) for several overlays per case::

    spec = SaliencySpec(network, preprocessing, "datalist.json", checkpoint="model_best.pt", methods="wbp,gradcam")
    export_saliency(spec, "exports/ga", montage=False)

Open a case (ITK-SNAP / 3D Slicer)::

    itksnap -g OUT/<case>/image.nii.gz -o OUT/<case>/wbp_pred.nii.gz
    Slicer --python-code "b = slicer.util.loadVolume('IMAGE'); f = slicer.util.loadVolume('OVERLAY'); \
slicer.util.setSliceViewerLayers(background=b, foreground=f, foregroundOpacity=0.5)"

The index's ``view_command`` column holds the ITK-SNAP line of each row.

Bundle run id ``export`` (``bundles/common/saliency.json``, merged over either bundle)::

    python -m monai.bundle run export --config_file "['bundles/ga_ppi.json','bundles/common/saliency.json']" \
        --checkpoint runs/<run>/models/model_best.pt --export_dir exports/ga-wbp \
        [--export_method wbp] [--export_target predicted] [--export_datalist DATALIST.json | IMAGE | DICOM_DIR]

Its ids: ``checkpoint`` (default: the newest ``runs/ga-*/models/model_best.pt``, ``lidc-*`` for LIDC),
``export_dir`` (default: a new ``runs/export-<method>-<time>-<pid>``), ``export_method`` (``wbp``),
``export_target`` (``predicted``; ``label``, a class index, or ``"['predicted',1]"``; ``export_method`` takes
several methods as ``wbp,gradcam``), ``export_datalist``
(default ``@validate#datalist``; a datalist JSON's ``training`` list, records, or one image path / DICOM folder),
``export_interp`` (``linear``), ``export_montage`` (``true``), and ``export_job``, the call itself
(its ``spec`` is the :class:`~ppi_med.saliency_spec.SaliencySpec`).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .atomic import atomic_write_json
from .cases import Case, case_ids, file_stem, find_loader
from .dicom_overlay import DicomSeriesError, read_source_series, write_parametric_map
from .image_grid import (
    SourceImage,
    ensure_new,
    is_nifti,
    read_source,
    resample_to_grid,
    voxel_to_world,
    write_nifti,
)
from .masks import read_case_mask
from .montage import peak_index, save_montage
from .saliency_spec import SaliencySpec

__all__ = ["INDEX_COLUMNS", "SaliencyExporter", "export_saliency"]

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


def _target_tag(t: str | int) -> str:
    return {"predicted": "pred", "label": "label"}.get(t, f"class{t}") if isinstance(t, str) else f"class{t}"


class SaliencyExporter:
    """Computes saliency per case, maps it to the original scan and writes overlays, montages and an index.

    Args:
        spec: the network, preprocessing, records, checkpoint, methods (one overlay per method and target),
            targets, device, method options and record keys (:class:`ppi_med.saliency_spec.SaliencySpec`);
            its checkpoint is loaded into its network here.
        interp: interpolation of the inverse resampling, see :func:`ppi_med.cases.to_original_grid`.
        normalise: divide each overlay by its maximum absolute value.
        montage: write the PNG montages.
        signed_montage: diverging colours for the signed map; default: only for methods whose maps are
            signed (all but ``gradcam``).
        scan_key: the record key of the whole scan a patch was cut from.
        scan_dicom_key: the record key naming the DICOM series folder of ``scan_image``.
        copy_sources: copy a NIfTI source and scan into the export too (a DICOM one is always written).
        dicom: write DICOM Parametric Maps where the scan came from a DICOM series.

    Raises:
        ValueError: an unknown ``interp``.
    """

    def __init__(
        self,
        spec: SaliencySpec,
        *,
        interp: str = "linear",
        normalise: bool = True,
        montage: bool = True,
        signed_montage: bool | None = None,
        scan_key: str = "scan_image",
        scan_dicom_key: str = "scan_dicom",
        copy_sources: bool = True,
        dicom: bool = True,
    ) -> None:
        if interp not in ("linear", "nearest", "trace"):
            raise ValueError(f"interp must be 'linear', 'nearest' or 'trace', got '{interp}'")
        self.spec = spec
        self.methods = list(spec.named_methods.items())
        self.targets = list(spec.targets)
        self.normalise = normalise
        self.montage = montage
        self.signed_montage = signed_montage
        self.image_key, self.mask_key, self.label_key = spec.image_key, spec.mask_key, spec.label_key
        self.scan_key, self.scan_dicom_key = scan_key, scan_dicom_key
        self.pipeline = spec.pipeline(interp)
        self.copy_sources = copy_sources
        self.dicom = dicom
        self.checkpoint = spec.checkpoint
        self.progress = spec.progress
        self.loader = find_loader(spec.preprocessing, spec.image_key)
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
        return out_dir / "scans" / f"{file_stem(scan)}.nii.gz"

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, out_dir: str | Path) -> Path:
        """Export every case of the spec's ``data`` into ``out_dir`` and write ``out_dir/index.csv``.

        Args:
            out_dir: the output folder (created; existing files in it are never replaced).

        Returns:
            The path of the index CSV.

        Raises:
            FileExistsError: an output file already exists (checked for every case before any work).
            FileNotFoundError, ValueError: a bad case, named.
        """
        out_dir = Path(out_dir)
        records = self.spec.records()
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

        # the index grows case by case, so an interrupted export still lists what it wrote
        with open(index, "x", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=INDEX_COLUMNS)
            writer.writeheader()
            desc = f"export {','.join(n for n, _ in self.methods)}"
            try:
                for case, plan in zip(self.pipeline.cases(records, ids, desc=desc, progress=self.progress), plans):
                    writer.writerows(self.export_case(case, plan, out_dir))
                    fh.flush()
            finally:
                self._scan_cache = None
                self._series_cache.clear()
        return index

    def _write_meta(self, path: Path, n_cases: int) -> None:
        """``export.json``: what was exported from which checkpoint (the review finds the MLflow run by it)."""
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
        atomic_write_json(path, meta, indent=1, overwrite=False)

    def _scan(self, scan_path: str | Path, out_dir: Path) -> tuple[SourceImage, Path]:
        key = str(scan_path)
        if self._scan_cache is None or self._scan_cache[0] != key:
            scan = read_source(scan_path)
            copy = self._scan_copy_path(out_dir, scan_path)
            if copy is not None and not copy.exists():
                _write_copy(copy, scan, "ppi-med: source scan")
            self._scan_cache = (key, scan, copy or Path(scan_path))
        return self._scan_cache[1], self._scan_cache[2]

    def export_case(self, case: Case, plan: Mapping[str, Any], out_dir: Path) -> list[dict[str, Any]]:
        """Export one case (all methods and targets); returns its index rows. See :meth:`run` for the layout."""
        record, cid, probs, pred = case.record, case.id, case.probs, case.predicted
        src = read_source(record[self.image_key], self.loader)
        label = record.get(self.label_key)
        image_path = Path(record[self.image_key])
        if "image" in plan:
            _write_copy(plan["image"], src, "ppi-med: source image")
            image_path = plan["image"]
        mask = read_case_mask(
            record, image_key=self.image_key, mask_key=self.mask_key, image=src, loader=self.loader, case=cid
        )
        if mask is not None and "mask" in plan:
            write_nifti(plan["mask"], mask, src.affine, like=src.header, dtype=np.uint8, description="mask")
        scan = self._scan(record[self.scan_key], out_dir) if record.get(self.scan_key) else None

        rows = []
        for (method_name, spec), paths in plan["targets"].items():
            cls = case.target(spec)
            sal = self.pipeline.saliency(case, dict(self.methods)[method_name], cls)
            arr = self.pipeline.on_source_grid(case, sal, src.shape, src.affine)
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


def export_saliency(spec: SaliencySpec, out_dir: str | Path, **options: Any) -> Path:
    """Export saliency overlays of the spec's records into ``out_dir``; the bundle's ``export`` run calls this.

    Args:
        spec: what to explain and how (:class:`ppi_med.saliency_spec.SaliencySpec`).
        out_dir: the output folder.
        **options: the output options of :class:`SaliencyExporter` (``interp``, ``montage``, ...).

    Returns:
        The index CSV's path.

    Raises:
        ValueError: a bad option, and see :meth:`SaliencyExporter.run`.
    """
    exporter = SaliencyExporter(spec, **options)
    index = exporter.run(out_dir)
    names = ", ".join(n for n, _ in exporter.methods)
    print(f"saliency overlays ({names}) written to {Path(out_dir)}; index: {index}", flush=True)
    return index
