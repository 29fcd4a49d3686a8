"""Building blocks shared by the GPT and the encoder-decoder: norms, positions, MLPs, attention.

Shapes use the usual names: B batch, T query length, S key length, C = d_model, H query heads,
Hkv key/value heads, D = head_dim = C / H.

The math lives in plain functions: each layer calls them through its ``ops`` attribute, by default
:mod:`scratchlm.model.functional` (torch's fused kernels). ``model.impl=reference`` points ``ops`` at
:mod:`scratchlm.reference.functional` (the same math written out by hand) without touching the parameters.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.model import functional
from scratchlm.model.functional import apply_rope, causal_mask, gelu_tanh  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from scratchlm.model.cache import KVCache

# ----------------------------------------------------------------------------------------------------------
# norms


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) with optional bias.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, over the last dim.  x (..., C) -> (..., C)
    """

    ops = functional  # the math (scratchlm.reference.use_reference swaps in the hand-written twins)

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), as in Llama: no mean subtraction, no bias.

    y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, computed in float32 (as HF Llama: a 16-bit
    x is normalised in float32, cast back, then scaled by the weight).  x (..., C) -> (..., C)
    """

    ops = functional

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """The norm chosen by ``cfg.norm`` over ``dim`` features (default d_model)."""
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return LayerNorm(dim, cfg.norm_eps, bias=cfg.bias)


# ----------------------------------------------------------------------------------------------------------
# positions


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed positional encoding of "Attention Is All You Need" (section 3.5).

    PE[pos, 2i] = sin(pos / 10000^(2i/dim)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)).  -> (n_pos, dim)
    """
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    """positions (B, T) long -> PE[positions] (B, T, C); a fixed (non-trained, non-saved) table."""

    def __init__(self, n_pos: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_pos, dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.max() >= self.table.shape[0]:  # grow on demand (sinusoids extrapolate)
            self.table = sinusoidal_table(int(positions.max()) + 1, self.table.shape[1]).to(self.table)
        return self.table[positions]


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021): rotate each pair of q/k features by angle pos * theta^(-2i/D).

    Two pairings of the D features into D/2 planes (both are used in the wild):
      - ``interleaved`` (the paper, Meta's original Llama code): plane i = features (2i, 2i+1);
      - ``half`` (HF Llama's ``rotate_half``): plane i = features (i, i + D/2).
    They are the same rotation up to a fixed permutation of the D features, so a model trained with one
    convention converts to the other by permuting the rows of W_q and W_k.

    forward(positions (B, T) or (T,), max_len) -> (cos, sin_signed), each (B or 1, 1, T, D), float32, where sin_signed
    carries the sign of the rotation (see :func:`apply_rope`). The tables are computed once for positions
    ``0 .. max_positions - 1`` and grown on demand (``max_len``: an upper bound of the positions that the
    caller knows without reading them, e.g. the sequence length; None = read ``positions.max()``), so
    neither the forward nor the backward evaluates a sine or cosine again.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, style: str = "half", max_positions: int = 0):
        super().__init__()
        self.style = style
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)
        self.register_buffer("cos_table", torch.empty(0, head_dim), persistent=False)  # (n, D)
        self.register_buffer("sin_table", torch.empty(0, head_dim), persistent=False)  # (n, D), signed
        self._build(max_positions)

    def _build(self, n: int) -> None:
        """Tables for positions 0 .. n-1: angle(pos, i) = pos * inv_freq[i]."""
        freqs = torch.arange(n, device=self.inv_freq.device).float()[:, None] * self.inv_freq  # (n, D/2)
        sin, cos = freqs.sin(), freqs.cos()
        if self.style == "half":  # feature i and i + D/2 share angle i
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        else:  # features 2i and 2i+1 share angle i
            cos, sin = cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
        self.cos_table, self.sin_table = cos, sin

    def forward(
        self, positions: torch.Tensor, max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.ndim == 1:  # (T,): one row shared by the batch
            positions = positions[None]
        if positions.ndim != 2:
            raise ValueError(f"RoPE positions must be (B, T) or (T,), got {tuple(positions.shape)}")
        n = int(positions.max()) + 1 if max_len is None else max_len
        if n > self.cos_table.shape[0]:  # (a host-side check: max_len is a Python int)
            self._build(max(n, 2 * self.cos_table.shape[0]))
        return self.cos_table[positions][:, None], self.sin_table[positions][:, None]


# ----------------------------------------------------------------------------------------------------------
# MLPs


def make_dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nn.Identity when p == 0 (no op to dispatch on every call: decoding is op-bound)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def mlp_hidden_dim(cfg: ModelConfig) -> int:
    """d_ff, or the default: 4*C, and for SwiGLU 8C/3 rounded up to a multiple of cfg.multiple_of (Llama)."""
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.mlp == "swiglu":
        hidden = int(8 * cfg.d_model / 3)
        return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)
    return 4 * cfg.d_model


