"""The review server over a small real export: case list, files only from inside the export (path traversal
answers 404), grades checked against the index and saved atomically per reader, and the summary in MLflow."""

from __future__ import annotations

import csv
import http.client
import json
import os
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow import MlflowClient
from review_export import make_export, make_oct_export
from sklearn.metrics import cohen_kappa_score

from pipelines.review import server as review_server
from pipelines.review.__main__ import main
from pipelines.review.agreement import cohen_kappa, load_all_grades, summarise, summarise_export
from pipelines.review.cases import ReviewInputError, load_cases
from pipelines.review.grades import GRADE_COLUMNS
from pipelines.review.server import ReviewSetupError, make_server


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_export(tmp_path_factory.mktemp("review"))


@pytest.fixture
def served(export):
    """A running server over a fresh copy of the export's review folder (each test starts without grades)."""
    for f in (export / "review").glob("*.csv") if (export / "review").is_dir() else []:
        f.unlink()
    srv = make_server(export, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(srv, path: str) -> tuple[int, bytes]:
    """A raw GET: the path is sent exactly as given (no client-side normalisation of '..')."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    conn.request("GET", path)
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return res.status, body


def _post(srv, body) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/api/grades", body=data, headers={"Content-Type": "application/json"})
    res = conn.getresponse()
    out = json.loads(res.read())
    conn.close()
    return res.status, out


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_binds_to_loopback_and_lists_the_cases_of_the_index(served, export):
    assert served.server_address[0] == "127.0.0.1"
    status, body = _get(served, "/api/cases")
    data = json.loads(body)
    assert status == 200 and data["methods"] == ["gradient", "input_x_gradient"]
    by_id = {c["case_id"]: c for c in data["cases"]}
    assert set(by_id) == {"case0", "case1", "case2"}
    assert by_id["case2"]["label"] == 0 and by_id["case2"]["predicted_class"] == 1 and by_id["case2"]["outcome"] == "FP"
    assert by_id["case0"]["outcome"] == "TP" and by_id["case2"]["mask"] is None
    with open(export / "index.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    for c in data["cases"]:
        assert [(o["method"], o["target"]) for o in c["overlays"]] == [
            (r["method"], r["target"]) for r in index if r["case_id"] == c["case_id"]
        ]
        # every file URL serves exactly the export's file
        for url in [c["image"], c["mask"]] + [o["overlay"] for o in c["overlays"]]:
            if url is None:
                continue
            status, content = _get(served, url)
            assert status == 200 and content == (export / url[len("/files/") :]).read_bytes()
        peak = next(r for r in index if r["case_id"] == c["case_id"])["peak_ras_mm"]
        assert c["overlays"][0]["peak_ras_mm"] == pytest.approx([float(v) for v in peak.split(";")])
        # CT scans keep the three planes
        assert (c["modality"], c["layout"]) == (None, "planes")
    status, page = _get(served, "/")
    assert status == 200 and b"/static/review.js" in page
    status, lib = _get(served, "/static/niivue.js")
    assert status == 200 and b"Niivue" in lib
    status, view = _get(served, "/static/oct_view.js")
    assert status == 200 and b"class OctView" in view


@pytest.mark.slow
def test_an_oct_export_is_laid_out_b_scan_first_from_the_peak(tmp_path):
    export = make_oct_export(tmp_path)
    _, cases = load_cases(export)
    assert [(c.case_id, c.modality, c.layout, c.problems) for c in cases] == [
        ("A-000", "OCT", "bscan", []),
        ("A-001", "OCT", "bscan", []),
    ]
    for case in cases:
        for o in case.overlays:
            saliency = np.asarray(nib.load(export / o.overlay).dataobj)
            # the index's peak, back on the voxel grid: the largest saliency, so its B-scan is where the page starts
            assert tuple(o.peak_voxel) == np.unravel_index(np.argmax(saliency), saliency.shape)
    assert cases[0].to_json()["overlays"][0]["peak_voxel"] == cases[0].overlays[0].peak_voxel


def test_the_exports_modality_overrides_the_image_orientation(export):
    meta_path = export / "export.json"
    original = meta_path.read_text()
    meta = json.loads(original)
    try:
        # a CT export said to be OCT: its scans are not in the OCT convention, so three planes and the reason
        meta_path.write_text(json.dumps({**meta, "modality": "oct"}))
        _, cases = load_cases(export)
        assert {(c.modality, c.layout) for c in cases} == {("OCT", "planes")}
        assert all("not in the OCT (B-scan, depth, lateral) convention" in " ".join(c.problems) for c in cases)
        meta_path.write_text(json.dumps({**meta, "modality": "CT"}))
        _, cases = load_cases(export)
        assert {(c.modality, c.layout) for c in cases} == {("CT", "planes")}
        assert not any(c.problems for c in cases)
        for bad in (5, ""):
            meta_path.write_text(json.dumps({**meta, "modality": bad}))
            with pytest.raises(ReviewInputError, match=r"export.json: modality .* is not a name"):
                load_cases(export)
        meta_path.write_text("[1, 2")
        with pytest.raises(ReviewInputError, match="export.json: not a JSON object"):
            load_cases(export)
    finally:
        meta_path.write_text(original)


def test_path_traversal_and_everything_outside_the_export_get_404(served, export, tmp_path):
    secret = export.parent / "secret.txt"
    secret.write_text("not for the page")
    (export / "case0" / "link.txt").symlink_to(secret)
    (export / ".hidden").write_text("x")
    try:
        for path in [
            "/files/../secret.txt",
            "/files/case0/../../secret.txt",
            "/files/%2e%2e/secret.txt",
            "/files/..%2fsecret.txt",
            "/files/" + str(secret),  # an absolute path after the prefix
            "/files//etc/passwd",
            "/files/%2Fetc%2Fpasswd",
            "/files/case0/link.txt",  # a link out of the export
            "/files/case0",  # a folder
            "/files/.hidden",
            "/files/case0/image.nii.gz%00.png",
            "/static/../index.csv",
            "/../../etc/passwd",
        ]:
            status, body = _get(served, path)
            assert status == 404, path
            assert b"not for the page" not in body and b"root:" not in body
        assert _get(served, "/files/case0/image.nii.gz")[0] == 200  # the control: a real file is served
        # other readers' grades are not served either
        grade = {"reader": "anna", "case_id": "case0", "method": "gradient", "target": "predicted", "agrees": "no"}
        _post(served, grade)
        assert (export / "review" / "anna.csv").is_file()
        assert _get(served, "/files/review/anna.csv")[0] == 404
    finally:
        (export / "case0" / "link.txt").unlink()
        (export / ".hidden").unlink()


def test_grades_round_trip_and_are_checked_against_the_index(served, export):
    key = {"case_id": "case2", "method": "gradient", "target": "predicted"}
    status, out = _post(served, {"reader": "anna", **key, "coverage": "no finding"})
    assert status == 200 and out["rows"][0]["coverage"] == "no finding"
    status, _ = _post(served, {"reader": "anna", **key, "agrees": "no", "comment": 'air, "not" a lesion\nsecond line'})
    assert status == 200
    # the case-level answers go onto the case's other overlay as soon as it is graded
    status, out = _post(served, {"reader": "anna", **key, "method": "input_x_gradient", "coverage": "no"})
    rows = _rows(export / "review" / "anna.csv")
    assert [(r["case_id"], r["method"], r["coverage"], r["agrees"]) for r in rows] == [
        ("case2", "gradient", "no finding", "no"),
        ("case2", "input_x_gradient", "no", "no"),
    ]
    assert rows[0]["comment"] == rows[1]["comment"] == 'air, "not" a lesion\nsecond line'
    assert list(rows[0]) == list(GRADE_COLUMNS) and {r["reader"] for r in rows} == {"anna"}

    before = (export / "review" / "anna.csv").read_bytes()
    refused = [
        ({"reader": "anna", **key, "case_id": "case9", "coverage": "yes"}, "case9"),
        ({"reader": "anna", **key, "method": "gradcam", "coverage": "yes"}, "gradcam"),
        ({"reader": "anna", **key, "target": "1", "coverage": "yes"}, "target '1'"),
        ({"reader": "anna", **key, "coverage": "maybe"}, "coverage must be one of"),
        ({"reader": "anna", **key, "agrees": "perhaps"}, "agrees must be one of"),
        ({"reader": "anna", **key}, "nothing to save"),
        ({"reader": "../anna", **key, "coverage": "yes"}, "reader name"),
        ({"reader": "", **key, "coverage": "yes"}, "reader name"),
        ({"reader": "anna", **key, "comment": "x" * 5000}, "4000"),
    ]
    for body, message in refused:
        status, out = _post(served, body)
        assert status == 400 and message in out["error"], (body, out)
    status, out = _post(served, b"{not json")
    assert status == 400 and "not JSON" in out["error"]
    assert (export / "review" / "anna.csv").read_bytes() == before  # nothing refused was written
    assert sorted(p.name for p in (export / "review").iterdir()) == ["anna.csv"]  # no temporary file left behind

    # a second reader gets their own file; the first one's is left as it was
    status, _ = _post(served, {"reader": "ben", **key, "coverage": "partly"})
    assert status == 200 and (export / "review" / "anna.csv").read_bytes() == before
    status, out = _post(served, {"reader": "Anna", **key, "coverage": "yes"})
    assert status == 400 and "differs only by upper/lower case" in out["error"]

    # resumed: a new server reads the grades back
    served.shutdown()
    again = make_server(export, port=0)
    thread = threading.Thread(target=again.serve_forever, daemon=True)
    thread.start()
    try:
        status, body = _get(again, "/api/grades?reader=anna")
        got = json.loads(body)["grades"]
        assert status == 200 and [(g["method"], g["coverage"]) for g in got] == [
            ("gradient", "no finding"),
            ("input_x_gradient", "no"),
        ]
        assert json.loads(_get(again, "/api/grades?reader=carol")[1])["grades"] == []
        assert _get(again, "/api/grades?reader=..%2Fx")[0] == 400
    finally:
        again.shutdown()
        again.server_close()


def test_a_file_changed_outside_the_server_is_read_again_not_overwritten(served, export):
    key = {"case_id": "case0", "method": "gradient", "target": "predicted"}
    assert _post(served, {"reader": "dora", **key, "coverage": "yes"})[0] == 200
    path = export / "review" / "dora.csv"
    # the reader's file edited by hand (another session of the same reader): its row must survive the next save
    rows = _rows(path)
    rows.append({**rows[0], "case_id": "case1", "coverage": "partly"})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=GRADE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.utime(path, ns=(1, 1))  # a different stamp even within the clock's resolution
    assert _post(served, {"reader": "dora", **key, "comment": "clear"})[0] == 200
    assert {(r["case_id"], r["coverage"], r["comment"]) for r in _rows(path)} == {
        ("case0", "yes", "clear"),
        ("case1", "partly", ""),
    }


def test_cohen_kappa_matches_scikit_learn():
    a = ["yes", "yes", "no", "partly", "no", "yes", "no finding", "partly"]
    b = ["yes", "no", "no", "partly", "yes", "yes", "no finding", "no"]
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))
    assert cohen_kappa(["yes", "yes"], ["yes", "yes"]) != cohen_kappa(["yes", "yes"], ["yes", "yes"])  # nan
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa(["yes"], [])


def _write_grades(export: Path, reader: str, answers: dict) -> None:
    (export / "review").mkdir(exist_ok=True)
    with open(export / "review" / f"{reader}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=GRADE_COLUMNS)
        writer.writeheader()
        for (case, method), (coverage, agrees) in answers.items():
            writer.writerow(
                {"case_id": case, "method": method, "target": "predicted", "coverage": coverage, "agrees": agrees}
                | {"comment": "", "reader": reader, "updated": "2026-01-01T00:00:00"}
            )


@pytest.mark.slow
def test_summary_figures_and_mlflow(export, tmp_path, capsys):
    for f in (export / "review").glob("*.csv") if (export / "review").is_dir() else []:
        f.unlink()
    g, x = "gradient", "input_x_gradient"
    _write_grades(
        export,
        "anna",
        {
            ("case0", g): ("yes", "yes"),
            ("case1", g): ("partly", "yes"),
            ("case2", g): ("no finding", "no"),
            ("case0", x): ("no", "yes"),
            ("case1", x): ("yes", "yes"),
        },
    )
    _write_grades(
        export,
        "ben",
        {
            ("case0", g): ("yes", "yes"),
            ("case1", g): ("no", "no"),
            ("case2", g): ("no finding", "no"),
            ("case9", g): ("yes", "yes"),  # not in the index: left out
        },
    )
    with pytest.warns(UserWarning, match="case9"):
        _, grades = load_all_grades(export)
    table = summarise(grades).set_index("method")
    assert table.loc[g, "n_readers"] == 2 and table.loc[g, "n_grades"] == 6 and table.loc[g, "n_paired"] == 3
    # with a finding: anna yes, partly; ben yes, no -> 2 of 4 yes
    assert table.loc[g, "share_yes"] == pytest.approx(0.5) and table.loc[g, "share_no_finding"] == pytest.approx(2 / 6)
    assert table.loc[g, "pair_agreement"] == pytest.approx(2 / 3)
    expected = cohen_kappa_score(["yes", "partly", "no finding"], ["yes", "no", "no finding"])
    assert table.loc[g, "kappa"] == pytest.approx(expected)
    assert table.loc[g, "share_agrees"] == pytest.approx(3 / 6)
    assert table.loc[x, "share_yes"] == pytest.approx(0.5) and table.loc[x, "n_paired"] == 0
    assert table.loc[x, "kappa"] != table.loc[x, "kappa"]  # nan: one reader only

    # the export's run: export.json names runs/<run name>/models/..., the run of that name in the store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ga_ppi", artifact_location=(tmp_path / "artifacts").as_uri())
    # a new run goes to experiment 'review'; made here so that its artifacts stay under tmp_path
    review_exp = client.create_experiment("review", artifact_location=(tmp_path / "review_artifacts").as_uri())
    run = client.create_run(exp, run_name="ga-ppi-test-run")
    meta = json.loads((export / "export.json").read_text())
    meta_path = export / "export.json"
    original = meta_path.read_text()
    meta_path.write_text(json.dumps({**meta, "checkpoint": "runs/ga-ppi-test-run/models/model_best.pt"}))
    try:
        with pytest.warns(UserWarning, match="case9"):
            summary, run_id, how = summarise_export(export, tracking_uri=uri)
    finally:
        meta_path.write_text(original)
    assert (run_id, how) == (run.info.run_id, "export")
    logged = client.get_run(run_id).data.metrics
    assert logged[f"review/{g}/kappa"] == pytest.approx(expected)
    assert logged[f"review/{g}/share_yes"] == pytest.approx(0.5)
    arts = {a.path for a in client.list_artifacts(run_id, "review/grades")}
    assert arts == {"review/grades/anna.csv", "review/grades/ben.csv"}
    assert len(list((export / "review" / "summaries").glob("summary-*.csv"))) == 1

    # the command line, into a given run, and a new run when the export's run is not in the store
    other = client.create_run(exp, run_name="other")
    with pytest.warns(UserWarning, match="case9"):
        assert main(["--summarise", str(export), "--tracking-uri", uri, "--run-id", other.info.run_id]) == 0
    assert f"logged to the given run {other.info.run_id}" in capsys.readouterr().out
    assert client.get_run(other.info.run_id).data.metrics[f"review/{x}/share_yes"] == pytest.approx(0.5)
    with pytest.warns(UserWarning, match="case9"):
        assert main(["--summarise", str(export), "--tracking-uri", uri]) == 0
    assert "logged to a new run" in capsys.readouterr().out
    (new,) = client.search_runs([review_exp])
    assert new.data.tags["kind"] == "review" and new.data.metrics[f"review/{g}/n_paired"] == 3
    assert main(["--summarise", str(export), "--tracking-uri", uri, "--run-id", "0" * 32]) == 2
    assert "not found" in capsys.readouterr().err
    assert len(list((export / "review" / "summaries").glob("summary-*.csv"))) >= 3  # earlier ones kept


def test_bad_export_folders_and_a_missing_viewer_are_named(tmp_path, export, monkeypatch, capsys):
    with pytest.raises(ReviewInputError, match="not a folder"):
        load_cases(tmp_path / "nowhere")
    with pytest.raises(ReviewInputError, match="index.csv: not found; export overlays first"):
        load_cases(tmp_path)
    (tmp_path / "index.csv").write_text("case_id,label\nx,1\n")
    with pytest.raises(ReviewInputError, match=r"not an export index, columns \['predicted_class'"):
        load_cases(tmp_path)
    header = (export / "index.csv").read_text().splitlines()[0]
    (tmp_path / "index.csv").write_text(header + "\n")
    with pytest.raises(ReviewInputError, match="has no rows"):
        load_cases(tmp_path)
    line = (export / "index.csv").read_text().splitlines()[1].replace(",1,1,", ",1,one,", 1)
    (tmp_path / "index.csv").write_text(header + "\n" + line + "\n")
    with pytest.raises(ReviewInputError, match=r"line 2: predicted_class 'one' is not a number"):
        load_cases(tmp_path)
    # an index whose files are elsewhere: the case is listed with its problems, nothing outside is read
    good = (export / "index.csv").read_text().splitlines()[1]
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "index.csv").write_text(header + "\n" + good + "\n")
    _, cases = load_cases(moved)
    assert cases[0].image is None and any("not inside the export folder" in p for p in cases[0].problems)
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    monkeypatch.setattr(review_server, "NIIVUE_BUNDLE", tmp_path / "missing" / "index.js")
    with pytest.raises(ReviewSetupError, match="run make install"):
        make_server(export, port=0)
    assert main([str(export), "--port", "0"]) == 2
    assert "run make install" in capsys.readouterr().err
