"""Writing a file so that a reader, or a kill, never sees half of one: the project's one atomic writer.

Every file is written under a temporary name in its own folder (so the final rename stays on one file
system), flushed to disk with ``fsync``, and then put in place in one step:

- ``overwrite=True``: ``os.replace``, so a reader sees the old file or the new one;
- ``overwrite=False``: ``os.link``, which fails instead of replacing a file that appeared meanwhile; the
  error names the path.

On any error the temporary file is removed and the target is left as it was. The file gets the permissions
an ordinary ``open`` would give it (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.

:func:`atomic_path` hands a writer that needs a file name (nibabel, pydicom) the temporary path;
:func:`atomic_open` hands out the open file; :func:`atomic_write_bytes`, :func:`atomic_write_text`,
:func:`atomic_write_json` and :func:`atomic_torch_save` cover the common cases::

    atomic_write_json(out / "datalist.json", datalist)
    with atomic_path(out / "image.nii.gz", overwrite=False) as tmp:
        nib.save(img, tmp)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_open",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "stale_temporaries",
]

# mkstemp's name: ".<target name>.<8 random characters>.tmp<target suffix>"
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^/]*)?$")


def _suffix(path: Path) -> str:
    # writers that pick the format from the name (nibabel compresses ``.nii.gz``) need the full suffix
    return "".join(path.suffixes[-2:]) if path.name.endswith((".nii.gz", ".tar.gz")) else path.suffix


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path``; what is written to it becomes ``path`` when the block ends cleanly.

    Args:
        path: the target file (its folder is created).
        overwrite: replace an existing ``path``; if false, an existing one is refused.

    Yields:
        The temporary file's path (it exists, empty, and keeps ``path``'s suffix, e.g. ``.nii.gz``).

    Raises:
        FileExistsError: ``overwrite`` is false and ``path`` exists (checked before and when publishing).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"refusing to overwrite existing output {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{_suffix(path)}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as err:
                raise FileExistsError(f"refusing to overwrite existing output {path}") from err
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, overwrite: bool = True, **kwargs: Any) -> Iterator[IO]:
    """:func:`open` for writing, through :func:`atomic_path`.

    Args:
        path: the target file.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        overwrite: see :func:`atomic_path`.
        **kwargs: more :func:`open` arguments (``newline``, ``encoding``; text defaults to UTF-8).

    Yields:
        The open file.

    Raises:
        ValueError: a mode other than ``"w"`` or ``"wb"``.
        FileExistsError: see :func:`atomic_path`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', got {mode!r} for {path}")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``. See :func:`atomic_path`."""
    with atomic_open(path, "wb", overwrite=overwrite) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``. See :func:`atomic_path`."""
    with atomic_open(path, "w", overwrite=overwrite) as fh:
        fh.write(text)
    return Path(path)


def atomic_write_json(
    path: str | Path,
    payload: Any,
    *,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``payload`` as JSON (and a final newline) to ``path`` atomically; returns ``path``.

    Args:
        path: the target file.
        payload: what to write.
        indent: passed to :func:`json.dumps`.
        default: passed to :func:`json.dumps` (e.g. ``str`` for paths and other objects).
        overwrite: see :func:`atomic_path`.

    Raises:
        TypeError: ``payload`` holds something JSON cannot write (raised before anything is written).
        FileExistsError: see :func:`atomic_path`.
    """
    text = json.dumps(payload, indent=indent, default=default) + "\n"
    return atomic_write_text(path, text, overwrite=overwrite)


def atomic_torch_save(obj: Any, path: str | Path, *, overwrite: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns ``path``. See :func:`atomic_path`."""
    with atomic_open(path, "wb", overwrite=overwrite) as fh:
        torch.save(obj, fh)  # streamed: a checkpoint is not held in memory twice
    return Path(path)


def stale_temporaries(folder: str | Path) -> list[Path]:
    """The temporary files that writes cut short by a kill left in ``folder`` (safe to delete when no write
    into ``folder`` is under way).

    Args:
        folder: the folder to look in (missing: none).

    Returns:
        Their paths, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name))