class MLP(nn.Module):
    """Position-wise feed-forward network.  x (B, T, C) -> (B, T, C), hidden width F = mlp_hidden_dim.

    gelu:      c_proj(gelu(c_fc(x)))                   (exact erf GELU, Hendrycks & Gimpel 2016; BERT)
    gelu_tanh: c_proj(gelu_tanh(c_fc(x)))              (its tanh approximation: GPT-2's "gelu_new")
    relu:      c_proj(relu(c_fc(x)))                   (the original Transformer)
    relu2:     c_proj(relu(c_fc(x))^2)                 (Primer, So et al. 2021)
    swiglu:    c_proj(silu(c_gate(x)) * c_fc(x))       (Shazeer 2020; Llama's w2(silu(w1 x) * w3 x))
    """

    ops = functional

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden_dim(cfg)
        self.kind = cfg.mlp
        self.c_fc = nn.Linear(cfg.d_model, hidden, bias=cfg.bias)
        self.c_gate = nn.Linear(cfg.d_model, hidden, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.c_proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = make_dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, F)
        if self.kind == "gelu":
            h = self.ops.gelu(h)
        elif self.kind == "gelu_tanh":
            h = self.ops.gelu_tanh(h)
        elif self.kind == "relu":
            h = self.ops.relu(h)
        elif self.kind == "relu2":
            h = self.ops.relu(h).square()
        else:  # swiglu
            h = self.ops.swiglu(self.c_gate(x), h)
        return self.dropout(self.c_proj(h))  # c_proj's input is the activation (explain hooks read it)


# ----------------------------------------------------------------------------------------------------------
# attention

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Say once per process why a faster path is not taken (no silent fallbacks)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def sdpa_backends(backend: str):
    """The context in which attention calls torch's SDPA for ``model.attention=backend``.

    ``sdpa_cudnn``: SDPA tries cuDNN's fused attention first, then flash, memory-efficient and math, in
    that order, wherever the one before cannot serve the call (a CPU, a mask or dtype it does not take).
    SDPA's own order puts flash before cuDNN, which on an H200 was 0.63x cuDNN's speed forward+backward at
    D = 64 (benchmarks/results/gpu_nvidia_h200_attention.md). Any other backend: SDPA's own choice.
    """
    if backend != "sdpa_cudnn":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return sdpa_kernel(order, set_priority=True)


