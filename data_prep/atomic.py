"""Writing result files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["write_json_atomic"]


def write_json_atomic(path: Path, payload: dict, indent: int = 2, default=None) -> None:
    """Write JSON next to its target and rename, so readers never see a half-written file.

    Args:
        path: the target file.
        payload: what to write.
        indent: passed to :func:`json.dump`.
        default: passed to :func:`json.dump` (e.g. ``str`` for paths and other objects).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=indent, default=default)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
