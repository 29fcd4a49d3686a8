"""The layers a course writes, one class per idea, computed only by :mod:`scratchlm.reference.functional`.

Each module holds its parameters under the fast model's names (``weight``, ``bias``, ``c_q``, ``c_fc``,
``ln_1``, ...), so ``load_state_dict`` takes a fast layer's (or model's) state dict unchanged; tests/reference
prove every one equal to its fast twin in scratchlm.model.layers (outputs and gradients).

    Linear                  y = x W^T (+ b)                                   (..., in) -> (..., out)
    Embedding               y = E[ids]                                        (...) -> (..., C)
    RMSNorm / LayerNorm     x / rms(x) * g ;  (x - mean) / std * g + b        (..., C) -> (..., C)
    RotaryPositionalEmbedding  rotate (q, k) feature planes by pos * theta^(-2i/D)
    sinusoidal_positions    PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(...)
    FeedForward             W_2 act(W_1 x)  or  SwiGLU: W_2 (silu(W_gate x) * W_1 x)
    MultiHeadSelfAttention  softmax(Q K^T / sqrt(D) + M) V per head; causal, RoPE, GQA, key padding
    CrossAttention          the same with K, V from the encoder memory

Shapes: B batch, T queries, S keys, C d_model, H query heads, Hkv key/value heads, D = C / H head_dim,
F the MLP's hidden width, V vocabulary. Boolean masks are True where a query MAY attend (torch's convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scratchlm.reference import functional as ops

# ----------------------------------------------------------------------------------------------------------
# the two layers with weights


class Linear(nn.Module):
    """y = x W^T (+ b).   x (..., in) -> (..., out);  W (out, in), as nn.Linear and the fast model.

    Init (CS336, Glorot-like): W ~ N(0, 2 / (in + out)) truncated at 3 sigma; b = 0.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        std = math.sqrt(2.0 / (in_features + out_features))
        self.weight = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(out_features, in_features), 0, std, -3 * std, 3 * std)
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    """Row lookup y = E[ids].   ids (...) long -> (..., C);  E (V, C).  Init: N(0, 1) truncated at 3."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_embeddings, embedding_dim), 0, 1, -3, 3)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ops.embedding(ids, self.weight)


# ----------------------------------------------------------------------------------------------------------
# norms


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * g.   (..., C) -> (..., C); g (C,)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * g + b.   (..., C) -> (..., C)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """``rmsnorm`` (Llama) or ``layernorm`` (GPT-2, the original Transformer) over ``dim`` features."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias)
    raise ValueError(f"norm {kind!r} is not one of rmsnorm, layernorm")


# ----------------------------------------------------------------------------------------------------------
# positions


class RotaryPositionalEmbedding(nn.Module):
    """RoPE (Su et al. 2021): turn every plane of x by angle pos * theta^(-2i/D), i = 0 .. D/2 - 1.

    x (B, H, T, D), token_positions (T,) or (B, T) -> (B, H, T, D). No parameters: the angles are
    computed from the positions on each call (:func:`scratchlm.reference.functional.rope`). ``style``:
    ``half`` pairs features (i, i + D/2) (HF Llama), ``interleaved`` (2i, 2i + 1) (the paper, CS336).
    """

    def __init__(self, theta: float, d_k: int, style: str = "half"):
        super().__init__()
        self.theta, self.d_k, self.style = theta, d_k, style

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor) -> torch.Tensor:
        return ops.rope(x, token_positions, self.theta, self.style)


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need" (section 3.5): (n_pos, dim), no parameters.

    PE[pos, 2i] = sin(pos / 10000^(2i/dim)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/dim)).
    """
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (n_pos, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float32)  # (ceil(dim/2),)
    angle = pos / 10000.0 ** (two_i / dim)  # (n_pos, ceil(dim/2))
    pe = torch.zeros(n_pos, dim)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe


# ----------------------------------------------------------------------------------------------------------
# feed-forward


class FeedForward(nn.Module):
    """Position-wise MLP.   x (B, T, C) -> (B, T, C), hidden width F.

    ``swiglu`` (Shazeer 2020; Llama, CS336):  c_proj(silu(c_gate(x)) * c_fc(x))   (CS336: w2, w1, w3)
    ``gelu`` / ``gelu_tanh`` (GPT-2) / ``relu`` (the original Transformer):  c_proj(act(c_fc(x)))
    ``relu2`` (Primer):  c_proj(relu(c_fc(x))^2).   Dropout (training only) on the output.
    """

    def __init__(
        self, d_model: int, d_ff: int, kind: str = "swiglu", bias: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        if kind not in ("swiglu", "gelu", "gelu_tanh", "relu", "relu2"):
            raise ValueError(f"mlp {kind!r} is not one of swiglu, gelu, gelu_tanh, relu, relu2")
        self.kind, self.dropout = kind, dropout
        self.c_fc = Linear(d_model, d_ff, bias)
        self.c_gate = Linear(d_model, d_ff, bias) if kind == "swiglu" else None
        self.c_proj = Linear(d_ff, d_model, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, F)
        if self.kind == "swiglu":
            h = ops.swiglu(self.c_gate(x), h)
        elif self.kind == "gelu":
            h = ops.gelu(h)
        elif self.kind == "gelu_tanh":
            h = ops.gelu_tanh(h)
        elif self.kind == "relu":
            h = ops.relu(h)
        else:
            h = ops.relu(h) ** 2
        return ops.dropout(self.c_proj(h), self.dropout if self.training else 0.0)


# ----------------------------------------------------------------------------------------------------------
# attention


def padding_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """key_mask (B, S) bool, True = real token -> (B, 1, 1, S): every query may attend to the real keys."""
    return key_mask.bool()[:, None, None, :]


def open_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """A query allowed no key at all (a padding position) would take a softmax over nothing (NaN): open
    such rows to every key. Their outputs are finite and nobody reads them (the loss ignores them)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


