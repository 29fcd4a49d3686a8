"""FlashAttention-2 in plain PyTorch: the readable reference of the Triton kernels, tile for tile.

Attention of one head, with queries Q (T, D), keys K (T, D), values V (T, D) and scale c = 1/sqrt(D)::

    S = c * Q K^T            (T, T)   scores; causal: S_ij = -inf for j > i
    P = softmax(S, dim=-1)   (T, T)
    O = P V                  (T, D)

A plain implementation writes S and P to memory: O(T^2) bytes read and written per head, which is what makes
attention memory-bound. FlashAttention never materialises them. It cuts Q into row tiles of ``block_m`` queries
and K, V into tiles of ``block_n`` keys, and for each query tile walks over the key tiles while keeping, per
row, three running quantities (the *online softmax*, Milakov & Gimelshein 2018)::

    m   = max_j S_ij seen so far                  running max (for numerical safety)
    l   = sum_j exp(S_ij - m)                      running denominator
    acc = sum_j exp(S_ij - m) V_j                  running numerator, (block_m, D)

When a new tile raises the max from m to m', everything accumulated so far is rescaled by alpha = exp(m - m'),
so after the last tile O = acc / l exactly. The only thing saved for the backward is O and the per-row
log-sum-exp LSE = m + log(l) (fp32), from which any tile of P is recomputed as P = exp(S - LSE).

Backward (Dao 2023, FlashAttention-2), with dO the gradient of the output::

    D  = rowsum(dO * O)                   (T,)     preprocessing: equals rowsum(P * dP)
    dV = P^T dO                           (T, D)
    dP = dO V^T                           (T, T)   (recomputed tile by tile, never stored)
    dS = P * (dP - D[:, None])            (T, T)   softmax backward
    dQ = c * dS K,   dK = c * dS^T Q

It is split into two passes so that each output tile has a single owner: the dK/dV pass takes one key tile and
walks down the query tiles of every query head that reads it (grouped-query attention: query head h reads
key/value head h // group), and the dQ pass takes one query tile and walks along the key tiles. Nothing is
accumulated with atomics, so the result is deterministic.

Causal masking only touches the tiles that straddle the diagonal; tiles strictly above it are skipped. All
arithmetic here is fp32 whatever the input dtype (the GPU kernels keep m, l, acc, LSE, D and dQ in fp32 too,
but feed the matmuls in the input dtype). This module is also the fallback where the Triton kernels cannot run.
"""

from __future__ import annotations

import math

import torch

# Tiles of the CPU-interpreter configuration of the Triton kernels (flash_attention.py): forward and dQ pass
# use (BLOCK_M, BLOCK_N) = (32, 16), the dK/dV pass (16, 32).
BLOCK_M, BLOCK_N = 32, 16
DKDV_BLOCK_M, DKDV_BLOCK_N = 16, 32


