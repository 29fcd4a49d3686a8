"""FlashAttention-2 as Triton kernels: the forward pass and the three backward passes.

Only the ``@triton.jit`` kernels live here; the launchers, the autograd Function and the tile configurations
are in ``flash_attention.py``, and ``flash_reference.py`` is the same algorithm in plain PyTorch (read it first:
its docstrings derive every line below).

Notation for one (batch, query head) pair, all tiles in fp32 registers::

    S  = Q K^T * scale                       (BLOCK_M, BLOCK_N) scores of one query tile vs one key tile
    m  = running row max of S, l = running sum of exp(S - m), acc = running sum of exp(S - m) V
    O  = acc / l,  LSE = m + log(l)          saved for the backward (LSE in fp32, natural log)
    P  = exp(S - LSE)                        recomputed in the backward, never stored in HBM
    D  = rowsum(dO * O)                      preprocessing pass
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = dS K * scale,  dK = dS^T Q * scale

The kernels work in base 2 (``exp2``/``log2`` are the hardware instructions): ``S2 = S * log2(e)``, so
``exp(S - m) = exp2(S2 - m2)``. Queries of head ``h`` read key/value head ``h // GROUP`` (grouped-query
attention); the dK/dV kernel owns one key tile and loops over all ``GROUP`` query heads that read it, so every
gradient is written exactly once (no atomics, bitwise deterministic).

Addressing: a kernel keeps only its head's base pointer (``k_head``) and forms each tile's addresses where it
loads the tile (``k_head + rows[:, None] * stride + offs_d[None, :]``), rather than building a (BLOCK, D)
tensor of pointers before the loop and advancing it; on sm_90 this took fewer registers at most tile
configurations (``benchmarks/flash_registers.py`` compiles them offline and reports registers and spills).

Constexpr flags: ``CAUSAL`` (query i sees keys j <= i), ``UPCAST`` (cast tiles to fp32 before ``tl.dot``:
the CPU interpreter cannot multiply bf16), ``PRECISION`` (``tl.dot`` input precision: "ieee" is exact fp32,
"tf32" is the fast tensor-core path; ignored for fp16/bf16).

Decorated at import time: set ``TRITON_INTERPRET=1`` before importing this module to run it on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def _round_fp32_for_bf16(x, UPCAST: tl.constexpr):
    """Under the interpreter (UPCAST), round fp32 x to the nearest bf16 value in its bits: the interpreter's
    fp32 -> bf16 cast truncates, where GPUs round to nearest even. A no-op on the GPU."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _query_tile(CAUSAL: tl.constexpr):
    """Which query tile this program owns, from program_id(0) over the grid's cdiv(T, BLOCK_M) tiles.

    Causal: in reverse, last tile first. A query tile's work grows with its position (tile i sees i + 1 key
    tiles) and the GPU starts programs in launch order, so the longest start first and the short ones fill
    the last wave instead of one long tile running alone at the end: longest-processing-time-first (LPT)
    scheduling. Non-causal tiles are equal: launch order. (The dK/dV kernel needs no reversal: key tile j is
    seen by the query rows from j on, so its first tiles are already the longest.)
    """
    tile = tl.program_id(0)
    if CAUSAL:
        tile = tl.num_programs(0) - 1 - tile
    return tile


