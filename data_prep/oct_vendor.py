"""Vendor OCT formats for :mod:`data_prep.oct`: Heidelberg VOL, E2E and HEYEX XML, Topcon FDA/FDS, Zeiss IMG.

Each reader returns a :class:`VendorVolume`: the B-scans as a ``(V, H, W)`` = (B-scan, depth, lateral)
array in file order, the voxel size ``(dv, dh, dw)`` in mm (between B-scans, axial, lateral), the eye
(``OD``/``OS``, or ``None`` when the file does not say) and the scan pattern. :mod:`data_prep.oct` turns
the spacing into the affine of :mod:`data_prep.oct_nifti` and writes eye and pattern into the datalist.

Heidelberg files are read with eyepy (optional extra ``heidelberg``), Topcon and Zeiss files with
oct-converter's format definitions (extra ``topcon-zeiss``, which brings opencv and ffmpeg, several hundred
MB); ``vendor-oct`` is both. A missing package is an :class:`~data_prep.oct_errors.OCTInputError` naming
the file and the extra to install. Topcon chunks are walked here: oct-converter 0.7.0's own FDA/FDS readers
call ``numpy.fromstring`` in binary mode, which numpy 2.3 removed.

Where the file records each B-scan's start and end point on the fundus (VOL, E2E, XML), the B-scans must
be parallel and evenly spaced: every distance between neighbouring B-scans (start to start and end to
end) within ``tolerance`` (relative, default 5 %) of the nominal spacing (the VOL header's, else the
median), and every B-scan's direction within ``tolerance`` radians of the first one's. Anything else is
refused with the spacings found; nothing is resampled. Line, circle, radial and cross scans are refused
too: they are not volumes.

Intensities: VOL and E2E store linear reflectivity, which eyepy maps to the 8-bit display scale HEYEX
shows (0-255); XML, FDA (JPEG), FDS, Zeiss IMG and FDA's uncompressed chunk are kept as stored (8 or 16 bit).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.oct_errors import OCTInputError

__all__ = [
    "EXTRAS",
    "SPACING_TOLERANCE",
    "VENDOR_READERS",
    "VendorVolume",
    "check_bscan_positions",
    "read_vendor_volume",
]

#: The optional-dependency group that brings each vendor package (``vendor-oct`` brings both).
EXTRAS = {"eyepy": "heidelberg", "oct_converter": "topcon-zeiss"}

#: Default relative tolerance of the B-scan spacing (and radians of B-scan direction) check.
SPACING_TOLERANCE = 0.05

#: Heidelberg's scan pattern codes (VOL header, E2E B-scan metadata).
HEIDELBERG_PATTERNS = {0: "unknown", 1: "line", 2: "circle", 3: "volume", 4: "fast volume", 5: "radial"}
#: Topcon's scan modes as oct-converter's format definitions name them.
TOPCON_PATTERNS = {2: "volume", 3: "radial", 4: "cross"}
#: Patterns that are not a stack of parallel B-scans.
NOT_VOLUMES = {"line", "circle", "radial", "cross"}

#: Zeiss Cirrus cubes cover 6 x 6 mm of fundus and 2 mm of depth; the .img file itself has no header.
CIRRUS_CUBE_MM = (6.0, 2.0, 6.0)
_CIRRUS_SIZE = re.compile(r"(\d+)x(\d+)")


@dataclass(frozen=True)
class VendorVolume:
    """One vendor volume as read.

    Attributes:
        data: ``(V, H, W)`` array, B-scans in file order.
        spacing: ``(dv, dh, dw)`` in mm: between B-scans, axial, lateral.
        laterality: ``"OD"``, ``"OS"`` or ``None``.
        scan_pattern: ``"volume"``, ``"fast volume"`` or ``"unknown"`` (others are refused).
        vendor_format: Short name of the format, e.g. ``"heidelberg-vol"``.
    """

    data: np.ndarray
    spacing: tuple[float, float, float]
    laterality: str | None
    scan_pattern: str
    vendor_format: str


def _require(module: str, distribution: str, path: Path) -> None:
    if importlib.util.find_spec(module) is None:
        raise OCTInputError(
            path,
            f"reading {path.suffix} files needs the optional package {distribution}, which is not installed; "
            f"install it with: pip install 'ppi-med[{EXTRAS[module]}]'",
        )
    try:
        importlib.import_module(module if module != "oct_converter" else "oct_converter.readers")
    except ImportError as exc:  # e.g. opencv, which oct-converter imports, without its system libraries
        raise OCTInputError(
            path, f"{distribution} is installed but does not import ({exc}); reinstall 'ppi-med[{EXTRAS[module]}]'"
        ) from exc


def _laterality(value: object) -> str | None:
    text = str(value or "").strip("\x00 ").upper()
    text = text.rsplit(".", 1)[-1]  # eyepy's enum prints as "LateralityEnum.OD"
    return {"OD": "OD", "R": "OD", "OS": "OS", "L": "OS"}.get(text)


def _refuse_pattern(path: Path, pattern: str) -> None:
    if pattern in NOT_VOLUMES:
        raise OCTInputError(path, f"scan pattern {pattern!r} is not a volume of parallel B-scans; only volumes ingest")


def _positive_spacing(path: Path, spacing: Sequence[float], what: str) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise OCTInputError(path, f"invalid voxel size {values} from {what}; expected three positive lengths in mm")
    return values  # type: ignore[return-value]


def check_bscan_positions(
    path: str | Path,
    starts: Sequence[Sequence[float]],
    ends: Sequence[Sequence[float]],
    *,
    nominal: float | None = None,
    tolerance: float = SPACING_TOLERANCE,
    unit: str = "mm",
) -> float:
    """Check that B-scans are parallel and evenly spaced, and return their spacing.

    Args:
        path: The file (for the message).
        starts: Each B-scan's start point on the fundus, in file order.
        ends: Each B-scan's end point.
        nominal: The spacing the file states (e.g. the VOL header's), or ``None`` to use the median.
        tolerance: Allowed relative deviation of every distance from the spacing, and allowed angle
            (radians) between any B-scan's direction and the first one's.
        unit: Unit of the coordinates, for the message.

    Returns:
        The spacing: ``nominal`` when given and positive, else the median distance.

    Raises:
        OCTInputError: fewer than two B-scans, non-parallel B-scans, or a distance outside the tolerance
            (the message lists the distances found and the tolerance).
    """
    path = Path(path)
    s = np.asarray(starts, dtype=np.float64).reshape(-1, 2)
    e = np.asarray(ends, dtype=np.float64).reshape(-1, 2)
    if len(s) < 2 or len(s) != len(e):
        raise OCTInputError(path, f"{len(s)} B-scan position(s); a volume needs at least two B-scans")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(e))):
        raise OCTInputError(path, "non-finite B-scan positions")
    direction = e - s
    lengths = np.linalg.norm(direction, axis=1)
    if np.any(lengths <= 0):
        raise OCTInputError(path, "a B-scan with equal start and end points (a circle scan?) is not a volume B-scan")
    unit_dir = direction / lengths[:, None]
    angles = np.arccos(np.clip(unit_dir @ unit_dir[0], -1.0, 1.0))
    if np.max(angles) > tolerance:
        raise OCTInputError(
            path,
            f"B-scans are not parallel: up to {np.degrees(np.max(angles)):.2f} degrees from the first "
            f"(tolerance {np.degrees(tolerance):.2f}); only raster volumes ingest",
        )
    steps = np.concatenate([np.linalg.norm(np.diff(s, axis=0), axis=1), np.linalg.norm(np.diff(e, axis=0), axis=1)])
    median = float(np.median(steps))
    reference = float(nominal) if nominal is not None and np.isfinite(nominal) and nominal > 0 else median
    if reference <= 0:
        raise OCTInputError(path, "all B-scans lie at the same position; the spacing between them is 0")
    off = np.abs(steps - reference) > tolerance * reference
    if np.any(off):
        found = np.unique(np.round(steps, 4))
        shown = ", ".join(f"{v:g}" for v in found[:12]) + (", ..." if len(found) > 12 else "")
        source = "stated in the header" if reference != median else "median"
        raise OCTInputError(
            path,
            f"irregular B-scan spacing: distances between neighbouring B-scans {shown} {unit} "
            f"(min {steps.min():g}, max {steps.max():g}); the spacing {reference:g} {unit} ({source}) allows "
            f"+/-{tolerance:.0%}; resample the volume to even spacing or export it again",
        )
    return reference


def _read_heidelberg_vol(path: Path, tolerance: float) -> VendorVolume:
    _require("eyepy", "eyepy", path)
    from eyepy.io.he import HeVolReader

    reader = HeVolReader(path)
    header = reader.parsed_file
    pattern = HEIDELBERG_PATTERNS.get(int(header.scan_pattern), "unknown")
    _refuse_pattern(path, pattern)
    starts = [(b.start_x, b.start_y) for b in header.bscans]
    ends = [(b.end_x, b.end_y) for b in header.bscans]
    dv = check_bscan_positions(path, starts, ends, nominal=float(header.distance), tolerance=tolerance)
    spacing = _positive_spacing(path, (dv, header.scale_y, header.scale_x), "the VOL header")
    data = np.asarray(reader.volume.data)
    return VendorVolume(data, spacing, _laterality(header.scan_position), pattern, "heidelberg-vol")


def _e2e_laterality(series: object) -> str | None:
    from eyepy.io.he.e2e_format import TypesEnum

    folders = series.folders.get(TypesEnum.laterality, [])  # type: ignore[attr-defined]
    if not folders:
        return None
    value = folders[0].data.laterality
    # the stored byte is the ASCII code of R or L; eyepy's enum names it OD or OS
    return _laterality(getattr(value, "name", None) or {82: "R", 76: "L"}.get(int(value)))


def _read_heidelberg_e2e(path: Path, tolerance: float) -> VendorVolume:
    _require("eyepy", "eyepy", path)
    from eyepy.core.utils import intensity_transforms
    from eyepy.io.he import HeE2eReader
    from eyepy.io.he.e2e_reader import MEDIUM_EYE_LENGTH_UM_PER_DEG

    with HeE2eReader(path) as reader:
        series = [s for s in reader.series if s.n_bscans > 0]
        if not series:
            raise OCTInputError(path, "the E2E file holds no OCT series (no B-scans)")
        if len(series) > 1:
            listed = "; ".join(f"series {s.id}: {s.n_bscans} B-scans" for s in series)
            raise OCTInputError(
                path, f"the E2E file holds {len(series)} OCT series ({listed}); export one series per file"
            )
        s = series[0]
        metas = s.get_bscan_meta()
        if len(metas) != s.n_bscans:
            raise OCTInputError(path, f"{s.n_bscans} B-scans but {len(metas)} B-scan headers")
        pattern = HEIDELBERG_PATTERNS.get(int(metas[0]["scan_pattern"]), "unknown")
        _refuse_pattern(path, pattern)
        # E2E places B-scans in degrees of visual angle; eyepy's medium-eye constant converts to mm
        mm_per_deg = MEDIUM_EYE_LENGTH_UM_PER_DEG / 1000.0
        starts = [np.asarray(m["start_pos"]) * mm_per_deg for m in metas]
        ends = [np.asarray(m["end_pos"]) * mm_per_deg for m in metas]
        dv = check_bscan_positions(path, starts, ends, tolerance=tolerance)
        dw_um = s.get_x_scale_derivation()["scaling_x_um_per_pixel"]
        spacing = _positive_spacing(path, (dv, metas[0]["scale_y"], (dw_um or 0.0) / 1000.0), "the E2E B-scan headers")
        raw = np.asarray(s.get_bscans(), dtype=np.float32)
        laterality = _e2e_laterality(s)
    data = intensity_transforms["e2e"](raw)
    return VendorVolume(data, spacing, laterality, pattern, "heidelberg-e2e")


def _read_heyex_xml(path: Path, tolerance: float) -> VendorVolume:
    _require("eyepy", "eyepy", path)
    from eyepy.io.he import HeXmlReader

    reader = HeXmlReader(path)
    metas = reader.bscan_meta
    starts = [m["start_pos"] for m in metas]
    ends = [m["end_pos"] for m in metas]
    dv = check_bscan_positions(path, starts, ends, tolerance=tolerance)
    values = reader.parsed_values
    spacing = _positive_spacing(path, (dv, values["scale_y"] or 0.0, values["scale_x"] or 0.0), "the XML")
    data = np.asarray(reader.volume.data)
    # the XML names no pattern; the position check above has shown parallel, evenly spaced B-scans
    return VendorVolume(data, spacing, _laterality(values["scan_position"]), "volume", "heidelberg-xml")


def _topcon_chunks(path: Path, raw: bytes, header_struct: object) -> dict[bytes, list[tuple[int, int]]]:
    header = header_struct.parse(raw[:15])  # type: ignore[attr-defined]
    if header.file_code != "FOCT":
        raise OCTInputError(path, f"not a Topcon file: it starts with {raw[:4]!r}, expected b'FOCT'")
    chunks: dict[bytes, list[tuple[int, int]]] = {}
    pos = 15
    while pos < len(raw) and raw[pos] != 0:
        n = raw[pos]
        name = raw[pos + 1 : pos + 1 + n]
        if pos + 5 + n > len(raw):
            raise OCTInputError(path, f"truncated file: chunk {name!r} at byte {pos} has no size")
        size = int(np.frombuffer(raw, dtype="<u4", count=1, offset=pos + 1 + n)[0])
        start = pos + 5 + n
        if start + size > len(raw):
            raise OCTInputError(path, f"truncated file: chunk {name!r} needs {size} bytes, {len(raw) - start} left")
        chunks.setdefault(name, []).append((start, size))
        pos = start + size
    return chunks


def _chunk(raw: bytes, chunks: dict[bytes, list[tuple[int, int]]], name: bytes) -> bytes | None:
    if name not in chunks:
        return None
    start, size = chunks[name][0]
    return raw[start : start + size]


def _read_topcon(path: Path, tolerance: float) -> VendorVolume:
    _require("oct_converter", "oct-converter", path)
    from PIL import Image

    if path.suffix.lower() == ".fds":
        from oct_converter.readers.binary_structs import fds_binary as binary
    else:
        from oct_converter.readers.binary_structs import fda_binary as binary

    raw = path.read_bytes()
    chunks = _topcon_chunks(path, raw, binary.header)
    if (body := _chunk(raw, chunks, b"@IMG_JPEG")) is not None:
        head = binary.oct_header.parse(body[:25])
        slices, pos = [], 25
        for i in range(head.number_slices):
            size = int(np.frombuffer(body, dtype="<i4", count=1, offset=pos)[0])
            with Image.open(io.BytesIO(body[pos + 4 : pos + 4 + size])) as image:
                slices.append(np.asarray(image.convert("L")))
            pos += 4 + size
            if slices[-1].shape != (head.height, head.width):
                expected = (head.height, head.width)
                raise OCTInputError(path, f"B-scan {i} is {slices[-1].shape}, the header says {expected}")
        data = np.stack(slices)
    else:
        name = b"@IMG_SCAN_03" if path.suffix.lower() == ".fds" else b"@IMG_MOT_COMP_03"
        body = _chunk(raw, chunks, name)
        if body is None:
            found = sorted(k.decode("ascii", "replace") for k in chunks)
            raise OCTInputError(path, f"no OCT image chunk (@IMG_JPEG or {name.decode()}); chunks found: {found}")
        head = (binary.oct_header if name == b"@IMG_SCAN_03" else binary.oct_header_2).parse(body[:22])
        count = head.width * head.height * head.number_slices
        if len(body) - 22 < 2 * count:
            raise OCTInputError(path, f"truncated OCT chunk: {count} voxels need {2 * count} bytes")
        data = np.frombuffer(body, dtype="<u2", count=count, offset=22).reshape(
            head.number_slices, head.height, head.width
        )
    pattern = TOPCON_PATTERNS.get(int(head.scan_mode), "unknown")
    _refuse_pattern(path, pattern)
    if data.shape[0] < 2:
        raise OCTInputError(path, f"{data.shape[0]} B-scan(s); a volume needs at least two")
    params = _chunk(raw, chunks, b"@PARAM_SCAN_04")
    scan = binary.param_scan_04_header.parse(params) if params is not None else None
    if scan is None and (params := _chunk(raw, chunks, b"@PARAM_SCAN_02")) is not None:
        scan = binary.param_scan_02_header.parse(params)
    if scan is None:
        raise OCTInputError(path, "no @PARAM_SCAN_04 or @PARAM_SCAN_02 chunk: the scan size is unknown")
    # oct-converter's convention: scan length over the number of A-scans / B-scans
    n_v, n_h, n_w = data.shape
    spacing = _positive_spacing(
        path,
        (scan.y_dimension_mm / n_v, scan.z_resolution_um / 1000.0, scan.x_dimension_mm / n_w),
        "@PARAM_SCAN",
    )
    capture = _chunk(raw, chunks, b"@CAPTURE_INFO_02")
    info = binary.capture_info_02_header.parse(capture) if capture is not None else None
    if info is None and (capture := _chunk(raw, chunks, b"@CAPTURE_INFO")) is not None:
        info = binary.capture_info_header.parse(capture)
    laterality = {0: "OD", 1: "OS"}.get(int(info.eye)) if info is not None else None
    return VendorVolume(np.array(data), spacing, laterality, pattern, f"topcon-{path.suffix.lower()[1:]}")


def _read_zeiss_img(path: Path, tolerance: float) -> VendorVolume:
    _require("oct_converter", "oct-converter", path)
    from oct_converter.readers import IMG

    sizes = _CIRRUS_SIZE.findall(path.name)
    if len(sizes) != 1:
        raise OCTInputError(
            path,
            "a Zeiss .img file has no header: its name must carry the cube size as <A-scans>x<B-scans> once, "
            "as Cirrus exports do (e.g. 'P123_Macular Cube 512x128_..._OD_..._cube_z.img')",
        )
    n_w, n_v = (int(v) for v in sizes[0])
    n_bytes = path.stat().st_size
    if n_w < 2 or n_v < 2 or n_bytes % (n_w * n_v) or n_bytes // (n_w * n_v) < 2:
        raise OCTInputError(path, f"{n_bytes} bytes do not hold a {n_w} x {n_v} cube of 8-bit A-scans")
    n_h = n_bytes // (n_w * n_v)
    volume = IMG(path).read_oct_volume(rows=n_h, cols=n_w)
    data = np.stack([np.asarray(b) for b in volume.volume])
    width_mm, depth_mm, length_mm = CIRRUS_CUBE_MM
    spacing = (length_mm / n_v, depth_mm / n_h, width_mm / n_w)
    return VendorVolume(data, spacing, _laterality(volume.laterality), "volume", "zeiss-img")


#: Vendor extensions and their readers, each ``(path, tolerance) -> VendorVolume``.
VENDOR_READERS: dict[str, Callable[[Path, float], VendorVolume]] = {
    ".vol": _read_heidelberg_vol,
    ".e2e": _read_heidelberg_e2e,
    ".xml": _read_heyex_xml,
    ".fda": _read_topcon,
    ".fds": _read_topcon,
    ".img": _read_zeiss_img,
}


def read_vendor_volume(path: str | Path, tolerance: float = SPACING_TOLERANCE) -> VendorVolume:
    """Read one vendor OCT file (the extension chooses the reader).

    Args:
        path: A ``.vol``, ``.e2e``, HEYEX ``.xml``, ``.fda``, ``.fds`` or Zeiss ``.img`` file.
        tolerance: See :func:`check_bscan_positions`.

    Returns:
        The volume, its voxel size, eye and scan pattern.

    Raises:
        OCTInputError: an unknown extension, a missing optional package, a scan that is not a volume,
            irregular B-scan spacing, or a file the reader cannot parse.
    """
    path = Path(path)
    reader = VENDOR_READERS.get(path.suffix.lower())
    if reader is None:
        raise OCTInputError(path, f"not a vendor OCT extension; supported: {sorted(VENDOR_READERS)}")
    return reader(path, tolerance)
