"""Fixtures shared by the whole suite."""

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
