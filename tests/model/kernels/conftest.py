"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET=1 must be set before triton and the kernels are first imported: tests/conftest.py sets it
before any test module is collected, and this file does again for runs of this directory alone. If the
kernel module was imported without it, it is defined again; if triton itself was (its standard library is
then compiled-only), the interpreter tests skip with that reason instead of failing obscurely.

On a GPU the kernels launch fixed tiles in these tests (SCRATCHLM_FLASH_TILES=fixed, see
flash_attention.py) unless the variable is already set: autotuning every constexpr combination of the test
grid would take far longer than the tests. ``SCRATCHLM_FLASH_TILES=autotune pytest -m gpu ...`` tests the
autotuned path.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

INTERPRETER_PROBLEM: str | None = None
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _tl = sys.modules.get("triton.language")
    if _tl is not None and type(_tl.zeros).__name__ != "InterpretedFunction":
        INTERPRETER_PROBLEM = "triton was imported before TRITON_INTERPRET=1 was set; run these tests alone"
    _kernels = sys.modules.get("scratchlm.model.kernels.flash_kernels")
    if _kernels is not None and not _kernels.INTERPRETED:
        importlib.reload(_kernels)


@pytest.fixture(autouse=True)
def _needs_working_interpreter(request):
    """Skip the CPU interpreter tests when the interpreter cannot be switched on any more."""
    callspec = getattr(request.node, "callspec", None)
    if INTERPRETER_PROBLEM and callspec is not None and callspec.params.get("device") == "cpu":
        pytest.skip(INTERPRETER_PROBLEM)


@pytest.fixture(autouse=True)
def _fixed_gpu_tiles(monkeypatch):
    """SCRATCHLM_FLASH_TILES=fixed for the test unless the environment already chooses (no effect on CPU)."""
    if "SCRATCHLM_FLASH_TILES" not in os.environ:
        monkeypatch.setenv("SCRATCHLM_FLASH_TILES", "fixed")
