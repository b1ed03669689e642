"""A real PACS in the loop (ppi_med.pacs): Orthanc on loopback, a CT series in, the saliency map back out.

The module fixture starts its own Orthanc (``Orthanc CONFIG.json``) on free loopback ports with a temporary
store, checking the called AE title and allowing only the test's AE, and stops it at the end. A CT-like series
written with pydicom is stored in it, pulled back by study UID (C-FIND + C-GET), read by the data preparation
(data_prep.dicom_series) and exported with WBP by the real exporter; the export's Parametric Map is pushed
(C-STORE), found again (C-FIND) and fetched back, and its references and per-frame geometry are checked
against the series as written. Orthanc's REST API counts the instances independently of the code under test.
The tests without ``orthanc`` run without a node (errors found before connecting, a closed port).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from ct_series import write_ct_series
from local_servers import free_ports
from matplotlib import colormaps
from monai.transforms import Compose, EnsureTyped, LoadImaged, Orientationd, ResizeWithPadOrCropd, ScaleIntensityRanged
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, RLELossless, generate_uid
from torch import nn

from data_prep.dicom_series import DicomIndex, read_ct_series
from ppi_med import pacs
from ppi_med.dicom_blend import write_blended_series
from ppi_med.dicom_overlay import write_parametric_map
from ppi_med.export import export_saliency
from ppi_med.pacs import AssociationRejected, DicomNode, NodeUnreachable, NotFound, TransferFailed
from ppi_med.saliency_spec import SaliencySpec

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ORTHANC_AET, TEST_AET = "PPI-PACS", "PPITEST"


def _orthanc_binary() -> str | None:
    # Debian installs it in /usr/sbin, which is not on every user's PATH
    return shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)


def _rest(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.load(resp)


class Orthanc:
    """A running Orthanc: its DICOM node for the test's AE and its REST port."""

    def __init__(self, dicom_port: int, http_port: int, log: Path) -> None:
        self.node = DicomNode("127.0.0.1", dicom_port, ORTHANC_AET, TEST_AET, timeout=10)
        self.http_port, self.log = http_port, log

    def count(self) -> int:
        return int(_rest(self.http_port, "/statistics")["CountInstances"])


