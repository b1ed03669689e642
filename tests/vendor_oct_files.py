"""Writers of small vendor OCT files, byte by byte from the formats' published layouts, for the ingestion tests.

Each writer takes the B-scans as an 8-bit ``(V, H, W)`` array of the intensities the reader should return
(HEYEX's display scale for VOL and E2E, which store linear reflectivity) and the scan geometry, and writes
one file in the vendor's layout:

* :func:`write_vol`: Heidelberg VOL: a 2048-byte file header, the SLO image, then per B-scan a header
  (start and end point on the fundus in mm) and ``float32`` reflectivity;
* :func:`write_e2e`: Heidelberg E2E: a version block, a directory header and one chunk of folder headers,
  each pointing at a data container (patient, laterality, enface modality, per B-scan its metadata with the
  start and end point in degrees, and the image as Heidelberg's unsigned 16-bit float);
* :func:`write_fda`: Topcon FDA (or FDS): ``FOCT`` header and named chunks (uncompressed 16-bit or JPEG
  B-scans, scan size, capture information with the eye);
* :func:`write_heyex_xml`: a HEYEX XML export folder: the XML and one PNG per B-scan and localizer.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "HEIDELBERG_MM_PER_DEG",
    "display_to_reflectivity",
    "encode_heidelberg_float16",
    "raster_positions",
    "write_e2e",
    "write_fda",
    "write_heyex_xml",
    "write_vol",
]

#: mm of retina per degree of visual angle in a medium eye, as eyepy converts E2E positions.
HEIDELBERG_MM_PER_DEG = 0.2896

_VOL_PATTERN = {"volume": 3, "fast volume": 4, "line": 1, "circle": 2, "radial": 5}


def display_to_reflectivity(display: np.ndarray) -> np.ndarray:
    """Linear reflectivity whose HEYEX display value (0-255, log-compressed) is ``display``."""
    scaled = display.astype(np.float64) / 255.0
    return (np.exp(scaled * 8.285 - 8.3) - 2.44e-4).astype(np.float32)


def raster_positions(
    n_bscans: int, width: float, spacing: float | Sequence[float], *, top: float = 1.0, left: float = 1.0
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Start and end points of horizontal B-scans from ``top`` downwards.

    Args:
        n_bscans: Number of B-scans.
        width: Length of each B-scan.
        spacing: One distance between neighbouring B-scans, or the ``n_bscans - 1`` distances.
        top: y of the first B-scan.
        left: x where every B-scan starts.
    """
    steps = [float(spacing)] * (n_bscans - 1) if np.isscalar(spacing) else [float(s) for s in spacing]
    ys = np.concatenate([[top], top + np.cumsum(steps)])
    return [(left, float(y)) for y in ys], [(left + width, float(y)) for y in ys]


def _put(buf: bytearray, offset: int, fmt: str, *values: object) -> None:
    struct.pack_into("<" + fmt, buf, offset, *values)


