"""Shared fixtures: the real data sets under ../shared/data and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton's CPU interpreter (tests/model/kernels) must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCRATCHLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (Tiny Shakespeare, TinyStories, Multi30k, GPT-2 vocab, HellaSwag); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SCRATCHLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _offline_tiktoken(monkeypatch):
    """Make tiktoken.get_encoding('gpt2') work offline from the shared cache."""
    cache = SHARED_DATA / "tiktoken_cache"
    if cache.is_dir():
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
