"""A DICOM node (a hospital PACS, Orthanc, ...) in the loop: fetch studies to prepare, send saliency maps back.

Everything goes over DICOM's own network protocol (DIMSE, through pynetdicom), which every PACS speaks:

- :func:`echo` (C-ECHO) checks that the node answers and accepts this application entity (AE);
- :func:`find` (C-FIND, Study Root) asks what the node holds at one level (STUDY, SERIES, IMAGE);
- :func:`pull` finds the instances of a patient, study or series (C-FIND, level by level) and fetches them
  (C-GET, on the one association, so the node needs no route back to this machine) into
  ``OUT/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, the layout of a TCIA
  download that :mod:`data_prep.lidc` and :class:`data_prep.dicom_series.DicomIndex` read, and a series folder
  that the export's ``export_datalist`` takes as a source;
- :func:`push` (C-STORE) sends files, e.g. the Parametric Maps an export wrote (:func:`exported_maps` lists
  them from its ``index.csv``). A map keeps its SOP Instance UID, so sending it again gives the node the same
  instance, which a PACS keeps once.

A pull writes into a hidden folder inside ``OUT`` and moves each series into place only when every instance
the node listed has arrived; a failed or partial pull leaves ``OUT`` as it was (a series folder that already
exists is refused before anything is fetched). Every error names the node (``CALLED@host:port``, calling AE)
and the problem: nothing listening, association rejected (with the node's reason: called AE title not
recognised, calling AE title not recognised, ...), nothing found, a refused or failed transfer.

TLS: pass an :class:`ssl.SSLContext` as :attr:`DicomNode.tls` (:func:`tls_context` builds one from a CA
bundle and an optional client certificate and key); pynetdicom then wraps the association's socket in it.

CLI (``python -m ppi_med.pacs --help``)::

    python -m ppi_med.pacs echo --host pacs.example.org --port 11112 --called-aet PACS --aet PPIMED
    python -m ppi_med.pacs pull --host ... --study-uid 1.2.3 --out data/from_pacs
    python -m ppi_med.pacs find --host ... --level SERIES --study-uid 1.2.3
    python -m ppi_med.pacs push --host ... --index exports/lidc-wbp/index.csv
    python -m ppi_med.pacs blend --index exports/lidc-wbp/index.csv --series-root data/from_pacs

``blend`` (no node needed) writes each map as colour Secondary Captures over its scan
(:mod:`ppi_med.dicom_blend`) into ``<case>/<stem>_blend/``, for viewers that do not show parametric maps; push
those folders like any other.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import shutil
import socket
import ssl
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = [
    "AssociationRejected",
    "DicomNode",
    "NodeUnreachable",
    "NotFound",
    "PacsError",
    "PullResult",
    "PushResult",
    "TransferFailed",
    "blend_export",
    "echo",
    "exported_maps",
    "find",
    "main",
    "pull",
    "push",
    "tls_context",
]

# DICOM UIDs are digits and dots, at most 64 characters (PS3.5 9.1); anything else in a request is a typo,
# and a received UID becomes a file name, so it must not carry a path.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
# each level's unique key, which a query must carry (PS3.4 C.2.2.1.1)
_LEVEL_KEY = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# presentation contexts a requestor may propose (PS3.8 9.3.2.2: odd ids 1..255)
_MAX_CONTEXTS = 128
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
# compressed syntaxes a pull takes as stored when pydicom can decode them here (the node then sends the file
# untouched); an instance stored in any other syntax the node must transcode to uncompressed, or fail
_COMPRESSED = (
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)


class PacsError(RuntimeError):
    """A DICOM node could not do what was asked; the message names the node and the problem."""


class NodeUnreachable(PacsError):
    """Nothing answers at the node's host and port (refused, timed out, unknown host)."""


class AssociationRejected(PacsError):
    """The node refused the association (wrong called AE title, calling AE not allowed, ...) or aborted it."""


class NotFound(PacsError):
    """The node holds nothing that matches the request."""


class TransferFailed(PacsError):
    """A C-FIND, C-GET or C-STORE failed on the node, or a pull came back incomplete."""