@triton.jit
def _fwd_tile_loop(
    acc,
    m_i,
    l_i,
    q,
    k_head,
    v_head,
    stride_kt,
    stride_vt,
    offs_m,
    offs_n,
    offs_d,
    lo,
    hi,
    T,
    qk_scale2,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax over key tiles [lo, hi): update (acc, m_i, l_i) of one query tile."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_head + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_head + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:  # diagonal or tail tile: bounds-checked loads and a mask on the scores
            k = tl.load(k_ptrs, mask=cols[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < T, other=0.0)
        else:  # interior tile: every key exists and is visible
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            visible = cols[None, :] < T
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: no NaN
        alpha = tl.math.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    T,
    T_BUCKET,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """O, LSE for one query tile of one (batch, head). Grid: (cdiv(T, BLOCK_M), B * H).

    Q, O: (B, H, T, HEAD_DIM); K, V: (B, H // GROUP, T, HEAD_DIM); LSE: (B, H, T) fp32 contiguous.
    ``T_BUCKET`` (next power of two of T) is only an autotuning key. Needs BLOCK_M % BLOCK_N == 0.
    """
    start_m = _query_tile(CAUSAL) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    k_head = K + b * stride_kb + kv_h * stride_kh  # this head's row 0; tiles are addressed in the loop
    v_head = V + b * stride_vb + kv_h * stride_vh

    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    scale = tl.cast(softmax_scale, tl.float32)  # fp32 whatever the caller passes (Inductor: fp64)
    qk_scale2 = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Phase 1: key tiles that need no mask. Causal: every tile left of this query tile's diagonal block.
    # Non-causal: every full tile. Phase 2: the diagonal block (causal) or the ragged tail (non-causal).
    if CAUSAL:
        interior_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        interior_end = (T // BLOCK_N) * BLOCK_N
        masked_end = T
    acc, m_i, l_i = _fwd_tile_loop(
        acc,
        m_i,
        l_i,
        q,
        k_head,
        v_head,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n,
        offs_d,
        0,
        interior_end,
        T,
        qk_scale2,
        False,
        CAUSAL,
        UPCAST,
        PRECISION,
        BLOCK_N,
    )
    acc, m_i, l_i = _fwd_tile_loop(
        acc,
        m_i,
        l_i,
        q,
        k_head,
        v_head,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n,
        offs_d,
        interior_end,
        masked_end,
        T,
        qk_scale2,
        True,
        CAUSAL,
        UPCAST,
        PRECISION,
        BLOCK_N,
    )

    # A row that saw no key (l = 0) gets O = 0 and LSE = +inf, so the backward's P = exp(S - LSE) is 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, _round_fp32_for_bf16(acc, UPCAST).to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    tl.store(LSE + bh * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """DELTA = rowsum(dO * O) in fp32, (B, H, T) contiguous. Grid: (cdiv(T, BLOCK_M), B * H)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < T
    o = tl.load(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        mask=row_ok,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_tile_loop(
    dk,
    dv,
    k,
    v,
    q_head,
    do_head,
    lse_ptr,
    delta_ptr,
    stride_qt,
    stride_dot,
    offs_n,
    offs_m_base,
    offs_d,
    lo,
    hi,
    T,
    qk_scale2,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) of one query head (transposed tiles)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m_base
        row_ok = offs_m < T
        q = tl.load(q_head + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(
            do_head + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        lse2 = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf")) * LOG2E  # missing row: P = 0
        delta = tl.load(delta_ptr + offs_m, mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale2  # (BLOCK_N, BLOCK_M) = S^T
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - D)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # dK += dS^T Q (scale applied later)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
    T_BUCKET,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of one key tile of one (batch, kv head). Grid: (cdiv(T, BLOCK_N), B * H // GROUP).

    Loops over the GROUP query heads that share this kv head and over their query tiles; DK, DV are
    contiguous (B, H // GROUP, T, HEAD_DIM). Needs BLOCK_N % BLOCK_M == 0.
    """
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    H_KV = H // GROUP
    b = bkv // H_KV
    kv_h = bkv % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m_base = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < T
    k = tl.load(
        K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
        mask=col_ok,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
        mask=col_ok,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scale = tl.cast(softmax_scale, tl.float32)  # fp32 whatever the caller passes (Inductor: fp64)
    qk_scale2 = scale * LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Causal: query tiles before start_n see none of these keys; the BLOCK_N rows from start_n straddle the
    # diagonal (masked); the rows after see all of them. Non-causal: every query tile, no mask.
    if CAUSAL:
        diag_lo = start_n
        diag_hi = tl.minimum(start_n + BLOCK_N, T)
    else:
        diag_lo = 0
        diag_hi = 0
    rest_lo = diag_hi  # causal: the rows below the diagonal block; non-causal: every row
    for g in range(GROUP):
        h = kv_h * GROUP + g
        q_head = Q + b * stride_qb + h * stride_qh  # this head's row 0; tiles are addressed in the loop
        do_head = DO + b * stride_dob + h * stride_doh
        lse_ptr = LSE + (b * H + h) * T
        delta_ptr = DELTA + (b * H + h) * T
        dk, dv = _dkdv_tile_loop(
            dk,
            dv,
            k,
            v,
            q_head,
            do_head,
            lse_ptr,
            delta_ptr,
            stride_qt,
            stride_dot,
            offs_n,
            offs_m_base,
            offs_d,
            diag_lo,
            diag_hi,
            T,
            qk_scale2,
            True,
            CAUSAL,
            UPCAST,
            PRECISION,
            BLOCK_M,
        )
        dk, dv = _dkdv_tile_loop(
            dk,
            dv,
            k,
            v,
            q_head,
            do_head,
            lse_ptr,
            delta_ptr,
            stride_qt,
            stride_dot,
            offs_n,
            offs_m_base,
            offs_d,
            rest_lo,
            T,
            T,
            qk_scale2,
            False,
            CAUSAL,
            UPCAST,
            PRECISION,
            BLOCK_M,
        )

    dk *= scale
    out = bkv * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, _round_fp32_for_bf16(dk, UPCAST).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + out, _round_fp32_for_bf16(dv, UPCAST).to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_tile_loop(
    dq,
    q,
    do,
    lse2,
    delta,
    k_head,
    v_head,
    stride_kt,
    stride_vt,
    offs_m,
    offs_n_base,
    offs_d,
    lo,
    hi,
    T,
    qk_scale2,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n_base
        k_ptrs = k_head + cols[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_head + cols[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale2
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            visible = cols[None, :] < T
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    softmax_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
    T_BUCKET,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of one query tile of one (batch, head). Grid: (cdiv(T, BLOCK_M), B * H).

    DQ is contiguous (B, H, T, HEAD_DIM). Needs BLOCK_M % BLOCK_N == 0.
    """
    start_m = _query_tile(CAUSAL) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv_h = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    lse2 = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    k_head = K + b * stride_kb + kv_h * stride_kh  # this head's row 0; tiles are addressed in the loop
    v_head = V + b * stride_vb + kv_h * stride_vh
    scale = tl.cast(softmax_scale, tl.float32)  # fp32 whatever the caller passes (Inductor: fp64)
    qk_scale2 = scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    if CAUSAL:
        interior_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        interior_end = (T // BLOCK_N) * BLOCK_N
        masked_end = T
    dq = _dq_tile_loop(
        dq,
        q,
        do,
        lse2,
        delta,
        k_head,
        v_head,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n_base,
        offs_d,
        0,
        interior_end,
        T,
        qk_scale2,
        False,
        CAUSAL,
        UPCAST,
        PRECISION,
        BLOCK_N,
    )
    dq = _dq_tile_loop(
        dq,
        q,
        do,
        lse2,
        delta,
        k_head,
        v_head,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n_base,
        offs_d,
        interior_end,
        masked_end,
        T,
        qk_scale2,
        True,
        CAUSAL,
        UPCAST,
        PRECISION,
        BLOCK_N,
    )

    dq *= scale
    tl.store(
        DQ + bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        _round_fp32_for_bf16(dq, UPCAST).to(DQ.dtype.element_ty),
        mask=row_ok[:, None],
    )


# True when the kernels above were defined under TRITON_INTERPRET=1 (they then run on CPU tensors, in numpy).
INTERPRETED: bool = type(attn_fwd_kernel).__name__ == "InterpretedFunction"
