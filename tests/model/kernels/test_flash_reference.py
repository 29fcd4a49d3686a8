"""The plain-PyTorch tiled FlashAttention-2 (forward, LSE, backward) against PyTorch's SDPA and autograd."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model.kernels.flash_reference import (
    flash_attention_reference,
    reference_backward,
    reference_forward,
)


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


T_DEAD, DEAD = 48, [0, 37, 47]  # as in test_flash_attention.py: first row, second query tile, last row


@pytest.mark.parametrize("causal", [True, False])
def test_reference_fully_masked_rows_give_zeros_not_nan(causal):
    """The l = 0 branch. Equal query and key lengths always leave key 0 visible, so a fully masked row is
    made by scores of -inf for every key (a query row of -inf against positive keys): O = 0, LSE = +inf.
    Backward: rows saved with O = 0, LSE = +inf get P = 0, so dQ = 0 there and they add nothing to dK, dV
    (the truth: SDPA's gradients with those rows' dO set to 0; finite q, since -inf queries make dK NaN)."""
    q, k, v, do = _inputs(1, 4, 2, T_DEAD, 16, seed=4)
    q_dead = q.clone()
    q_dead[:, :, DEAD] = -math.inf
    o, lse = reference_forward(q_dead, k.abs() + 0.5, v, causal)
    assert not o.isnan().any() and not lse.isnan().any()
    assert (o[:, :, DEAD] == 0).all() and (lse[:, :, DEAD] == math.inf).all()
    live = [t for t in range(T_DEAD) if t not in DEAD]
    truth = _sdpa(q, k.abs() + 0.5, v, causal)
    assert (o[:, :, live] - truth[:, :, live]).abs().max().item() < 1e-5

    o, lse = reference_forward(q, k, v, causal)
    o[:, :, DEAD], lse[:, :, DEAD] = 0.0, math.inf
    do_live = do.clone()
    do_live[:, :, DEAD] = 0.0
    _, *truth = _grads(_sdpa, q, k, v, do_live, causal)
    grads = reference_backward(q, k, v, o, lse, do, causal)
    for name, g, t in zip(["dQ", "dK", "dV"], grads, truth):
        assert not g.isnan().any() and (g - t).abs().max().item() < 1e-5, name
    assert (grads[0][:, :, DEAD] == 0).all()