def write_vol(
    path: Path,
    display: np.ndarray,
    *,
    scale_x: float,
    scale_y: float,
    distance: float,
    laterality: str = "OD",
    pattern: str = "volume",
    positions: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]] | None = None,
    slo_size: int = 16,
) -> Path:
    """Write a Heidelberg ``.vol`` file (HSF-OCT-103).

    Args:
        path: Target file.
        display: ``(V, H, W)`` uint8 display intensities.
        scale_x: Lateral pixel size (mm).
        scale_y: Axial pixel size (mm).
        distance: Header's distance between B-scans (mm).
        laterality: ``"OD"`` or ``"OS"``.
        pattern: Scan pattern name (``volume``, ``fast volume``, ``line``, ``circle``, ``radial``).
        positions: ``(starts, ends)`` per B-scan in mm; default an even raster ``distance`` apart.
        slo_size: Side of the square SLO image in pixels.
    """
    n_v, n_h, n_w = display.shape
    starts, ends = positions or raster_positions(n_v, n_w * scale_x, distance)
    bscan_header = 256 + 2 * 4 * n_w  # two segmentation lines follow the 256-byte block
    head = bytearray(2048)
    head[0:12] = b"HSF-OCT-103\0"
    _put(head, 12, "III", n_w, n_v, n_h)
    _put(head, 24, "ddd", scale_x, distance, scale_y)
    _put(head, 48, "IIdd", slo_size, slo_size, 0.03, 0.03)
    _put(head, 72, "Id", 30, 0.0)
    head[84:88] = laterality.encode("ascii").ljust(4, b"\0")
    _put(head, 88, "QiI", 130_000_000_000_000_000, _VOL_PATTERN[pattern], bscan_header)
    head[104:120] = b"1234".ljust(16, b"\0")
    head[140:164] = b"PID-TEST".ljust(24, b"\0")
    _put(head, 164, "d", 20000.0)  # date of birth, days since 1899-12-30
    _put(head, 200, "d", 45000.0)  # visit date
    out = bytearray(head)
    out += np.linspace(0, 255, slo_size * slo_size).astype(np.uint8).tobytes()
    reflectivity = display_to_reflectivity(display)
    for i in range(n_v):
        block = bytearray(bscan_header)
        block[0:12] = b"HSF-BS-103\0\0"
        _put(block, 12, "I", bscan_header)
        _put(block, 16, "dddd", *starts[i], *ends[i])
        _put(block, 48, "IIfI", 2, 256, 30.0, 0)
        seg = np.stack([np.full(n_w, n_h * 0.3), np.full(n_w, n_h * 0.7)]).astype("<f4")
        block[256 : 256 + seg.nbytes] = seg.tobytes()
        out += block + reflectivity[i].astype("<f4").tobytes()
    path.write_bytes(bytes(out))
    return path


def encode_heidelberg_float16(values: np.ndarray) -> np.ndarray:
    """Heidelberg's unsigned 16-bit float (6-bit exponent biased by 63, 10-bit mantissa), as eyepy decodes it.

    eyepy reads the mantissa bits in reverse order (least significant bit first), so they are written so.
    """
    v = np.asarray(values, dtype=np.float64)
    exponent = np.floor(np.log2(v)).astype(np.int64)
    mantissa = np.rint((v / np.exp2(exponent) - 1.0) * 1024).astype(np.int64)
    carry = mantissa >= 1024
    exponent, mantissa = exponent + carry, np.where(carry, 0, mantissa)
    biased = exponent + 63
    if np.any(biased < 0) or np.any(biased > 63):
        raise ValueError("value out of the 16-bit float's range")
    reversed_bits = np.zeros_like(mantissa)
    for bit in range(10):
        reversed_bits |= ((mantissa >> bit) & 1) << (9 - bit)
    return ((biased << 10) | reversed_bits).astype("<u2")


def _strings(texts: Sequence[str], size: int = 64) -> bytes:
    body = b"".join(t.encode("utf-16-le").ljust(size, b"\0") for t in texts)
    return struct.pack("<II", len(texts), size) + body


