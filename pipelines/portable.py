"""Paths as the published reports write them: never an absolute path of the machine that ran the study.

A report is read on other machines (``docs/`` is published), where ``/work/...`` or ``/tmp/...`` means nothing
and tells a reader about the build machine. A path inside the repository is written relative to it (the
commands run from the repository root); a path in or beside the report's output folder relative to it, written
``<out>/...``; any other path by its name alone, ``.../name``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["REPO", "portable_path", "portable_text"]

#: the repository root, where every command of the project runs
REPO = Path(__file__).resolve().parents[1]

# an absolute path at the start of a token: after a space, quote, backtick, '=', '(' or the text's start
_ABSOLUTE = re.compile(r"(?:(?<=[\s`'\"=(])|^)/[A-Za-z0-9_.~-][^\s`'\",;)\]}]*")
# SQLite URIs carry the absolute path after three slashes: ``sqlite:////abs/path.db``
_SQLITE = re.compile(r"sqlite:///(/[^\s`'\",;)\]}]+)")


def portable_path(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> str:
    """``path`` as a report may publish it.

    Args:
        path: any path; a relative one is returned as given (it is already relative to the working folder).
        out: the report's output folder, for paths outside the repository.

    Returns:
        In POSIX form: the path relative to the repository; else ``<out>/...`` relative to ``out`` where it lies
        in ``out`` or beside it; else ``.../<its name>``.
    """
    p = Path(path)
    if not p.is_absolute():
        return p.as_posix()
    resolved = Path(os.path.normpath(p))
    repo = REPO.resolve()
    if resolved == repo or repo in resolved.parents:
        return resolved.relative_to(repo).as_posix() or "."
    rel = os.path.relpath(resolved, os.path.normpath(Path(out).absolute())) if out is not None else ""
    parts = Path(rel).parts
    if not rel or parts[:2] == ("..", ".."):
        # far from the output folder too: a climb to the root would spell the machine's path again
        return f".../{resolved.name}"
    return "<out>" if rel == "." else f"<out>/{Path(rel).as_posix()}"


def portable_text(text: str, out: str | os.PathLike[str] | None = None) -> str:
    """Every absolute path in ``text`` (a command line, a JSON of overrides, a tracking URI) made portable.

    Args:
        text: the text to rewrite.
        out: the report's output folder (see :func:`portable_path`).

    Returns:
        ``text`` with each absolute path replaced by :func:`portable_path`'s form; ``sqlite:////abs.db`` becomes
        ``sqlite:///rel.db``, a URI SQLAlchemy reads relative to the working folder.
    """
    text = _SQLITE.sub(lambda m: "sqlite:///" + portable_path(m.group(1), out), text)
    return _ABSOLUTE.sub(lambda m: portable_path(m.group(0), out), text)