class MultiHeadAttention(nn.Module):
    """The projections shared by self- and cross-attention (GPT-2 names: c_q, c_k, c_v, c_proj).

    Q = x W_q: (B, T, C) -> (B, T, H*D) -> (B, H, T, D);  K, V = y W_k, y W_v -> (B, Hkv, S, D);
    out = concat_h(head_h) W_o: (B, H, T, D) -> (B, T, H*D) -> (B, T, C). Hkv < H is grouped-query
    attention (Ainslie et al. 2023): query head h reads key/value head h // (H / Hkv). ``qk_norm``: RMSNorm
    over D on every query and key head (q_norm, k_norm). ``dropout``: on the weights and on the output.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        bias: bool = False,
        qk_norm: bool = False,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_head, self.n_kv_head = num_heads, num_kv_heads or num_heads
        if d_model % num_heads or num_heads % self.n_kv_head:
            raise ValueError(
                f"d_model={d_model} must divide into num_heads={num_heads}, and num_heads into "
                f"num_kv_heads={self.n_kv_head}"
            )
        self.head_dim = D = d_model // num_heads
        self.dropout = dropout
        self.c_q = Linear(d_model, num_heads * D, bias)
        self.c_k = Linear(d_model, self.n_kv_head * D, bias)
        self.c_v = Linear(d_model, self.n_kv_head * D, bias)
        self.c_proj = Linear(num_heads * D, d_model, bias)
        self.q_norm = RMSNorm(D, eps) if qk_norm else None
        self.k_norm = RMSNorm(D, eps) if qk_norm else None

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """(B, L, n*D) -> (B, n, L, D): split the features into heads and put heads before positions."""
        B, L, _ = t.shape
        return t.view(B, L, n, self.head_dim).transpose(1, 2)

    def attend(self, x, y, mask, rope=None, positions=None) -> torch.Tensor:
        """x (B, T, C) queries, y (B, S, C) keys/values, mask bool (.., T, S) or None -> (B, T, C)."""
        B, T, _ = x.shape
        q = self._heads(self.c_q(x), self.n_head)  # (B, H, T, D)
        k = self._heads(self.c_k(y), self.n_kv_head)  # (B, Hkv, S, D)
        v = self._heads(self.c_v(y), self.n_kv_head)  # (B, Hkv, S, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # relative positions enter through q and k only
            q, k = rope(q, positions), rope(k, positions)
        p = self.dropout if self.training else 0.0
        out = ops.scaled_dot_product_attention(q, k, v, mask, dropout_p=p)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # concat the heads
        return ops.dropout(self.c_proj(out), p)


class MultiHeadSelfAttention(MultiHeadAttention):
    """Self-attention: Q, K, V all from x.   x (B, T, C) -> (B, T, C).

    causal: query t attends to keys 0..t (a decoder); key_mask (B, T) bool, True = real token (padding
    of an encoder's batch). rope_theta: rotate q and k by RoPE at ``token_positions`` (default 0..T-1);
    None = no RoPE (positions enter at the embedding instead).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        rope_theta: float | None = None,
        rope_style: str = "half",
        **kwargs,
    ):
        super().__init__(d_model, num_heads, num_kv_heads, **kwargs)
        self.rope = (
            RotaryPositionalEmbedding(rope_theta, self.head_dim, rope_style)
            if rope_theta is not None
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        *,
        causal: bool = True,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        T = x.shape[1]
        mask = ops.causal_mask(T, T, x.device)[None, None] if causal else None  # (1, 1, T, T)
        if key_mask is not None:
            pad = padding_mask(key_mask)  # (B, 1, 1, T)
            mask = open_empty_rows(pad if mask is None else mask & pad)
        if token_positions is None:
            token_positions = torch.arange(T, device=x.device)
        return self.attend(x, x, mask, self.rope, token_positions)


class CrossAttention(MultiHeadAttention):
    """Cross-attention (the decoder reads the source): Q from x (B, T, C), K and V from the encoder's
    memory (B, S, C) -> (B, T, C). memory_mask (B, S) bool, True = real source token; no causality, no RoPE.
    """

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        mask = None if memory_mask is None else open_empty_rows(padding_mask(memory_mask))
        return self.attend(x, memory, mask)