def _grouped(q: torch.Tensor, n_kv_head: int) -> torch.Tensor:
    """(B, Hq, T, D) -> fp32 (B, Hkv, G, T, D): query heads grouped under the kv head they read."""
    B, H, T, D = q.shape
    return q.float().reshape(B, n_kv_head, H // n_kv_head, T, D)


def _causal_visible(rows: range, cols: range, device: torch.device) -> torch.Tensor:
    """(len(rows), len(cols)) bool, True where key col may be seen by query row (col <= row)."""
    r = torch.arange(rows.start, rows.stop, device=device)
    c = torch.arange(cols.start, cols.stop, device=device)
    return c[None, :] <= r[:, None]


def reference_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward. q (B, Hq, T, D), k/v (B, Hkv, T, D) -> O (B, Hq, T, D) in q.dtype, LSE (B, Hq, T) fp32.

    For every query tile i (rows i0:i1) and key tile j (cols j0:j1) up to the diagonal::

        S    = c * Q_i K_j^T                               (.., block_m, block_n), -inf above the diagonal
        m'   = max(m, rowmax(S));  alpha = exp(m - m');  P~ = exp(S - m')
        l    = alpha * l + rowsum(P~);  acc = alpha * acc + P~ V_j;  m = m'

    then O_i = acc / l and LSE_i = m + log(l). A row that saw no key gets O = 0 and LSE = +inf.
    """
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qg = _grouped(q, n_kv)  # (B, Hkv, G, T, D)
    kf = k.float().unsqueeze(2)  # (B, Hkv, 1, T, D): broadcast over the group
    vf = v.float().unsqueeze(2)
    o = torch.empty_like(qg)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)  # (B, Hkv, G, T)
    for i0 in range(0, T, block_m):
        i1 = min(i0 + block_m, T)
        q_i = qg[..., i0:i1, :]
        m = torch.full(q_i.shape[:-1], -math.inf, device=q.device)
        l = torch.zeros(q_i.shape[:-1], device=q.device)
        acc = torch.zeros_like(q_i)
        last = i1 if causal else T  # causal: key tiles right of the diagonal are skipped
        for j0 in range(0, last, block_n):
            j1 = min(j0 + block_n, last)
            s = scale * (q_i @ kf[..., j0:j1, :].transpose(-1, -2))  # (B, Hkv, G, rows, cols)
            if causal and j1 - 1 > i0:  # the tile straddles the diagonal
                s = s.masked_fill(~_causal_visible(range(i0, i1), range(j0, j1), q.device), -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # no visible key yet: avoid inf - inf
            alpha = torch.exp(m - m_safe)
            p = torch.exp(s - m_safe[..., None])
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + p @ vf[..., j0:j1, :]
            m = m_new
        empty = l == 0
        o[..., i0:i1, :] = acc / l.masked_fill(empty, 1.0)[..., None]
        lse[..., i0:i1] = torch.where(empty, math.inf, m + torch.log(l))
    return o.reshape(B, H, T, D).to(q.dtype), lse.reshape(B, H, T)


def reference_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    dkdv_block_m: int = DKDV_BLOCK_M,
    dkdv_block_n: int = DKDV_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled backward from the saved O and LSE. Returns dQ (like q), dK, dV (like k, v).

    Pass 0: D = rowsum(dO * O). Pass 1 (per key tile j, over the query tiles i >= j of the whole group)::

        P = exp(c * Q_i K_j^T - LSE_i);  dV_j += P^T dO_i;  dS = P * (dO_i V_j^T - D_i);  dK_j += c * dS^T Q_i

    Pass 2 (per query tile i, over the key tiles j <= i)::  dQ_i += c * dS K_j  with dS recomputed as above.
    """
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    G = H // n_kv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    qg, og, dog = _grouped(q, n_kv), _grouped(o, n_kv), _grouped(do, n_kv)
    lse_g = lse.reshape(B, n_kv, G, T)
    kf = k.float().unsqueeze(2)
    vf = v.float().unsqueeze(2)
    delta = (dog * og).sum(-1)  # (B, Hkv, G, T)

    def probs(i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """P tile (B, Hkv, G, i1-i0, j1-j0) recomputed from the saved LSE, zero where masked."""
        s = scale * (qg[..., i0:i1, :] @ kf[..., j0:j1, :].transpose(-1, -2))
        p = torch.exp(s - lse_g[..., i0:i1, None])
        if causal and j1 - 1 > i0:
            p = p.masked_fill(~_causal_visible(range(i0, i1), range(j0, j1), q.device), 0.0)
        return p

    dk = torch.zeros(B, n_kv, T, D, device=q.device)
    dv = torch.zeros(B, n_kv, T, D, device=q.device)
    for j0 in range(0, T, dkdv_block_n):  # pass 1: one owner per key tile
        j1 = min(j0 + dkdv_block_n, T)
        first = (j0 // dkdv_block_m) * dkdv_block_m if causal else 0  # query tiles above the diagonal: skip
        for i0 in range(first, T, dkdv_block_m):
            i1 = min(i0 + dkdv_block_m, T)
            p = probs(i0, i1, j0, j1)
            dv[..., j0:j1, :] += (p.transpose(-1, -2) @ dog[..., i0:i1, :]).sum(2)  # sum over the group
            ds = p * (dog[..., i0:i1, :] @ vf[..., j0:j1, :].transpose(-1, -2) - delta[..., i0:i1, None])
            dk[..., j0:j1, :] += scale * (ds.transpose(-1, -2) @ qg[..., i0:i1, :]).sum(2)

    dq = torch.zeros_like(qg)
    for i0 in range(0, T, block_m):  # pass 2: one owner per query tile
        i1 = min(i0 + block_m, T)
        last = i1 if causal else T
        for j0 in range(0, last, block_n):
            j1 = min(j0 + block_n, last)
            p = probs(i0, i1, j0, j1)
            ds = p * (dog[..., i0:i1, :] @ vf[..., j0:j1, :].transpose(-1, -2) - delta[..., i0:i1, None])
            dq[..., i0:i1, :] += scale * (ds @ kf[..., j0:j1, :])
    return dq.reshape(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttentionReference(torch.autograd.Function):
    """Autograd wrapper: saves only (q, k, v, O, LSE) and runs the tiled backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float | None):  # noqa: D102
        o, lse = reference_forward(q, k, v, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: D102
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = reference_backward(q, k, v, o, lse, do, ctx.causal, ctx.softmax_scale)
        return dq, dk, dv, None, None


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, softmax_scale: float | None = None
) -> torch.Tensor:
    """Differentiable tiled attention: q (B, Hq, T, D), k/v (B, Hkv, T, D), Hq % Hkv == 0 -> (B, Hq, T, D)."""
    return FlashAttentionReference.apply(q, k, v, causal, softmax_scale)