def write_e2e(
    path: Path,
    display: np.ndarray,
    *,
    width_deg: float,
    spacing_deg: float | Sequence[float],
    scale_y: float,
    laterality: str = "OD",
    pattern: str = "volume",
) -> Path:
    """Write a Heidelberg ``.e2e`` file holding one patient, study and OCT series.

    Args:
        path: Target file.
        display: ``(V, H, W)`` uint8 display intensities.
        width_deg: Length of each B-scan in degrees.
        spacing_deg: Distance between neighbouring B-scans in degrees (one value or ``V - 1``).
        scale_y: Axial pixel size (mm), as the B-scan metadata stores it.
        laterality: ``"OD"`` or ``"OS"``.
        pattern: Scan pattern name, coded as in VOL.
    """
    n_v, n_h, n_w = display.shape
    starts, ends = raster_positions(n_v, width_deg, spacing_deg, top=-10.0, left=-width_deg / 2)
    pid, study, series = 7, 3, 5
    containers: list[tuple[int, int, int, int, int, bytes]] = []  # (patient, study, series, slice, type, body)

    def add(study_id: int, series_id: int, slice_id: int, type_id: int, body: bytes) -> None:
        containers.append((pid, study_id, series_id, slice_id, type_id, body))

    patient = bytearray(131)
    patient[0:4], patient[31:35] = b"Test", b"Eye\0"
    patient[101] = ord("F")
    patient[102:110] = b"PID-E2E\0"
    add(-1, -1, -1, 9, bytes(patient))
    add(study, series, -1, 11, bytes(14) + bytes([82 if laterality == "OD" else 76]) + bytes(12))
    add(study, series, -1, 9007, _strings(["Infra-Red", "IR"]))
    add(study, series, -1, 9006, _strings(["OCT ART Volume"]))
    slo = 16
    add(
        study,
        series,
        -1,
        1073741824,
        struct.pack("<IIIII", slo * slo, 33620481, slo * slo, slo, slo) + bytes(slo * slo),
    )
    codes = encode_heidelberg_float16(display_to_reflectivity(display))
    for i in range(n_v):
        meta = bytearray(428)
        _put(meta, 4, "II", n_h, n_w)
        _put(meta, 12, "ffff", *starts[i], *ends[i])
        _put(meta, 36, "f", scale_y)
        _put(meta, 60, "IIII", n_w, n_v, i, _VOL_PATTERN[pattern])
        _put(meta, 76, "ff", (starts[i][0] + ends[i][0]) / 2, (starts[i][1] + ends[i][1]) / 2)
        _put(meta, 88, "Q", 130_000_000_000_000_000)
        add(study, series, 2 * i, 10004, bytes(meta))
        image = struct.pack("<IIIII", n_h * n_w * 2, 35652097, n_h * n_w, n_h, n_w) + codes[i].tobytes()
        add(study, series, 2 * i, 1073741824, image)

    version = b"CMDb".ljust(12, b"\0") + struct.pack("<I", 100) + bytes(20)
    directory_header_size, folder_size, container_header_size = 52, 44, 60

    def directory_header(num_entries: int, current: int, prev: int) -> bytes:
        return (
            b"MDbMDir".ljust(12, b"\0")
            + struct.pack("<I", 100)
            + bytes(20)
            + struct.pack("<IIII", num_entries, current, prev, 0)
        )

    chunk_start = len(version) + directory_header_size
    data_start = chunk_start + directory_header_size + folder_size * len(containers)
    folders, bodies, pos = bytearray(), bytearray(), data_start
    for n, (p, st, se, sl, type_id, body) in enumerate(containers):
        ind = 1 if type_id == 1073741824 and sl >= 0 else 0
        ids = struct.pack("<iiiiHHII", p, st, se, sl, ind, 0, type_id, 0)
        folders += struct.pack("<IIII", chunk_start + directory_header_size + folder_size * n, pos, len(body), 0)
        folders += ids
        bodies += b"MDbData".ljust(12, b"\0") + struct.pack("<IIIII", 0, pos, pos + container_header_size, len(body), 0)
        bodies += ids + body
        pos += container_header_size + len(body)
    out = version + directory_header(len(containers), chunk_start, chunk_start)
    out += directory_header(len(containers), chunk_start, 0) + folders + bodies
    path.write_bytes(bytes(out))
    return path


def _chunk(name: str, body: bytes) -> bytes:
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw + struct.pack("<I", len(body)) + body


