"""The review page's HTTP server (standard library ``ThreadingHTTPServer``) over one export folder.

Routes:

- ``GET /``: the page; ``GET /static/<name>``: its scripts (``review.js``, ``oct_view.js``: the B-scan-first
  view of OCT volumes) and style, and ``niivue.js``, NiiVue's ES-module
  bundle from ``web/node_modules`` (installed by ``make install``);
- ``GET /api/cases``: the cases of ``index.csv`` with their overlays and file URLs;
- ``GET /files/<path>``: a file inside the export folder; anything that resolves outside it (``..``, an absolute
  path, a symbolic link out), a hidden file, a folder or the ``review/`` folder of grades answers 404;
- ``GET /api/grades?reader=NAME``: that reader's grades; ``POST /api/grades``: one change of a grade (JSON),
  checked against the index and saved at once.

It binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import mimetypes
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .cases import Case, ReviewInputError, load_cases, overlay_keys
from .grades import AGREES, COVERAGE, GradeError, GradeStore

__all__ = ["WEB_DIR", "NIIVUE_BUNDLE", "ReviewSetupError", "ReviewServer", "make_server", "niivue_bundle"]

WEB_DIR = Path(__file__).resolve().parent / "web"
NIIVUE_BUNDLE = WEB_DIR / "node_modules" / "@niivue" / "niivue" / "dist" / "index.js"
_STATIC = {"review.js": "text/javascript", "oct_view.js": "text/javascript", "review.css": "text/css"}
_MAX_BODY = 64 * 1024


class ReviewSetupError(RuntimeError):
    """The page cannot be served from this checkout (NiiVue not installed)."""


def niivue_bundle() -> Path:
    """NiiVue's ES-module bundle.

    Raises:
        ReviewSetupError: it is not installed.
    """
    if not NIIVUE_BUNDLE.is_file():
        raise ReviewSetupError(
            f"the NiiVue viewer is not installed ({NIIVUE_BUNDLE} is missing): run make install "
            f"(or: npm ci --prefix {WEB_DIR})"
        )
    return NIIVUE_BUNDLE


class ReviewServer(ThreadingHTTPServer):
    """A threading HTTP server that knows its export folder, cases and grade store.

    Args:
        address: ``(host, port)``; port 0 picks a free one.
        export_dir: the export folder.
        quiet: do not log each request.

    Raises:
        ReviewInputError: the export folder cannot be reviewed (see :func:`load_cases`).
        ReviewSetupError: NiiVue is not installed.
    """

    daemon_threads = True

    def __init__(self, address: tuple[str, int], export_dir: str | Path, quiet: bool = True) -> None:
        self.niivue = niivue_bundle()
        self.root, self.cases = load_cases(export_dir)
        self.case_by_id: dict[str, Case] = {c.case_id: c for c in self.cases}
        self.store = GradeStore(self.root / "review", overlay_keys(self.cases))
        self.quiet = quiet
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def cases_json(self) -> dict[str, Any]:
        methods = sorted({o.method for c in self.cases for o in c.overlays})
        return {
            "export": self.root.name,
            "methods": methods,
            "coverage_choices": list(COVERAGE),
            "agrees_choices": list(AGREES),
            "cases": [c.to_json() for c in self.cases],
        }

    def file_in_export(self, rel: str) -> Path | None:
        """The export's file at a URL path, or ``None`` for anything that is not a visible file inside it."""
        if "\x00" in rel:
            return None
        try:
            real = (self.root / rel).resolve()
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.root) or not real.is_file():
            return None
        parts = real.relative_to(self.root).parts
        if parts[0] == "review" or any(p.startswith(".") for p in parts):
            return None  # other readers' grades are not shown; temporary files are not files yet
        return real


class _Handler(BaseHTTPRequestHandler):
    server: ReviewServer
    server_version = "ppi-med-review"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    # -- answers -----------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _file(self, path: Path, ctype: str | None = None) -> None:
        if ctype is None:
            name = path.name.lower()
            # .nii.gz must reach NiiVue as bytes: a gzip Content-Encoding would make the browser unpack it
            if name.endswith((".nii.gz", ".nii", ".dcm")):
                ctype = "application/octet-stream"
            else:
                ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, path.read_bytes(), ctype)

    # -- routes ------------------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        path = url.path
        if path in ("/", "/index.html"):
            return self._file(WEB_DIR / "index.html", "text/html; charset=utf-8")
        if path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        if path == "/static/niivue.js":
            return self._file(self.server.niivue, "text/javascript")
        if path.startswith("/static/") and path[len("/static/") :] in _STATIC:
            name = path[len("/static/") :]
            return self._file(WEB_DIR / name, _STATIC[name] + "; charset=utf-8")
        if path == "/api/cases":
            return self._json(HTTPStatus.OK, self.server.cases_json())
        if path == "/api/grades":
            reader = parse_qs(url.query).get("reader", [""])[0]
            try:
                grades = self.server.store.grades(reader)
            except (GradeError, ReviewInputError) as err:
                return self._error(HTTPStatus.BAD_REQUEST, str(err))
            return self._json(HTTPStatus.OK, {"reader": reader, "grades": grades})
        if path.startswith("/files/"):
            found = self.server.file_in_export(unquote(path[len("/files/") :]))
            if found is not None:
                return self._file(found)
        return self._error(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:  # noqa: N802
        if urlsplit(self.path).path != "/api/grades":
            return self._error(HTTPStatus.NOT_FOUND, "not found")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        if length > _MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a grade is at most {_MAX_BODY} bytes")
        try:
            change = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return self._error(HTTPStatus.BAD_REQUEST, "the body is not JSON")
        if not isinstance(change, dict):
            return self._error(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        try:
            rows = self.server.store.update(change.get("reader"), change)
        except (GradeError, ReviewInputError) as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        except OSError as err:  # a full disk or a read-only export: the page must say that nothing was saved
            print(f"review: could not save a grade: {err}", file=sys.stderr, flush=True)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"not saved: {err}")
        return self._json(HTTPStatus.OK, {"saved": rows[0]["updated"] if rows else "", "rows": rows})


def make_server(export_dir: str | Path, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> ReviewServer:
    """A review server over ``export_dir`` bound to ``host:port`` (not yet serving).

    Raises:
        ReviewInputError: the export cannot be reviewed.
        ReviewSetupError: NiiVue is not installed.
        OSError: the address is taken or cannot be bound.
    """
    return ReviewServer((host, port), export_dir, quiet=quiet)