@dataclass(frozen=True)
class DicomNode:
    """Where a DICOM node listens and who this side is.

    Attributes:
        host: the node's host name or address.
        port: its DICOM port (often 104 or 11112; Orthanc's default is 4242).
        called_aet: the node's AE title (the *called* AE).
        calling_aet: this application's AE title, which the node must know (its list of allowed modalities).
        tls: a TLS context for the association (see :func:`tls_context`); ``None`` for plain TCP.
        server_hostname: the name the node's certificate must carry (default: ``host``).
        timeout: seconds to wait for the connection, the association and each reply.
    """

    host: str
    port: int
    called_aet: str
    calling_aet: str = "PPIMED"
    tls: ssl.SSLContext | None = field(default=None, compare=False)
    server_hostname: str | None = None
    timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("called_aet", "calling_aet"):
            value = getattr(self, name)
            # PS3.5 AE VR: 1-16 characters of the default repertoire, no backslash or control characters
            if not (0 < len(value.strip()) <= 16) or any(c == "\\" or not c.isprintable() for c in value):
                raise ValueError(f"{name} {value!r}: an AE title is 1 to 16 printable characters, no backslash")
        if not (0 < int(self.port) < 65536):
            raise ValueError(f"port {self.port}: expected 1..65535")

    def __str__(self) -> str:
        tls = ", TLS" if self.tls is not None else ""
        return f"{self.called_aet}@{self.host}:{self.port} (calling AE {self.calling_aet}{tls})"


def tls_context(ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None):
    """A client TLS context for :attr:`DicomNode.tls`: verify the node against ``ca``, show ``cert`` if asked.

    Args:
        ca: the CA bundle (PEM) that signed the node's certificate; ``None`` uses the system's trust store.
        cert: this side's certificate (PEM), for nodes that require client certificates.
        key: its private key (PEM); ``None`` when ``cert`` holds the key as well.

    Returns:
        The :class:`ssl.SSLContext` (hostname checked, TLS 1.2 or newer).

    Raises:
        FileNotFoundError: a named file does not exist.
        ValueError: ``key`` without ``cert``, or a file that is not a usable certificate or key.
    """
    for name, path in (("CA bundle", ca), ("certificate", cert), ("key", key)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"TLS {name} {path} does not exist")
    if key is not None and cert is None:
        raise ValueError("a TLS key needs its certificate (--tls-cert)")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if ca is None else str(ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            context.load_cert_chain(str(cert), None if key is None else str(key))
    except ssl.SSLError as err:
        raise ValueError(f"TLS files ({ca}, {cert}, {key}) are not usable: {err}") from err
    return context


# -- associations --------------------------------------------------------------------------------------------


def _probe(node: DicomNode) -> str | None:
    """Why no TCP connection can be made, or ``None`` if one can (asked only after an association failed)."""
    try:
        with socket.create_connection((node.host, node.port), timeout=min(node.timeout, 5.0)):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


class _Errors(logging.Handler):
    """pynetdicom's error records while one association starts: the only place it keeps the cause (a TLS
    verification failure, the node's TLS alert) of a failed connection."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.causes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            self.causes.append(f"{type(err).__name__}: {err}")


def _associate(node: DicomNode, contexts: Sequence[tuple[str, Sequence[str]]], roles=(), handlers=()):
    """An established association with ``node``, or the error saying why not."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=node.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = node.timeout
    ae.connection_timeout = node.timeout
    if len(contexts) > _MAX_CONTEXTS:
        raise PacsError(f"{node}: {len(contexts)} presentation contexts needed, at most {_MAX_CONTEXTS} fit")
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    opened: list[bool] = []
    tls_args = None if node.tls is None else (node.tls, node.server_hostname or node.host)
    errors = _Errors()
    logger = logging.getLogger("pynetdicom")
    logger.addHandler(errors)
    try:
        assoc = ae.associate(
            node.host,
            int(node.port),
            ae_title=node.called_aet,
            ext_neg=list(roles) or None,
            tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(True)), *handlers],
        )
    except OSError as err:  # the host name does not resolve (pynetdicom looks it up before connecting)
        raise NodeUnreachable(f"{node}: cannot reach {node.host}:{node.port} ({err.strerror or err})") from err
    finally:
        logger.removeHandler(errors)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        p = assoc.acceptor.primitive
        raise AssociationRejected(
            f"{node}: association rejected ({p.result_str.lower()}, by the {p.source_str.lower()}): {p.reason_str}"
        )
    cause = f": {errors.causes[-1]}" if errors.causes else ""
    if node.tls is not None:
        hint = (
            " (TLS: check the CA, the host name in the node's certificate, and whether it wants a client certificate)"
        )
    else:
        hint = " (a TLS-only port, a filter on this host's address, or not a DICOM service?)"
    if not opened:
        reason = _probe(node)
        if reason is not None:
            raise NodeUnreachable(f"{node}: nothing answers at {node.host}:{node.port} ({reason})")
        raise AssociationRejected(f"{node}: the connection opened but the association did not start{cause}{hint}")
    raise AssociationRejected(f"{node}: the node dropped the association request without an answer{cause}{hint}")