class Attention(nn.Module):
    """Multi-head attention with grouped/multi-query heads (Hkv <= H), optional QK-norm and RoPE.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + M) V,  per head; M = 0 where allowed, -inf elsewhere.
    Q = x W_q (B, H, T, D); K, V = y W_k, y W_v (B, Hkv, S, D) with y = x (self) or the encoder memory
    (cross). Query head h reads key/value head h // (H / Hkv) (GQA, Ainslie et al. 2023).
    Output: concat of heads (B, T, H*D) -> c_proj -> (B, T, C).

    Backends (cfg.attention): ``sdpa`` (:func:`scratchlm.model.functional.scaled_dot_product_attention`:
    torch's fused kernel, or the formula where that is faster), ``manual`` (the formula above, step by
    step), ``flash_triton`` (scratchlm.model.kernels, training path only: no mask, no cache; otherwise sdpa,
    said once), ``sdpa_cudnn`` (sdpa with cuDNN's kernel first, see :func:`sdpa_backends`). Set ``record``
    to a dict to receive the scaled scores before the mask, the mask and the probabilities of the next
    calls (keys ``scores``, ``mask``, ``probs``; the formula is then computed step by step):
    ``scratchlm explain`` reads them from a forward hook.
    """

    ops = functional

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.backend = cfg.attention
        self.rope_style = cfg.rope_style
        self.dropout_p = cfg.dropout
        C, D = cfg.d_model, self.head_dim
        self.c_q = nn.Linear(C, self.n_head * D, bias=cfg.bias)
        self.c_k = nn.Linear(C, self.n_kv_head * D, bias=cfg.bias)
        self.c_v = nn.Linear(C, self.n_kv_head * D, bias=cfg.bias)
        self.c_proj = nn.Linear(self.n_head * D, C, bias=cfg.bias)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.resid_dropout = make_dropout(cfg.dropout)
        self.record: dict | None = None

    def project_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of y (B, S, C) -> k, v (B, Hkv, S, D) (k is QK-normed when enabled)."""
        B, S, _ = y.shape
        k = self.c_k(y).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.c_v(y).view(B, S, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        kv: None = self-attention; (B, S, C) memory = cross-attention; (k, v) = precomputed cross K/V.
        rope: (cos, sin) from RotaryEmbedding, applied to q and the new k.
        mask: bool (B or 1, 1, T, S), True = may attend (already includes causality when given).
        causal: with mask None, the plain causal mask (T == S).
        cache: a KVCache; the new k, v are written at slot cache.length of layer ``layer`` and attention
               runs over all stored keys (the caller advances cache.length once per model forward); with
               ``cache.slot`` set, over the mask's S slots (model/cache.py).
        """
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if isinstance(kv, tuple):
            k, v = kv
        else:
            k, v = self.project_kv(x if kv is None else kv)  # (B, Hkv, S, D)
        if rope is not None:
            q = self.ops.apply_rope(q, *rope, self.rope_style)
            k = self.ops.apply_rope(k, *rope, self.rope_style)
        if cache is not None:
            keys = None if mask is None else mask.shape[-1]  # a fixed-shape step attends over S slots
            k, v = cache.update(layer, k, v, keys)  # all keys so far (B, Hkv, S, D)
            if k.dtype != q.dtype:  # a float32 cache under autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
        y = self._attend(q, k, v, mask, causal, use_flash=cache is None and mask is None and kv is None)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q, k, v, mask, causal, use_flash) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + M) v: q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D)."""
        dropout_p = self.dropout_p if self.training else 0.0
        if self.backend == "flash_triton" and self.record is None:
            ok, why = self._flash_ok(q, use_flash and causal, dropout_p)
            if ok:
                from scratchlm.model.kernels.flash_attention import flash_attention

                # one dtype for the kernel: under autocast QK-norm returns float32 q, k beside a bf16 v
                # (sdpa's autocast rule casts all three to the autocast dtype; do the same)
                dt = v.dtype
                return flash_attention(q.to(dt), k.to(dt), v, causal=True)
            warn_once(f"attention=flash_triton not used ({why}); using sdpa")
        with sdpa_backends(self.backend):
            return self.ops.scaled_dot_product_attention(
                q,
                k,
                v,
                mask,
                causal=causal,
                dropout_p=dropout_p,
                explicit=self.backend == "manual",
                record=self.record,
            )

    def _flash_ok(self, q: torch.Tensor, plain_causal: bool, dropout_p: float) -> tuple[bool, str]:
        if not plain_causal:
            return (
                False,
                "it serves only the causal training path: no KV cache, padding mask or cross-attention",
            )
        if dropout_p > 0:
            return False, "the kernel has no attention dropout"
        try:
            from scratchlm.model.kernels.flash_attention import flash_available
        except ImportError as e:
            return False, f"kernel not importable: {e}"
        return flash_available(q.device)
