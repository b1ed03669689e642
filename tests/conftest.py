"""Fixtures and marker rules shared by the whole suite."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Run the in-process tests on one torch thread.

    The tensors here are tiny and gain nothing from threads, while on a busy 2-core machine OpenMP spinning
    makes each op many times slower, so one thread keeps the suite's time stable. Subprocesses (bundle runs)
    choose their own threads.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tests that start a browser, several processes, a server or a DICOM node (Orthanc) are slow by nature: marking them
# `slow` here keeps `-m "not slow"` (the fast loop) free of them without repeating the mark on each.
IMPLIES_SLOW = ("browser", "distributed", "server", "pacs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the `slow` mark to every test marked browser, distributed, server or pacs.

    Args:
        config: The pytest configuration (unused; part of the hook's signature).
        items: The collected tests, changed in place.
    """
    for item in items:
        if any(item.get_closest_marker(name) for name in IMPLIES_SLOW) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
