"""The plain-PyTorch tiled FlashAttention-2 (forward, LSE, backward) against PyTorch's SDPA and autograd."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model.kernels.flash_reference import flash_attention_reference, reference_forward


def _inputs(B, H, group, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g, dtype=torch.float64).float()
        for s in [(B, H, T, D), (B, H // group, T, D), (B, H // group, T, D), (B, H, T, D)]
    ]


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def _grads(fn, q, k, v, do, causal):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("T,group,causal", list(itertools.product([1, 17, 64, 200], [1, 4], [True, False])))
def test_reference_forward_and_backward_match_sdpa(T, group, causal):
    q, k, v, do = _inputs(2, 4, group, T, 32)
    got = _grads(flash_attention_reference, q, k, v, do, causal)
    ref = _grads(_sdpa, q, k, v, do, causal)
    for name, a, b in zip(["O", "dQ", "dK", "dV"], got, ref):
        assert (a - b).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("causal", [True, False])
def test_reference_lse_is_the_row_logsumexp_for_any_tiling(causal):
    """LSE does not depend on the tile sizes: the online softmax is exact, not an approximation."""
    q, k, v, _ = _inputs(1, 2, 1, 45, 16)
    s = q @ k.transpose(-1, -2) / math.sqrt(16)
    if causal:
        s = s.masked_fill(torch.ones(45, 45, dtype=torch.bool).triu(1), -math.inf)
    for block_m, block_n in [(16, 16), (32, 8), (64, 64), (8, 32)]:
        o, lse = reference_forward(q, k, v, causal, block_m=block_m, block_n=block_n)
        assert (lse - torch.logsumexp(s, -1)).abs().max().item() < 1e-5
        assert (o - torch.softmax(s, -1) @ v).abs().max().item() < 1e-5


def test_reference_keeps_dtype_and_fp32_statistics():
    q, k, v, _ = (x.to(torch.bfloat16) for x in _inputs(1, 4, 2, 20, 16))
    o, lse = reference_forward(q, k, v, causal=True)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32 and torch.isfinite(lse).all()
