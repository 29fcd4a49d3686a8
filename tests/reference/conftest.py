"""Fixtures of the reference tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """CPU fused AdamW spends ~0.1 s per call waiting for its OpenMP threads on a loaded 2-core machine
    (2 ms with one thread); no result depends on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
