"""Ports and process groups for the tests that start a real server on loopback (MLflow, Orthanc)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess

__all__ = ["free_ports", "stop_group"]


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct loopback ports free now (held together while chosen, so they never coincide)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server started with ``start_new_session=True``: its whole process group, TERM then KILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
