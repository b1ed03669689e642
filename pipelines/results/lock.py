"""One ``make results`` at a time in a study folder.

Two invocations on one folder would restore, set aside and run the same jobs under each other's feet (a
restored copy deleted while the other reads it, one job's folder moved aside while it runs). The first holds
an advisory lock on ``OUT/.lock`` for its whole run; a second stops at once and names the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["StudyBusyError", "study_lock"]


class StudyBusyError(RuntimeError):
    """Another process holds the study folder."""


@contextlib.contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` for the block (released when the process ends, however it ends).

    Raises:
        StudyBusyError: another process holds it; the message names that process and the folder.
    """
    path = Path(out) / ".lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise StudyBusyError(
                f"{out} is in use by {holder}; wait for it to finish, or give this run another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(
            f"make results (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
        )
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
