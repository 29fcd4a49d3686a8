"""Precision choice: bf16 autocast only where the hardware multiplies bf16 natively."""

from __future__ import annotations

import pytest
import torch

from scratchlm import device as dev

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2\nmodel name\t: AMD EPYC\n"
X86_SAPPHIRE = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n"
ARM_OLD = "Features\t: fp asimd evtstrm aes\n"


def test_bf16_flags_are_read_from_cpuinfo():
    assert not dev.bf16_in_cpuinfo(X86_AVX2)
    assert dev.bf16_in_cpuinfo(X86_SAPPHIRE)
    assert dev.bf16_in_cpuinfo(ARM_BF16)
    assert not dev.bf16_in_cpuinfo(ARM_OLD)
    assert not dev.bf16_in_cpuinfo("model name\t: bf16 in a name is not a flag\n")


@pytest.mark.parametrize(("native", "expected"), [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_on_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, native, expected):
    monkeypatch.setattr(dev, "cpu_has_bf16_matmul", lambda: native)
    assert dev.resolve_dtype("auto", torch.device("cpu")) == expected
    assert dev.resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_explicit_bf16_on_a_cpu_without_it_is_kept_with_a_warning(monkeypatch):
    monkeypatch.setattr(dev, "cpu_has_bf16_matmul", lambda: False)
    dev._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="without bf16 instructions.*train.dtype=auto or float32"):
        assert dev.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
