"""Readers' grades of saliency overlays, one CSV per reader in ``EXPORT_DIR/review/<reader>.csv``.

A grade belongs to one overlay of a case, ``(case_id, method, target)``: ``coverage`` says whether the saliency
covers the finding (``yes``, ``partly``, ``no``, ``no finding``). ``agrees`` (does the reader agree with the
model's prediction) and ``comment`` belong to the case and are kept equal on all of the reader's rows of it.
Every change rewrites the reader's file through a temporary file and an atomic rename, so a crash leaves the
previous version or the new one, never half a file; a reader only ever writes their own file.
"""

from __future__ import annotations

import csv
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ppi_med.atomic import atomic_open

from .cases import ReviewInputError

__all__ = [
    "AGREES",
    "COVERAGE",
    "GRADE_COLUMNS",
    "GradeError",
    "GradeStore",
    "check_reader",
    "read_grades",
]

COVERAGE = ("yes", "partly", "no", "no finding")
AGREES = ("yes", "no")
GRADE_COLUMNS = ("case_id", "method", "target", "coverage", "agrees", "comment", "reader", "updated")
_READER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_COMMENT = 4000


class GradeError(ValueError):
    """A grade the review refuses (unknown case, bad value, bad reader name); the message says which."""


def check_reader(name: object) -> str:
    """The reader's name if it can name a file: 1-64 letters, digits, ``.``, ``_``, ``-``, not starting with a dot.

    Raises:
        GradeError: anything else (the name would not be a safe file name).
    """
    if not isinstance(name, str) or not _READER.match(name):
        raise GradeError(
            f"reader name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-' (e.g. 'jsmith')"
        )
    return name


def read_grades(path: Path) -> list[dict[str, str]]:
    """The rows of one reader's CSV.

    Raises:
        ReviewInputError: the file lacks the grade columns.
    """
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in GRADE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewInputError(f"{path}: not a grade file of the review, columns {missing} are missing")
        return [{c: row.get(c) or "" for c in GRADE_COLUMNS} for row in reader]


class GradeStore:
    """Loads, checks and saves the grades of each reader of one export.

    Args:
        review_dir: ``EXPORT_DIR/review`` (created at the first save).
        keys: per case id, the ``(method, target)`` pairs of the index; grades for anything else are refused.
    """

    def __init__(self, review_dir: str | Path, keys: Mapping[str, set[tuple[str, str]]]) -> None:
        self.dir = Path(review_dir)
        self.keys = {k: set(v) for k, v in keys.items()}
        self._lock = threading.Lock()
        self._rows: dict[str, dict[tuple[str, str, str], dict[str, str]]] = {}
        self._stamp: dict[str, tuple[int, int] | None] = {}

    def readers(self) -> list[str]:
        """Names of the readers who have a file, sorted."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.csv") if _READER.match(p.stem))

    def path(self, reader: str) -> Path:
        """The reader's file.

        Raises:
            GradeError: a bad name, or one that differs only by case from an existing reader's (it would be the
                same file on a case-insensitive disk).
        """
        reader = check_reader(reader)
        for other in self.readers():
            if other != reader and other.lower() == reader.lower():
                raise GradeError(
                    f"reader '{reader}' differs only by upper/lower case from the existing reader '{other}' "
                    f"({self.dir / (other + '.csv')}); use exactly '{other}' or another name"
                )
        return self.dir / f"{reader}.csv"

    def _load(self, reader: str) -> dict[tuple[str, str, str], dict[str, str]]:
        path = self.path(reader)
        stamp = _stamp(path)
        if reader in self._rows and self._stamp.get(reader) == stamp:
            return self._rows[reader]
        rows: dict[tuple[str, str, str], dict[str, str]] = {}
        if path.is_file():
            for row in read_grades(path):
                rows[(row["case_id"], row["method"], row["target"])] = row
        self._rows[reader], self._stamp[reader] = rows, stamp
        return rows

    def grades(self, reader: str) -> list[dict[str, str]]:
        """The reader's grades (an empty list for a new reader).

        Raises:
            GradeError: a bad reader name.
            ReviewInputError: the reader's file exists but is not a grade file.
        """
        with self._lock:
            return [dict(r) for r in self._load(reader).values()]

    def update(self, reader: str, change: Mapping[str, Any]) -> list[dict[str, str]]:
        """Apply one change from the page and save the reader's file; returns the reader's rows of that case.

        Args:
            reader: the reader's name.
            change: ``case_id``, ``method``, ``target`` (the overlay shown) and any of ``coverage``, ``agrees``,
                ``comment``.

        Raises:
            GradeError: a case, method or target not in the index, a value outside its choices, a comment over
                4000 characters, or nothing to change.
        """
        reader = check_reader(reader)
        cid, method, target = (str(change.get(k, "")) for k in ("case_id", "method", "target"))
        if cid not in self.keys:
            raise GradeError(f"case '{cid}' is not in this export's index")
        if (method, target) not in self.keys[cid]:
            raise GradeError(f"case '{cid}' has no overlay of method '{method}' with target '{target}'")
        fields = {k: change[k] for k in ("coverage", "agrees", "comment") if k in change}
        if not fields:
            raise GradeError("nothing to save: give coverage, agrees or comment")
        for name, choices in (("coverage", COVERAGE), ("agrees", AGREES)):
            if name in fields and fields[name] not in ("", *choices):
                raise GradeError(f"{name} must be one of {', '.join(choices)} (or empty), got {fields[name]!r}")
        if "comment" in fields:
            if not isinstance(fields["comment"], str) or len(fields["comment"]) > _MAX_COMMENT:
                raise GradeError(f"comment must be text of at most {_MAX_COMMENT} characters")
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self._lock:
            rows = self._load(reader)
            key = (cid, method, target)
            if key not in rows:
                same_case = [r for k, r in rows.items() if k[0] == cid]
                rows[key] = {c: "" for c in GRADE_COLUMNS}
                rows[key].update(case_id=cid, method=method, target=target, reader=reader)
                if same_case:  # the case-level answers carry over to the case's other overlays
                    rows[key].update(agrees=same_case[0]["agrees"], comment=same_case[0]["comment"])
            rows[key].update({"coverage": fields["coverage"]} if "coverage" in fields else {})
            rows[key]["updated"] = now
            for k, r in rows.items():
                if k[0] == cid:
                    r.update({f: fields[f] for f in ("agrees", "comment") if f in fields})
                    if k == key or any(f in fields for f in ("agrees", "comment")):
                        r["updated"] = now
            self._save(reader, rows)
            return [dict(r) for k, r in rows.items() if k[0] == cid]

    def _save(self, reader: str, rows: Mapping[tuple[str, str, str], Mapping[str, str]]) -> None:
        path = self.path(reader)
        # atomic: readers of the file see the old or the new version
        with atomic_open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=GRADE_COLUMNS)
            writer.writeheader()
            writer.writerows(rows.values())
        self._stamp[reader] = _stamp(path)


def _stamp(path: Path) -> tuple[int, int] | None:
    """Modification time and size: a file changed by someone else since it was read is read again."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)