@contextlib.contextmanager
def _running_orthanc(root: Path, **settings) -> Iterator[Orthanc]:
    """An Orthanc with its store in ``root``, on free loopback ports; ``settings`` add to its configuration."""
    binary = _orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc; .ci/run installs it)")
    dicom_port, http_port, modality_port = free_ports(3)
    config = {
        "Name": "ppi-med test PACS",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        # a hospital PACS's habits: the called AE title must be its own, and only known AEs may do anything
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {"ppi-med": {"AET": TEST_AET, "Host": "127.0.0.1", "Port": modality_port}},
        **settings,
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    log = root / "orthanc.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([binary, str(root / "config.json")], stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _rest(http_port, "/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-3000:]
                    raise RuntimeError(f"Orthanc did not start (exit {proc.poll()}):\n{tail}") from None
                time.sleep(0.1)
        yield Orthanc(dicom_port, http_port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with _running_orthanc(tmp_path_factory.mktemp("orthanc")) as node:
        yield node


# -- a CT-like series and a network WBP explains -----------------------------------------------------------------

GEOMETRY = {"spacing": (0.8, 0.7), "step": 2.5, "origin": (-12.0, 20.5, -60.0)}


def _write_ct_series(
    folder: Path, vol: np.ndarray, patient: str = "PACS-PHANTOM", study: str | None = None, series: str | None = None
) -> list[Path]:
    """``vol[k, r, c]`` as an axial CT series (slice k, row r, column c) on GEOMETRY, written out of slice order,
    with the patient and study attributes a PACS query shows."""
    return write_ct_series(
        folder,
        vol,
        pixel_spacing=GEOMETRY["spacing"],
        step=GEOMETRY["step"],
        origin=GEOMETRY["origin"],
        patient=patient,
        study=study,
        series=series,
        PatientName="Phantom^Pacs",
        PatientSex="O",
        PatientBirthDate="19700101",
        StudyDate="20240102",
        StudyTime="101500",
        AccessionNumber="ACC42",
        StudyID="7",
        SeriesNumber=3,
        SeriesDescription="chest",
    )


def _ct_volume() -> np.ndarray:
    rng = np.random.default_rng(1)
    vol = rng.normal(-800, 30, (8, 20, 18))
    k, r, c = np.indices(vol.shape)
    vol[(k - 4) ** 2 / 4 + (r - 9) ** 2 / 9 + (c - 11) ** 2 / 9 <= 1] = 60  # a nodule, off-centre
    return vol


class NoduleNet(nn.Module):
    """Two logits from one convolution: layers WBP has rules for, and a saliency with a spatial pattern."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool3d(1))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def _preprocessing() -> Compose:
    return Compose(
        [
            LoadImaged("image", image_only=True, ensure_channel_first=True),
            Orientationd("image", axcodes="RAS"),
            ScaleIntensityRanged("image", a_min=-1000, a_max=400, b_min=0.0, b_max=1.0, clip=True),
            ResizeWithPadOrCropd("image", spatial_size=(24, 24, 8)),
            EnsureTyped("image", dtype=torch.float32),
        ]
    )


@pytest.fixture(scope="module")
def stored_ct(orthanc, tmp_path_factory) -> list[Path]:
    """The CT series, written and stored in Orthanc (C-STORE through ppi_med.pacs)."""
    files = _write_ct_series(tmp_path_factory.mktemp("ct") / "series", _ct_volume())
    before = orthanc.count()
    sent = pacs.push(orthanc.node, [files[0].parent])
    assert len(sent.sop_instance_uids) == len(files) and not sent.warnings
    assert orthanc.count() == before + len(files)
    return files


def _headers(files) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}


# -- the loop -------------------------------------------------------------------------------------------------


@pytest.mark.pacs
def test_echo_and_find_the_stored_study(orthanc, stored_ct):
    pacs.echo(orthanc.node)
    first = pydicom.dcmread(stored_ct[0])
    (study,) = pacs.find(orthanc.node, "STUDY", {"PatientID": "PACS-PHANTOM"}, ["AccessionNumber"])
    assert study.StudyInstanceUID == first.StudyInstanceUID and study.AccessionNumber == "ACC42"
    images = pacs.find(orthanc.node, "IMAGE", {"SeriesInstanceUID": first.SeriesInstanceUID}, ["InstanceNumber"])
    assert sorted(int(d.InstanceNumber) for d in images) == list(range(1, len(stored_ct) + 1))


@pytest.mark.pacs
def test_pull_prepare_export_push_and_query_the_map_back(orthanc, stored_ct, tmp_path):
    node, source = orthanc.node, _headers(stored_ct)
    first = next(iter(source.values()))

    # pull by study UID: every slice comes back, byte-identical pixels, in the TCIA-like layout
    pulled = pacs.pull(node, tmp_path / "pulled", study_uid=first.StudyInstanceUID)
    (folder,) = pulled.series
    assert folder == tmp_path / "pulled" / "PACS-PHANTOM" / first.StudyInstanceUID / first.SeriesInstanceUID
    assert pulled.n_instances == len(stored_ct) and not list((tmp_path / "pulled").glob(".pull-*"))
    got = _headers(sorted(folder.glob("*.dcm")))
    assert set(got) == set(source)
    for uid, ds in got.items():
        assert np.array_equal(ds.pixel_array, source[uid].pixel_array)
        assert ds.ImagePositionPatient == source[uid].ImagePositionPatient

    # the data preparation reads the pulled folder as it reads a download
    index = DicomIndex(tmp_path / "pulled")
    files = index.find_series("PACS-PHANTOM", first.StudyInstanceUID, first.SeriesInstanceUID)
    ct = read_ct_series(files, first.SeriesInstanceUID)
    assert ct.hu.shape == (20, 18, 8) and np.isclose(ct.slice_spacing, GEOMETRY["step"])

    # the real exporter writes WBP as a Parametric Map over the pulled series; it goes back to the PACS
    spec = SaliencySpec(NoduleNet(), _preprocessing(), str(folder), methods="wbp", progress=False)
    export_index = export_saliency(spec, tmp_path / "export", montage=False)
    (map_file,) = pacs.exported_maps(export_index)
    local = pydicom.dcmread(map_file)
    before = orthanc.count()
    pushed = pacs.push(node, pacs.exported_maps(export_index))
    assert pushed.sop_instance_uids == (local.SOPInstanceUID,) and orthanc.count() == before + 1

    # queried back: the study now has the CT series and the map's series
    series = pacs.find(node, "SERIES", {"StudyInstanceUID": first.StudyInstanceUID}, ["Modality", "SeriesDescription"])
    by_uid = {str(s.SeriesInstanceUID): s for s in series}
    assert set(by_uid) == {first.SeriesInstanceUID, local.SeriesInstanceUID}
    assert by_uid[local.SeriesInstanceUID].SeriesDescription == local.SeriesDescription
    (image,) = pacs.find(
        node,
        "IMAGE",
        {"StudyInstanceUID": first.StudyInstanceUID, "SeriesInstanceUID": local.SeriesInstanceUID},
        ["SOPClassUID"],
    )
    assert image.SOPInstanceUID == local.SOPInstanceUID and image.SOPClassUID == PARAMETRIC_MAP

    # fetched back from the PACS, the map references the source series and sits on its slices
    back = pacs.pull(node, tmp_path / "maps", series_uid=local.SeriesInstanceUID)
    (map_back,) = back.series[0].glob("*.dcm")
    pm = pydicom.dcmread(map_back)
    assert pm.SOPClassUID == PARAMETRIC_MAP and pm.SOPInstanceUID == local.SOPInstanceUID
    assert pm.StudyInstanceUID == first.StudyInstanceUID and pm.PatientID == first.PatientID
    assert pm.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert (pm.AccessionNumber, pm.PatientName) == (first.AccessionNumber, first.PatientName)
    (ref,) = pm.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in ref.ReferencedInstanceSequence} <= set(source)
    shared = pm.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], GEOMETRY["spacing"])
    assert (pm.Rows, pm.Columns) == (first.Rows, first.Columns)
    frames = pm.PerFrameFunctionalGroupsSequence
    assert int(pm.NumberOfFrames) == len(frames) >= 2
    for frame in frames:
        src = source[str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        orientation = frame.get("PlaneOrientationSequence", shared.PlaneOrientationSequence)[0]
        assert np.allclose([float(v) for v in orientation.ImageOrientationPatient], src.ImageOrientationPatient)
        spacing = frame.get("PixelMeasuresSequence", shared.PixelMeasuresSequence)[0]
        assert np.allclose([float(v) for v in spacing.PixelSpacing], [float(v) for v in src.PixelSpacing])
    assert np.array_equal(pm.pixel_array, local.pixel_array) and np.abs(pm.pixel_array).max() > 0

    # pushing the same map again stores nothing new: same SOP Instance UID, one instance
    count = orthanc.count()
    again = pacs.push(node, [map_file])
    assert again.sop_instance_uids == pushed.sop_instance_uids
    assert orthanc.count() == count
    assert len(pacs.find(node, "IMAGE", {"SeriesInstanceUID": local.SeriesInstanceUID})) == 1

    # for viewers without parametric maps: the map blended into the pulled scan, pushed as its own series
    assert pacs.main(["blend", "--index", str(export_index), "--series-root", str(tmp_path / "pulled")]) == 0
    blend = map_file.with_name(f"{map_file.stem}_blend")
    n_frames = int(pm.NumberOfFrames)
    sent = pacs.push(node, [blend])
    assert len(sent.sop_instance_uids) == n_frames and orthanc.count() == count + n_frames
    # done already, or without the scan's series: refused, nothing written
    assert pacs.main(["blend", "--index", str(export_index), "--series-root", str(tmp_path / "pulled")]) == 2
    shutil.rmtree(blend)
    assert pacs.main(["blend", "--index", str(export_index), "--series-root", str(tmp_path / "maps")]) == 2
    assert not blend.exists()
    assert pacs.main(["blend", "--index", str(export_index), "--series-root", str(tmp_path / "pulled")]) == 0
    series = pacs.find(node, "SERIES", {"StudyInstanceUID": first.StudyInstanceUID}, ["Modality"])
    assert len(series) == 3
    pacs.push(node, [blend])  # blended again and pushed again: the same instances, kept once
    assert orthanc.count() == count + n_frames


# -- bad inputs: a clear error naming the node, and nothing written ------------------------------------------------


def _nothing_written(out: Path) -> bool:
    return not out.exists()


@pytest.mark.pacs
def test_a_rejected_association_names_the_node_and_the_reason(orthanc, stored_ct, tmp_path):
    uid = str(pydicom.dcmread(stored_ct[0]).StudyInstanceUID)
    good = orthanc.node
    wrong_called = DicomNode(good.host, good.port, "NOT-THE-PACS", TEST_AET, timeout=5)
    with pytest.raises(AssociationRejected, match=r"NOT-THE-PACS@127\.0\.0\.1:\d+ .*[Cc]alled AE title not recognised"):
        pacs.pull(wrong_called, tmp_path / "out", study_uid=uid)
    assert _nothing_written(tmp_path / "out")

    stranger = DicomNode(good.host, good.port, ORTHANC_AET, "STRANGER", timeout=5)
    with pytest.raises(AssociationRejected, match=r"calling AE STRANGER.*[Cc]alling AE title not recognised"):
        pacs.pull(stranger, tmp_path / "out", study_uid=uid)
    assert _nothing_written(tmp_path / "out")
    count = orthanc.count()
    with pytest.raises(AssociationRejected, match="STRANGER"):
        pacs.push(stranger, stored_ct[:1])
    assert orthanc.count() == count


@pytest.mark.pacs
def test_a_study_the_node_does_not_hold_is_not_found(orthanc, stored_ct, tmp_path):
    missing = generate_uid()
    with pytest.raises(NotFound, match=rf"{ORTHANC_AET}@127\.0\.0\.1:\d+ .*no instances found for study {missing}"):
        pacs.pull(orthanc.node, tmp_path / "deep" / "out", study_uid=missing)
    assert _nothing_written(tmp_path / "deep")
    with pytest.raises(NotFound, match="no instances found for series"):
        pacs.pull(orthanc.node, tmp_path / "deep" / "out", series_uid=generate_uid())
    assert _nothing_written(tmp_path / "deep")
    # a series folder pulled before is not overwritten; nothing is fetched
    first = pydicom.dcmread(stored_ct[0])
    done = pacs.pull(orthanc.node, tmp_path / "out", series_uid=first.SeriesInstanceUID)
    stamp = {p: p.stat().st_mtime_ns for p in done.series[0].iterdir()}
    with pytest.raises(FileExistsError, match=f"{first.SeriesInstanceUID} exists"):
        pacs.pull(orthanc.node, tmp_path / "out", study_uid=first.StudyInstanceUID)
    assert {p: p.stat().st_mtime_ns for p in done.series[0].iterdir()} == stamp
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["PACS-PHANTOM"]


@pytest.mark.pacs
def test_a_pull_that_fails_half_way_leaves_nothing(orthanc, tmp_path):
    """A study of two series, the second (in UID order, the order a pull fetches) one slice stored as MPEG-2
    video, which a pull does not accept (pydicom cannot decode it) and the node cannot transcode: its C-GET
    fails after the first series has arrived, and the pull must leave no half-pulled study behind."""
    study = generate_uid()[:50]  # room for the series' suffixes
    good = _write_ct_series(tmp_path / "a", _ct_volume()[:3], patient="PACS-BROKEN", study=study, series=f"{study}.1")
    (bad,) = _write_ct_series(tmp_path / "b", _ct_volume()[:1], patient="PACS-BROKEN", study=study, series=f"{study}.2")
    broken = pydicom.dcmread(bad)
    broken.file_meta.TransferSyntaxUID = MPEG2MPML
    broken.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # an MPEG-2 sequence header start
    broken.save_as(bad, enforce_file_format=True)
    pacs.push(orthanc.node, [*good, bad])
    out = tmp_path / "pulled"
    out.mkdir()
    (out / "kept.txt").write_text("already here")
    with pytest.raises(
        TransferFailed,
        match=rf"{ORTHANC_AET}@127\.0\.0\.1:\d+ .*C-GET of series {study}\.2 .* failed, status 0x.*; 3 of 4 listed "
        "instances had arrived, none is kept",
    ):
        pacs.pull(orthanc.node, out, study_uid=study)
    assert sorted(p.name for p in out.iterdir()) == ["kept.txt"]  # no series folder, no temporary folder


@pytest.mark.pacs
def test_a_compressed_series_comes_as_stored(orthanc, tmp_path):
    """An RLE series (pydicom decodes it) is fetched untouched; the data preparation reads its pixels."""
    files = _write_ct_series(tmp_path / "src", _ct_volume()[:2], patient="PACS-RLE")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(f, enforce_file_format=True)
    pacs.push(orthanc.node, files)
    first = pydicom.dcmread(files[0])
    (folder,) = pacs.pull(orthanc.node, tmp_path / "out", patient_id="PACS-RLE").series
    source = _headers(files)
    for uid, ds in _headers(folder.glob("*.dcm")).items():
        assert ds.file_meta.TransferSyntaxUID == RLELossless and ds.PixelData == source[uid].PixelData
    ct = read_ct_series(sorted(folder.glob("*.dcm")), first.SeriesInstanceUID)
    assert np.array_equal(ct.hu[:, :, 0], _ct_volume()[0].astype(np.int16))


@pytest.mark.pacs
def test_the_command_line_pulls_and_reports_errors(orthanc, stored_ct, tmp_path, capsys):
    node = orthanc.node
    common = ["--host", node.host, "--port", str(node.port), "--called-aet", node.called_aet, "--aet", TEST_AET]
    assert pacs.main(["echo", *common]) == 0
    first = pydicom.dcmread(stored_ct[0])
    out = tmp_path / "cli"
    assert pacs.main(["pull", *common, "--series-uid", first.SeriesInstanceUID, "--out", str(out)]) == 0
    assert f"{len(stored_ct)} instance(s) in 1 series pulled" in capsys.readouterr().out
    assert len(list(out.glob("*/*/*/*.dcm"))) == len(stored_ct)
    assert pacs.main(["find", *common, "--level", "SERIES", "--study-uid", first.StudyInstanceUID]) == 0
    assert f"{first.SeriesInstanceUID}\tCT\t3\tchest" in capsys.readouterr().out
    count = orthanc.count()
    assert pacs.main(["push", *common, str(stored_ct[0])]) == 0  # stored before: kept once
    assert "1 instance(s) stored" in capsys.readouterr().out and orthanc.count() == count
    assert pacs.main(["pull", *common, "--study-uid", generate_uid(), "--out", str(tmp_path / "none")]) == 1
    assert "no instances found" in capsys.readouterr().err and not (tmp_path / "none").exists()


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a CA that signed none."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed; the TLS test makes its certificates with it")
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    new_key = ["-newkey", "rsa:2048", "-nodes", "-days", "1"]
    for ca in ("ca", "other"):
        run("req", "-x509", *new_key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN=test {ca}")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "1",
            *extra,
        )
    names = ("ca.crt", "other.crt", "server.crt", "server.key", "client.crt", "client.key")
    return {name: folder / name for name in names}


@pytest.mark.pacs
def test_tls_with_a_client_certificate(tmp_path):
    """A node that speaks only TLS and wants a client certificate signed by its CA (DicomTlsEnabled)."""
    certs = _certificates(tmp_path / "certs")
    tls = {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs["server.crt"]),
        "DicomTlsPrivateKey": str(certs["server.key"]),
        "DicomTlsTrustedCertificates": str(certs["ca.crt"]),
        "DicomTlsRemoteCertificateRequired": True,
    }
    (tmp_path / "orthanc").mkdir()
    with _running_orthanc(tmp_path / "orthanc", **tls) as orthanc:
        plain = orthanc.node
        good = pacs.tls_context(certs["ca.crt"], certs["client.crt"], certs["client.key"])
        node = DicomNode(plain.host, plain.port, plain.called_aet, TEST_AET, tls=good, timeout=10)
        files = _write_ct_series(tmp_path / "src", _ct_volume()[:2], patient="PACS-TLS")
        assert len(pacs.push(node, files).sop_instance_uids) == 2 and orthanc.count() == 2
        (folder,) = pacs.pull(node, tmp_path / "out", patient_id="PACS-TLS").series
        assert set(_headers(folder.glob("*.dcm"))) == set(_headers(files))
        cli = ["echo", "--host", plain.host, "--port", str(plain.port), "--called-aet", plain.called_aet]
        cli += ["--aet", TEST_AET, "--tls-ca", str(certs["ca.crt"])]
        assert pacs.main([*cli, "--tls-cert", str(certs["client.crt"]), "--tls-key", str(certs["client.key"])]) == 0
        assert pacs.main(cli) == 1  # no client certificate

        without_cert = DicomNode(plain.host, plain.port, ORTHANC_AET, TEST_AET, tls=pacs.tls_context(certs["ca.crt"]))
        with pytest.raises(AssociationRejected, match=r"\(calling AE PPITEST, TLS\): .*certificate required"):
            pacs.echo(without_cert)
        other_ca = pacs.tls_context(certs["other.crt"], certs["client.crt"], certs["client.key"])
        untrusted = DicomNode(plain.host, plain.port, ORTHANC_AET, TEST_AET, tls=other_ca)
        with pytest.raises(AssociationRejected, match="CERTIFICATE_VERIFY_FAILED"):
            pacs.pull(untrusted, tmp_path / "untrusted", patient_id="PACS-TLS")
        assert not (tmp_path / "untrusted").exists()
        with pytest.raises(AssociationRejected, match="a TLS-only port"):
            pacs.echo(plain)


# -- without a node --------------------------------------------------------------------------------------------


def test_nothing_listening_names_the_node_and_writes_nothing(tmp_path):
    (port,) = free_ports(1)  # bound and released: nothing listens there
    node = DicomNode("127.0.0.1", port, "SOMEPACS", "PPIMED", timeout=3)
    with pytest.raises(NodeUnreachable, match=rf"SOMEPACS@127\.0\.0\.1:{port} \(calling AE PPIMED\): nothing answers"):
        pacs.pull(node, tmp_path / "out", study_uid="1.2.3")
    assert not (tmp_path / "out").exists()
    with pytest.raises(NodeUnreachable, match="refused"):
        pacs.echo(node)


@pytest.mark.slow  # the look-up may wait on a DNS resolver
def test_a_host_name_that_does_not_resolve_names_the_node(tmp_path):
    nowhere = DicomNode("no-such-host.invalid", 104, "SOMEPACS", timeout=3)  # .invalid never resolves (RFC 2606)
    with pytest.raises(NodeUnreachable, match=r"SOMEPACS@no-such-host\.invalid:104 .*cannot reach"):
        pacs.pull(nowhere, tmp_path / "out", study_uid="1.2.3")
    assert not (tmp_path / "out").exists()


def test_bad_requests_are_refused_before_connecting(tmp_path):
    node = DicomNode("127.0.0.1", 9, "SOMEPACS")  # the discard port: a request that got this far would hang
    with pytest.raises(ValueError, match="not a DICOM UID"):
        pacs.pull(node, tmp_path / "out", study_uid="1.2.3; rm")
    with pytest.raises(ValueError, match="no wildcards"):
        pacs.pull(node, tmp_path / "out", patient_id="LIDC*")
    with pytest.raises(ValueError, match="needs a patient id"):
        pacs.pull(node, tmp_path / "out")
    with pytest.raises(ValueError, match="level 'FRAME'"):
        pacs.find(node, "FRAME")
    with pytest.raises(ValueError, match="calling_aet 'A-TITLE-THAT-IS-TOO-LONG'"):
        DicomNode("127.0.0.1", 104, "PACS", "A-TITLE-THAT-IS-TOO-LONG")
    (tmp_path / "notes.dcm").write_text("not DICOM")
    with pytest.raises(ValueError, match="notes.dcm: not a DICOM file"):
        pacs.push(node, [tmp_path / "notes.dcm"])
    with pytest.raises(FileNotFoundError, match="TLS CA bundle"):
        pacs.tls_context(tmp_path / "ca.pem")
    (tmp_path / "index.csv").write_text("case_id,overlay\na,x.nii.gz\n")
    with pytest.raises(ValueError, match="no dicom_overlay column"):
        pacs.exported_maps(tmp_path / "index.csv")
    assert not (tmp_path / "out").exists()


def _map_over(folder: Path, path: Path, marks: dict[tuple[int, int, int], float]) -> Path:
    """A Parametric Map over the axial series in ``folder`` that is ``value`` at each (slice, row, column) mark
    and zero elsewhere: on the series' own grid, so each frame holds the marks exactly."""
    (dr, dc), step, (x0, y0, z0) = GEOMETRY["spacing"], GEOMETRY["step"], GEOMETRY["origin"]
    first = pydicom.dcmread(next(folder.glob("*.dcm")))
    overlay = np.zeros((int(first.Columns), int(first.Rows), 8), dtype=np.float32)  # [column, row, slice]
    for (k, r, c), value in marks.items():
        overlay[c, r, k] = value
    affine = np.diag([-dc, -dr, step, 1.0])  # LPS (x0 + c dc, y0 + r dr, z0 + k step) as RAS
    affine[:3, 3] = [-x0, -y0, z0]
    return write_parametric_map(path, overlay, affine, folder, description="marks")


@pytest.mark.slow
def test_a_map_blended_into_its_scan_as_secondary_captures(tmp_path):
    files = _write_ct_series(tmp_path / "series", _ct_volume())
    source = {float(ds.ImagePositionPatient[2]): ds for ds in (pydicom.dcmread(f) for f in files)}
    pm_path = _map_over(tmp_path / "series", tmp_path / "map.dcm", {(2, 6, 5): 1.0, (2, 12, 10): -0.5, (5, 3, 3): 1.0})
    pm = pydicom.dcmread(pm_path)
    out = write_blended_series(pm_path, tmp_path / "series", tmp_path / "blend", alpha=0.6, window=(-400.0, 1600.0))
    blended = {float(ds.ImagePositionPatient[2]): ds for ds in map(pydicom.dcmread, out)}
    z0, step = GEOMETRY["origin"][2], GEOMETRY["step"]
    assert sorted(blended) == [z0 + 2 * step, z0 + 5 * step]  # one image per map frame: slices 2 and 5
    k2 = blended[z0 + 2 * step]
    assert k2.SOPClassUID == SECONDARY_CAPTURE and k2.PhotometricInterpretation == "RGB"
    src = source[z0 + 2 * step]
    assert k2.ImageOrientationPatient == src.ImageOrientationPatient and k2.PixelSpacing == src.PixelSpacing
    assert k2.FrameOfReferenceUID == src.FrameOfReferenceUID and k2.StudyInstanceUID == src.StudyInstanceUID
    assert (k2.PatientID, k2.AccessionNumber, list(k2.PatientOrientation)) == ("PACS-PHANTOM", "ACC42", ["L", "P"])
    assert k2.SeriesInstanceUID not in (src.SeriesInstanceUID, pm.SeriesInstanceUID)
    slice_ref, map_ref = k2.SourceImageSequence
    assert slice_ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert map_ref.ReferencedSOPInstanceUID == pm.SOPInstanceUID
    frame = pm.PerFrameFunctionalGroupsSequence[int(map_ref.ReferencedFrameNumber) - 1]
    assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    # grey is the window, red paints +1 at 60 % opacity, blue -0.5 at 30 %, and zero leaves the scan alone
    rgb, hu = k2.pixel_array.astype(float), src.pixel_array.astype(float)
    grey = np.clip((hu + 1200.0) / 1600.0, 0, 1) * 255
    red, blue = (np.array(colormaps["RdBu_r"](v)[:3]) * 255 for v in (1.0, 0.25))
    assert np.allclose(rgb[6, 5], 0.4 * grey[6, 5] + 0.6 * red, atol=0.51)
    assert np.allclose(rgb[12, 10], 0.7 * grey[12, 10] + 0.3 * blue, atol=0.51)
    assert red[0] > red[2] and blue[2] > blue[0]  # RdBu_r: red for +, blue for -
    untouched = np.ones(hu.shape, bool)
    untouched[5:8, 4:7] = untouched[11:14, 9:12] = False  # the marks and their linear spread
    assert np.allclose(rgb[untouched], np.round(grey[untouched])[:, None], atol=0.51)
    # blending again gives the same instances (a PACS keeps them once); nothing is written over
    again = write_blended_series(pm_path, tmp_path / "series", tmp_path / "again", alpha=0.6, window=(-400.0, 1600.0))
    assert [pydicom.dcmread(p).SOPInstanceUID for p in again] == [pydicom.dcmread(p).SOPInstanceUID for p in out]
    with pytest.raises(FileExistsError, match="blend exists"):
        write_blended_series(pm_path, tmp_path / "series", tmp_path / "blend")
    other = _write_ct_series(tmp_path / "other", _ct_volume())[0].parent
    with pytest.raises(ValueError, match="references series .* but .*other holds series"):
        write_blended_series(pm_path, other, tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.glob(".wrong.*"))