def _status_text(status: Dataset | None, table: Mapping[int, tuple[str, str]]) -> tuple[int | None, str]:
    from pynetdicom.status import GENERAL_STATUS

    if status is None or "Status" not in status:
        return None, "no reply (association aborted or timed out)"
    code = int(status.Status)
    category, meaning = table.get(code) or GENERAL_STATUS.get(code) or ("", "unknown status")
    comment = f"; {status.ErrorComment}" if "ErrorComment" in status else ""
    return code, f"status 0x{code:04X} ({category.lower() or 'status'}: {meaning}{comment})"


# -- C-ECHO, C-FIND --------------------------------------------------------------------------------------------


def echo(node: DicomNode) -> None:
    """Check that ``node`` accepts an association from this AE and answers a C-ECHO.

    Raises:
        NodeUnreachable, AssociationRejected: see :class:`PacsError`.
        TransferFailed: the C-ECHO did not succeed.
    """
    from pynetdicom.sop_class import Verification
    from pynetdicom.status import VERIFICATION_SERVICE_CLASS_STATUS

    assoc = _associate(node, [(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
    try:
        status = assoc.send_c_echo()
    finally:
        _close(assoc)
    code, text = _status_text(status, VERIFICATION_SERVICE_CLASS_STATUS)
    if code != 0:
        raise TransferFailed(f"{node}: C-ECHO failed, {text}")


def _close(assoc) -> None:
    if assoc.is_established:
        assoc.release()


def _check_uid(name: str, value: str | None) -> None:
    if value is not None and (len(value) > 64 or not _UID.match(value)):
        raise ValueError(f"{name} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")


def _answered_uid(node: DicomNode, what: str, value: object) -> str:
    """A UID from the node's answer, which becomes a folder or file name: checked, or the node is at fault."""
    uid = str(value or "")
    if len(uid) > 64 or not _UID.match(uid):
        raise TransferFailed(f"{node}: answered a malformed {what} {uid!r}")
    return uid


def _query(level: str, match: Mapping[str, str], returned: Iterable[str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in (_LEVEL_KEY[level], *returned):
        setattr(ds, keyword, "")
    for keyword, value in match.items():
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        setattr(ds, keyword, value)
    return ds


def _find_on(assoc, node: DicomNode, level: str, match: Mapping[str, str], returned: Iterable[str]) -> list[Dataset]:
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PatientRootFind
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyRootFind
    from pynetdicom.status import QR_FIND_SERVICE_CLASS_STATUS

    model = PatientRootFind if level == "PATIENT" else StudyRootFind
    found, last = [], None
    for status, identifier in assoc.send_c_find(_query(level, match, returned), model):
        last = status
        if status and int(status.Status) in (0xFF00, 0xFF01) and identifier is not None:
            found.append(identifier)
    code, text = _status_text(last, QR_FIND_SERVICE_CLASS_STATUS)
    if code != 0:
        keys = ", ".join(f"{k}={v}" for k, v in match.items())
        raise TransferFailed(f"{node}: C-FIND at {level} level ({keys}) failed, {text}")
    return found


def _find_contexts() -> list[tuple[str, list[str]]]:
    from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind as PatientRootFind
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as StudyRootFind

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return [(StudyRootFind, syntaxes), (PatientRootFind, syntaxes)]


def find(
    node: DicomNode, level: str, match: Mapping[str, str] | None = None, returned: Iterable[str] = ()
) -> list[Dataset]:
    """Ask ``node`` what it holds at one level (C-FIND; Patient Root for PATIENT, Study Root otherwise).

    Args:
        node: the node.
        level: ``PATIENT``, ``STUDY``, ``SERIES`` or ``IMAGE``.
        match: keyword -> value to match (DICOM matching: ``*`` wildcards, ranges for dates), e.g.
            ``{"StudyInstanceUID": uid}``; the node returns these keys too.
        returned: further keywords the answers should carry (e.g. ``SeriesDescription``); the level's own
            unique key (e.g. SeriesInstanceUID at SERIES level) is always asked for.

    Returns:
        One dataset per match (what the node fills in; a node may leave optional keys empty).

    Raises:
        ValueError: an unknown level or keyword.
        NodeUnreachable, AssociationRejected, TransferFailed: see :class:`PacsError`.
    """
    level = level.upper()
    if level not in _LEVELS:
        raise ValueError(f"level {level!r}: expected one of {', '.join(_LEVELS)}")
    match, returned = dict(match or {}), list(returned)
    for keyword in returned:
        if pydicom.datadict.tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
    _query(level, match, returned)  # checks the keywords before connecting
    assoc = _associate(node, _find_contexts())
    try:
        return _find_on(assoc, node, level, match, returned)
    finally:
        _close(assoc)


# -- C-GET -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` wrote.

    Attributes:
        out: the output folder.
        series: the folder of each series fetched (``OUT/<patient>/<study>/<series>``), in UID order.
        n_instances: the number of files written.
    """

    out: Path
    series: tuple[Path, ...]
    n_instances: int


@dataclass(frozen=True)
class _Series:
    patient: str
    study: str
    series: str
    instances: dict[str, str]  # SOP Instance UID -> SOP Class UID


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip())
    return name if name.strip(".") else "unknown"


def _list_instances(
    assoc, node: DicomNode, patient_id: str | None, study_uid: str | None, series_uid: str | None
) -> list[_Series]:
    """The instances to fetch, asked level by level (a relational query is optional for a PACS, this is not)."""
    what = ", ".join(
        f"{k} {v}" for k, v in (("patient", patient_id), ("study", study_uid), ("series", series_uid)) if v is not None
    )
    if patient_id is None and study_uid is None:
        # a series alone: ask for its study first, instead of listing every study of the archive
        hits = _find_on(assoc, node, "SERIES", {"SeriesInstanceUID": series_uid}, ["StudyInstanceUID"])
        study_matches = [{"StudyInstanceUID": u} for u in sorted({str(h.get("StudyInstanceUID", "")) for h in hits})]
    else:
        study_matches = [
            {k: v for k, v in (("PatientID", patient_id), ("StudyInstanceUID", study_uid)) if v is not None}
        ]
    studies = [
        found
        for match in study_matches
        for found in _find_on(assoc, node, "STUDY", match, ["PatientID", "StudyInstanceUID"])
    ]
    result = []
    for study in studies:
        suid = _answered_uid(node, "StudyInstanceUID", study.get("StudyInstanceUID"))
        match = {"StudyInstanceUID": suid} | ({"SeriesInstanceUID": series_uid} if series_uid else {})
        for series in _find_on(assoc, node, "SERIES", match, ["SeriesInstanceUID"]):
            seuid = _answered_uid(node, "SeriesInstanceUID", series.get("SeriesInstanceUID"))
            images = _find_on(
                assoc,
                node,
                "IMAGE",
                {"StudyInstanceUID": suid, "SeriesInstanceUID": seuid},
                ["SOPInstanceUID", "SOPClassUID"],
            )
            instances = {}
            for image in images:
                sop = _answered_uid(node, "SOPInstanceUID", image.get("SOPInstanceUID"))
                cls = _answered_uid(node, f"SOPClassUID for instance {sop}", image.get("SOPClassUID"))
                instances[sop] = cls
            if instances:
                result.append(_Series(str(study.get("PatientID", "")), suid, seuid, instances))
    if not result:
        raise NotFound(f"{node}: no instances found for {what}")
    # in UID order, not the node's (which may change between queries): the same request, the same order
    return sorted(result, key=lambda s: (s.study, s.series))


def _decodable_syntaxes() -> list[str]:
    from pydicom.pixels import get_decoder

    found = []
    for ts in _COMPRESSED:
        try:
            if get_decoder(ts).is_available:
                found.append(ts)
        except NotImplementedError:
            continue
    return found


def _fetch(node: DicomNode, listing: Sequence[_Series], tmp: Path) -> None:
    """C-GET every listed series into ``tmp/<study>/<series>/<sop>.dcm``; raises unless all arrived."""
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as StudyRootGet
    from pynetdicom.status import QR_GET_SERVICE_CLASS_STATUS

    expected = {sop: (s.study, s.series) for s in listing for sop in s.instances}
    classes = sorted({cls for s in listing for cls in s.instances.values()})
    unexpected: list[str] = []
    arrived: list[str] = []

    def on_store(event) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        if sop not in expected:
            unexpected.append(sop)
            return 0xC000  # not asked for (the node's listing and its retrieval disagree): refused
        study, series = expected[sop]
        folder = tmp / study / series
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sop}.dcm").write_bytes(event.encoded_dataset(include_meta=True))
        arrived.append(sop)
        return 0x0000

    contexts = [(StudyRootGet, _UNCOMPRESSED)] + [(cls, _UNCOMPRESSED) for cls in classes]
    decodable = _decodable_syntaxes()
    if len(contexts) + len(classes) * len(decodable) <= _MAX_CONTEXTS:  # else uncompressed only: all classes fit
        contexts += [(cls, [ts]) for cls in classes for ts in decodable]  # one each: the node picks per file
    roles = [build_role(cls, scp_role=True) for cls in classes]
    assoc = _associate(node, contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for s in listing:
            query = _query("SERIES", {"StudyInstanceUID": s.study, "SeriesInstanceUID": s.series}, [])
            last = None
            for status, _ in assoc.send_c_get(query, StudyRootGet):
                last = status or last
            code, text = _status_text(last, QR_GET_SERVICE_CLASS_STATUS)
            if code != 0:
                failed = int(last.get("NumberOfFailedSubOperations", 0) or 0) if last else 0
                detail = f", {failed} instance(s) failed" if failed else ""
                raise TransferFailed(
                    f"{node}: C-GET of series {s.series} (study {s.study}) failed, {text}{detail}; "
                    f"{len(arrived)} of {len(expected)} listed instances had arrived, none is kept"
                )
    finally:
        _close(assoc)
    missing = [sop for sop, (st, se) in expected.items() if not (tmp / st / se / f"{sop}.dcm").is_file()]
    if missing or unexpected:
        raise TransferFailed(
            f"{node}: the pull came back incomplete: {len(missing)} of {len(expected)} listed instances missing"
            f"{f' (e.g. {missing[0]})' if missing else ''}, {len(unexpected)} unrequested"
        )


def pull(
    node: DicomNode,
    out: str | Path,
    *,
    patient_id: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> PullResult:
    """Fetch a patient's studies, a study or a series from ``node`` into ``out`` (see the module's layout).

    Args:
        node: the node.
        out: the output folder (created; other content in it is left alone).
        patient_id: the PatientID (exact; wildcards are refused, so a typo cannot fetch the whole archive).
        study_uid: a StudyInstanceUID.
        series_uid: a SeriesInstanceUID (within the study, or the patient, when those are given too). Alone,
            it is looked up with a SERIES-level query without the study, which most nodes answer (a strictly
            hierarchical one needs ``study_uid`` too).

    Returns:
        The series folders written.

    Raises:
        ValueError: nothing to identify what to fetch, a wildcard, or a malformed UID (before connecting).
        FileExistsError: a series folder the pull would write exists (nothing is fetched).
        NodeUnreachable, AssociationRejected, NotFound, TransferFailed: see :class:`PacsError`; ``out`` is
            left as it was.
    """
    if patient_id is None and study_uid is None and series_uid is None:
        raise ValueError("pull needs a patient id, a study UID or a series UID")
    if patient_id is not None and (not patient_id.strip() or any(c in patient_id for c in "*?\\")):
        raise ValueError(f"patient id {patient_id!r}: expected an exact id (no wildcards or backslash)")
    _check_uid("study UID", study_uid)
    _check_uid("series UID", series_uid)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")

    assoc = _associate(node, _find_contexts())
    try:
        listing = _list_instances(assoc, node, patient_id, study_uid, series_uid)
    finally:
        _close(assoc)
    targets = [out / _safe_name(s.patient) / s.study / s.series for s in listing]
    for target in targets:
        if target.exists():
            raise FileExistsError(f"{target} exists: series {target.name} was pulled before; remove it to pull again")

    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=out))
    moved: list[Path] = []
    try:
        _fetch(node, listing, tmp)
        for s, target in zip(listing, targets):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp / s.study / s.series, target)  # one step per series: a reader sees all or nothing
            moved.append(target)
    except BaseException:
        for target in moved:
            shutil.rmtree(target, ignore_errors=True)
            _remove_empty_parents(target.parent, out)
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:  # deepest first: the folders this pull made, if nothing else appeared in them
            _rmdir_if_empty(p)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return PullResult(out, tuple(targets), sum(len(s.instances) for s in listing))


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and stop in folder.parents:
        _rmdir_if_empty(folder)
        folder = folder.parent


# -- C-STORE ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` sent.

    Attributes:
        sop_instance_uids: the SOP Instance UID of each file, in the order sent.
        warnings: ``file: status`` for each instance the node stored with a warning (e.g. coerced elements).
    """

    sop_instance_uids: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def _dicom_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.dcm") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return files


def push(node: DicomNode, paths: Iterable[str | Path]) -> PushResult:
    """Send DICOM files to ``node`` with C-STORE, each in its own transfer syntax.

    Args:
        node: the node.
        paths: files, or folders (their ``*.dcm`` files, recursively).

    Returns:
        The SOP Instance UIDs sent.

    Raises:
        FileNotFoundError, ValueError: a missing path, no file at all, or a file that is not a DICOM instance
            (all files are read before connecting: then nothing is sent).
        NodeUnreachable, AssociationRejected: see :class:`PacsError` (nothing is sent).
        TransferFailed: the node refused an instance (those before it were stored); the message names it.
    """
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    files = _dicom_files(paths)
    if not files:
        raise ValueError("nothing to push: no DICOM file given")
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as err:  # noqa: BLE001 - any parse failure means "not a DICOM file"
            raise ValueError(f"{f}: not a DICOM file ({type(err).__name__}: {err})") from err
        meta = getattr(ds, "file_meta", None)
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds or meta is None or "TransferSyntaxUID" not in meta:
            raise ValueError(f"{f}: not a DICOM instance (no SOPClassUID, SOPInstanceUID or transfer syntax)")
        datasets.append(ds)
    # one context per SOP class and stored transfer syntax, so that each file goes as it is (a deflated map
    # stays deflated), plus the uncompressed pair the node may prefer for uncompressed files
    contexts: dict[tuple[str, str], list[str]] = {}
    for ds in datasets:
        cls, ts = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            contexts[(cls, "uncompressed")] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        else:
            contexts[(cls, ts)] = [ts]
    assoc = _associate(node, [(cls, syntaxes) for (cls, _), syntaxes in contexts.items()])
    sent, warnings = [], []
    try:
        for f, ds in zip(files, datasets):
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as err:  # no accepted context for this class and syntax
                raise TransferFailed(f"{node}: {f} was not sent: {err}") from err
            code, text = _status_text(status, STORAGE_SERVICE_CLASS_STATUS)
            if code is None or (code != 0 and not (code & 0xF000) == 0xB000):
                raise TransferFailed(
                    f"{node}: C-STORE of {f} (SOP Instance {ds.SOPInstanceUID}) refused, {text}; "
                    f"{len(sent)} of {len(files)} files were stored before it"
                )
            if code != 0:
                warnings.append(f"{f}: {text}")
            sent.append(str(ds.SOPInstanceUID))
    finally:
        _close(assoc)
    return PushResult(tuple(sent), tuple(warnings))


def exported_maps(index: str | Path) -> list[Path]:
    """The Parametric Maps an export wrote, from its ``index.csv`` (column ``dicom_overlay``), once each.

    Raises:
        FileNotFoundError: the index, or a map it lists, does not exist.
        ValueError: the file has no ``dicom_overlay`` column, or lists no map.
    """
    index = Path(index)
    if not index.is_file():
        raise FileNotFoundError(f"export index {index} does not exist")
    with open(index, newline="") as fh:
        reader = csv.DictReader(fh)
        if "dicom_overlay" not in (reader.fieldnames or []):
            raise ValueError(f"{index}: no dicom_overlay column; not an export index")
        maps = list(dict.fromkeys(Path(r["dicom_overlay"]) for r in reader if r.get("dicom_overlay")))
    if not maps:
        raise ValueError(f"{index}: lists no DICOM Parametric Map (the export's sources were not DICOM series)")
    for m in maps:
        if not m.is_file():
            raise FileNotFoundError(f"{index}: lists {m}, which does not exist")
    return maps


# -- command line ----------------------------------------------------------------------------------------------


def _node_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("node")
    g.add_argument("--host", required=True, help="the node's host name or address")
    g.add_argument("--port", required=True, type=int, help="its DICOM port")
    g.add_argument("--called-aet", required=True, help="its AE title")
    g.add_argument("--aet", default="PPIMED", help="this side's (calling) AE title, as the node knows it")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds per connection and reply")
    g.add_argument("--tls-ca", type=Path, help="CA bundle (PEM) to verify the node's certificate; turns TLS on")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for nodes that ask for one")
    g.add_argument("--tls-key", type=Path, help="the client certificate's private key (PEM)")
    g.add_argument("--tls-hostname", help="the name in the node's certificate (default: --host)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppi_med.pacs",
        description="Talk to a DICOM node (PACS): check it, query it, pull studies for data preparation, "
        "push the saliency Parametric Maps of an export.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("echo", help="C-ECHO: does the node answer and accept this AE?")
    _node_args(p)
    p = sub.add_parser("find", help="C-FIND: list what the node holds at one level")
    _node_args(p)
    p.add_argument("--level", default="STUDY", choices=_LEVELS, help="query level")
    p.add_argument("--patient-id")
    p.add_argument("--study-uid")
    p.add_argument("--series-uid")
    p = sub.add_parser("pull", help="C-FIND + C-GET a patient, study or series into OUT/<patient>/<study>/<series>")
    _node_args(p)
    p.add_argument("--patient-id")
    p.add_argument("--study-uid")
    p.add_argument("--series-uid")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p = sub.add_parser("push", help="C-STORE files, folders or an export's Parametric Maps")
    _node_args(p)
    p.add_argument("paths", nargs="*", type=Path, help="DICOM files or folders")
    p.add_argument("--index", type=Path, help="an export's index.csv: push the Parametric Maps it lists")
    p = sub.add_parser(
        "blend",
        help="write each Parametric Map of an export as colour Secondary Captures over its scan (no node needed)",
    )
    p.add_argument("--index", required=True, type=Path, help="the export's index.csv")
    p.add_argument("--series-root", required=True, type=Path, help="where the maps' source series are (e.g. a pull)")
    p.add_argument("--alpha", type=float, default=0.6, help="the saliency's opacity where |saliency| is 1")
    return parser


def _series_folders(root: Path) -> dict[str, Path]:
    """SeriesInstanceUID -> folder, for the folders of ``*.dcm`` files under ``root`` (by each one's first file)."""
    if not root.is_dir():
        raise FileNotFoundError(f"series root {root} is not a folder")
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(n for n in filenames if n.lower().endswith(".dcm") and not n.startswith("."))
        if names:
            try:
                ds = pydicom.dcmread(Path(dirpath) / names[0], stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - a folder whose first file is not DICOM holds no series
                continue
            found.setdefault(str(ds.get("SeriesInstanceUID", "")), Path(dirpath))
    return found


def blend_export(index: str | Path, series_root: str | Path, *, alpha: float = 0.6) -> list[Path]:
    """Blend every Parametric Map an export lists over its source series, found under ``series_root``.

    Each map ``<case>/<stem>.dcm`` gets ``<case>/<stem>_blend/`` (see
    :func:`ppi_med.dicom_blend.write_blended_series`); push those folders for viewers without parametric maps.

    Returns:
        The folders written.

    Raises:
        FileNotFoundError: the index, a map or ``series_root`` is missing, or a map's series is not under it.
        FileExistsError: a ``_blend`` folder exists (checked for all maps first: then nothing is written).
        ValueError: see :func:`ppi_med.dicom_blend.write_blended_series`.
    """
    from .dicom_blend import write_blended_series

    maps = exported_maps(index)
    folders = _series_folders(Path(series_root))
    plan = []
    for m in maps:
        ref = pydicom.dcmread(m, stop_before_pixels=True).get("ReferencedSeriesSequence", [])
        uid = str(ref[0].SeriesInstanceUID) if ref else ""
        if uid not in folders:
            raise FileNotFoundError(f"{m}: its source series {uid or '(none named)'} is not under {series_root}")
        out = m.with_name(f"{m.stem}_blend")
        if out.exists():
            raise FileExistsError(f"{out} exists; blended images are never written over")
        plan.append((m, folders[uid], out))
    for m, series, out in plan:
        write_blended_series(m, series, out, alpha=alpha)
    return [out for _, _, out in plan]


_COLUMNS = {
    "PATIENT": ["PatientID", "PatientName"],
    "STUDY": ["PatientID", "StudyInstanceUID", "StudyDate", "StudyDescription"],
    "SERIES": ["StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription"],
    "IMAGE": ["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"],
}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (see ``--help``).

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when the node could not do it, 2 on bad arguments or input.
    """
    args = _parser().parse_args(argv)
    if args.command == "blend":
        try:
            for folder in blend_export(args.index, args.series_root, alpha=args.alpha):
                print(folder)
        except (ValueError, FileNotFoundError, FileExistsError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        tls = None
        if args.tls_ca or args.tls_cert:
            tls = tls_context(args.tls_ca, args.tls_cert, args.tls_key)
        elif args.tls_key:
            raise ValueError("--tls-key needs --tls-cert")
        node = DicomNode(args.host, args.port, args.called_aet, args.aet, tls, args.tls_hostname, args.timeout)
        if args.command == "echo":
            echo(node)
            print(f"{node}: C-ECHO succeeded")
        elif args.command == "find":
            match = {
                k: v
                for k, v in (
                    ("PatientID", args.patient_id),
                    ("StudyInstanceUID", args.study_uid),
                    ("SeriesInstanceUID", args.series_uid),
                )
                if v
            }
            columns = _COLUMNS[args.level]
            rows = find(node, args.level, match, [c for c in columns if c not in match])
            print("\t".join(columns))
            for ds in rows:
                print("\t".join(str(ds.get(c, "")) for c in columns))
        elif args.command == "pull":
            result = pull(
                node, args.out, patient_id=args.patient_id, study_uid=args.study_uid, series_uid=args.series_uid
            )
            print(f"{result.n_instances} instance(s) in {len(result.series)} series pulled from {node}:")
            for folder in result.series:
                print(f"  {folder}")
        else:
            paths = list(args.paths) + (exported_maps(args.index) if args.index else [])
            if not paths:
                raise ValueError("push needs DICOM files or folders, or --index")
            result = push(node, paths)
            print(f"{len(result.sop_instance_uids)} instance(s) stored on {node}")
            for warning in result.warnings:
                print(f"  warning: {warning}")
    except PacsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