def write_fda(
    path: Path,
    bscans: np.ndarray,
    *,
    x_mm: float,
    y_mm: float,
    z_um: float,
    laterality: str = "OD",
    scan_mode: int = 2,
    jpeg: bool = False,
    fds: bool = False,
) -> Path:
    """Write a Topcon ``.fda`` file (or, with ``fds``, an ``.fds`` file, whose image chunk is ``@IMG_SCAN_03``).

    Args:
        path: Target file.
        bscans: ``(V, H, W)`` uint16 (uncompressed) or uint8 (``jpeg``) B-scans.
        x_mm: Scan width (mm), the lateral size of the cube.
        y_mm: Scan height (mm), across the B-scans.
        z_um: Axial pixel size (micrometres).
        laterality: ``"OD"`` (eye 0) or ``"OS"`` (eye 1).
        scan_mode: Topcon's scan mode (2: 3D volume, 3: radial, 4: cross).
        jpeg: Store the B-scans as JPEG (``@IMG_JPEG``) instead of uncompressed (``@IMG_MOT_COMP_03``).
        fds: Write the FDS variant (uncompressed 16-bit B-scans in ``@IMG_SCAN_03``).
    """
    n_v, n_h, n_w = bscans.shape
    out = b"FOCT" + (b"FDS" if fds else b"FDA") + struct.pack("<II", 1, 0)
    if jpeg:
        body = struct.pack("<BIIIIII", scan_mode, 0, 0, n_w, n_h, n_v, 0)
        for b in bscans:
            buf = io.BytesIO()
            Image.fromarray(b.astype(np.uint8)).save(buf, format="JPEG", quality=100)
            body += struct.pack("<i", len(buf.getvalue())) + buf.getvalue()
        out += _chunk("@IMG_JPEG", body)
    else:
        head = struct.pack("<BIIIIBI", scan_mode, n_w, n_h, 16, n_v, 0, bscans.size * 2)
        # A-scan samples of one row across the B-scan first, then rows, then B-scans
        out += _chunk("@IMG_SCAN_03" if fds else "@IMG_MOT_COMP_03", head + bscans.astype("<u2").tobytes())
    out += _chunk("@PARAM_SCAN_04", struct.pack("<IIIdddddBB", 0, 0, 0, x_mm, y_mm, z_um, 0.0, 0.0, 0, 0))
    eye = 0 if laterality == "OD" else 1
    capture = (
        struct.pack("<BBI", eye, scan_mode, 1)
        + b"3D Macula".ljust(100, b"\0")
        + struct.pack("<6H", 2024, 5, 6, 7, 8, 9)
    )
    out += _chunk("@CAPTURE_INFO_02", capture)
    path.write_bytes(out + b"\0")
    return path


def write_heyex_xml(
    folder: Path,
    display: np.ndarray,
    *,
    scale_x: float,
    scale_y: float,
    positions: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]],
    laterality: str = "OD",
) -> Path:
    """Write a HEYEX XML export: ``folder/<n>.xml`` with one PNG per B-scan and a localizer PNG.

    Args:
        folder: Export folder (created).
        display: ``(V, H, W)`` uint8 B-scans.
        scale_x: Lateral pixel size (mm).
        scale_y: Axial pixel size (mm).
        positions: ``(starts, ends)`` per B-scan in mm.
        laterality: ``"OD"`` or ``"OS"``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n_v, n_h, n_w = display.shape
    starts, ends = positions
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(folder / "loc.png")
    images = [
        "<Image><ID>0</ID><ImageType><Type>LOCALIZER</Type></ImageType>"
        "<OphthalmicAcquisitionContext><Width>32</Width><Height>32</Height><ScaleX>0.2</ScaleX>"
        "<ScaleY>0.2</ScaleY><Angle>30</Angle><Focus>0.0</Focus></OphthalmicAcquisitionContext>"
        "<ImageData><ExamURL>C:\\export\\loc.png</ExamURL></ImageData></Image>"
    ]
    for i in range(n_v):
        Image.fromarray(display[i]).save(folder / f"b{i:03d}.png")
        images.append(
            f"<Image><ID>{i + 1}</ID><ImageType><Type>OCT</Type></ImageType><OphthalmicAcquisitionContext>"
            f"<Width>{n_w}</Width><Height>{n_h}</Height><ScaleX>{scale_x!r}</ScaleX><ScaleY>{scale_y!r}</ScaleY>"
            f"<Start><Coord><X>{starts[i][0]!r}</X><Y>{starts[i][1]!r}</Y></Coord></Start>"
            f"<End><Coord><X>{ends[i][0]!r}</X><Y>{ends[i][1]!r}</Y></Coord></End>"
            f"<ImageQuality>30</ImageQuality></OphthalmicAcquisitionContext>"
            f"<ImageData><ExamURL>C:\\export\\b{i:03d}.png</ExamURL></ImageData></Image>"
        )
    side = "R" if laterality == "OD" else "L"
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<HEDX><BODY><SWVersion><Version>6.16</Version></SWVersion>'
        "<Patient><ID>1</ID><PatientID>PID-XML</PatientID><Study><StudyDate><Date><Year>2024</Year>"
        "<Month>5</Month><Day>6</Day></Date></StudyDate><Series><ID>11</ID>"
        f"<Laterality>{side}</Laterality>{''.join(images)}</Series></Study></Patient></BODY></HEDX>"
    )
    target = folder / "11.xml"
    target.write_text(xml, encoding="utf-8")
    return target
