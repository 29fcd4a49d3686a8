"""The Triton FlashAttention-2 kernels against PyTorch's SDPA: forward, saved LSE, gradients, GQA, causal.

Without CUDA the kernels run in Triton's CPU interpreter (conftest.py); with CUDA the same checks run on the
GPU (marked ``gpu``) with exact fp32 dots (input_precision="ieee"). The reference is fp32 SDPA on the same
(upcast) inputs; fp16/bf16 results must be within max(2x the error of PyTorch's own attention in that dtype,
1e-2) of it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (pip install 'scratchlm[triton]')")

from scratchlm.errors import ConfigError  # noqa: E402
from scratchlm.model.kernels.flash_attention import flash_attention, flash_available  # noqa: E402
from scratchlm.model.kernels.flash_reference import reference_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the gpu tests run these")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(B: int, H: int, group: int, T: int, D: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q (B, H, T, D), k, v (B, H // group, T, D), dO like q; standard normal, reproducible."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, H // group, T, D), (B, H // group, T, D), (B, H, T, D)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tolerance(dtype: torch.dtype, torch_err: float) -> float:
    return 1e-4 if dtype == torch.float32 else max(2 * torch_err, 1e-2)


def with_grads(fn, q, k, v, do, causal):
    """(O, dQ, dK, dV) of fn(q, k, v, causal) for the upstream gradient dO."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


# Forward: every T x D x group x causal x dtype. B*H = 8 (4 at T = 200 to keep the interpreter fast).
FORWARD_GRID = list(itertools.product([1, 17, 64, 200], [16, 64, 128], [1, 4], [True, False], DTYPES))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,D,group,causal,dtype_name", FORWARD_GRID)
def test_forward_matches_sdpa(device, T, D, group, causal, dtype_name):
    dtype = DTYPES[dtype_name]
    B = 1 if T == 200 else 2
    q, k, v, _ = make_inputs(B, 4, group, T, D, dtype, device)
    o = flash_attention(q, k, v, causal=causal)
    assert o.shape == q.shape and o.dtype == dtype and torch.isfinite(o).all()
    ref = sdpa(q.float(), k.float(), v.float(), causal)
    torch_err = 0.0 if dtype == torch.float32 else max_err(sdpa(q, k, v, causal), ref)
    assert max_err(o, ref) <= tolerance(dtype, torch_err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_saved_logsumexp_matches_reference_and_torch(device, causal):
    """The kernel saves LSE_i = log sum_j exp(S_ij) in fp32, the same as the tiled reference."""
    from scratchlm.model.kernels.flash_attention import _forward

    q, k, v, _ = make_inputs(2, 4, 2, 50, 32, torch.float32, device)
    o, lse = _forward(q, k, v, causal, 1 / math.sqrt(32), "ieee")
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 50)
    ref_o, ref_lse = reference_forward(q, k, v, causal)
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(32)
    if causal:
        s = s.masked_fill(torch.ones(50, 50, dtype=torch.bool, device=device).triu(1), -math.inf)
    assert max_err(lse, torch.logsumexp(s, dim=-1)) < 1e-4
    assert max_err(lse, ref_lse) < 1e-4 and max_err(o, ref_o) < 1e-5


# Gradients at T <= 32: every dtype x causal x group, with (T, D) covering tails, a single token and D sizes.
GRAD_GRID = [
    (T, D, group, causal, dt)
    for (T, D), group, causal, dt in itertools.product(
        [(1, 16), (17, 128), (32, 64)], [1, 4], [True, False], DTYPES
    )
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,D,group,causal,dtype_name", GRAD_GRID)
def test_gradients_match_sdpa(device, T, D, group, causal, dtype_name):
    dtype = DTYPES[dtype_name]
    q, k, v, do = make_inputs(2, 4, group, T, D, dtype, device, seed=1)
    got = with_grads(lambda *a: flash_attention(*a), q, k, v, do, causal)
    ref = with_grads(sdpa, q.float(), k.float(), v.float(), do.float(), causal)
    same_dtype_torch = with_grads(sdpa, q, k, v, do, causal) if dtype != torch.float32 else ref
    for name, g, r, t in zip(["O", "dQ", "dK", "dV"], got, ref, same_dtype_torch):
        assert g.dtype == dtype and g.shape == r.shape and torch.isfinite(g).all(), name
        assert max_err(g, r) <= tolerance(dtype, max_err(t, r)), name


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic_with_gqa(device):
    """dK/dV are owned by one program per key tile (no atomics): two runs give identical bits."""
    q, k, v, do = make_inputs(1, 8, 4, 40, 16, torch.float32, device, seed=2)
    first = with_grads(lambda *a: flash_attention(*a), q, k, v, do, True)
    second = with_grads(lambda *a: flash_attention(*a), q, k, v, do, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_custom_scale(device):
    """Views from a (B, T, H, D) projection work without copies; softmax_scale is honoured."""
    x = torch.randn(2, 24, 3, 4, 32, generator=torch.Generator().manual_seed(3)).to(device)  # (B, T, 3, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), non-contiguous
    o = flash_attention(q, k, v, causal=True, softmax_scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert max_err(o, ref) < 1e-4


def test_unsupported_head_dim_is_a_clear_error():
    q = torch.randn(1, 2, 8, 48)
    with pytest.raises(ConfigError, match="head_dim"):
        flash_attention(q, q, q)


def test_not_available_on_cpu_so_models_use_sdpa():
    ok, reason = flash_available(torch.device("cpu"))
    assert ok is False and "CUDA" in reason
