"""Every building block of the model, written out in plain tensor operations (the way a course teaches them).

Each function has the formula and the shapes in its docstring and spells the math out step by step with
elementary tensor operations (matmul, exp, log, max, sum, erf, tanh, sigmoid, indexing): no fused kernel, no
``torch.nn.functional``. The functions that the model calls have the same name and signature as their fast
twins in :mod:`scratchlm.model.functional`, and tests/reference prove them equal in value and gradient;
``model.impl=reference`` trains through them.

In the order a course teaches them: linear, embedding, softmax (stable), log_softmax, relu, silu, gelu
(exact and tanh), rms_norm, layer_norm, rope (half and interleaved pairings), scaled_dot_product_attention
(causal, boolean mask, GQA), swiglu, dropout, cross_entropy (ignore_index, label smoothing).

Conventions (the same in both paths): a boolean attention mask is True where a query MAY attend to a key;
RoPE ``half`` pairs features (i, i + D/2) (HF Llama), ``interleaved`` pairs (2i, 2i + 1) (the RoPE paper);
``gelu`` is the exact erf form, ``gelu_tanh`` GPT-2's approximation.
"""

from __future__ import annotations

import math

import torch

# shape checks only (they compute nothing the model uses): shared with the fast path, so both refuse alike
from scratchlm.model.functional import check_attention_shapes, check_rope_tables

# ----------------------------------------------------------------------------------------------------------
# the two layers with weights


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b.   x (..., in), W (out, in), b (out,) -> y (..., out)."""
    y = x @ weight.T  # (..., in) @ (in, out) -> (..., out)
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Row lookup: E[ids].   ids (...) long, E (V, C) -> (..., C).

    The same as one_hot(ids, V) @ E (a linear layer on one-hot inputs) without building the one-hot
    matrix; the gradient of E is the sum of the output gradients of the rows that used each id.
    """
    return weight[ids]


# ----------------------------------------------------------------------------------------------------------
# softmax and activations


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m), m = max_j x_j.

    Subtracting the max changes nothing mathematically (it cancels) but keeps exp from overflowing:
    the largest exponent is exp(0) = 1. A row of all -inf (nothing allowed) gives NaN, as torch.
    """
    m = x.max(dim=dim, keepdim=True).values
    e = torch.exp(x - m)
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log softmax(x)_i = (x_i - m) - log sum_j exp(x_j - m)  (the log-sum-exp trick, m = max x)."""
    z = x - x.max(dim=dim, keepdim=True).values
    return z - torch.log(torch.exp(z).sum(dim=dim, keepdim=True))


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0)."""
    return torch.where(x > 0, x, torch.zeros_like(x))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish (Elfwing et al. 2017; Ramachandran et al. 2017): x * sigmoid(x), sigmoid(x) = 1 / (1 + e^-x)."""
    return x * torch.sigmoid(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, exact (Hendrycks & Gimpel 2016): x * Phi(x), Phi the standard normal CDF = (1 + erf(x / sqrt 2)) / 2."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's ``gelu_new``): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"): silu(x W_gate) * (x W_up).

    gate, up (..., F) -> (..., F); the MLP then projects back with W_down.
    """
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    return silu(gate) * up


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout: zero each element with probability p, scale the rest by 1 / (1 - p) (training only).

    The expectation is unchanged, so nothing needs rescaling at eval time (where p = 0 is passed).
    """
    if p == 0.0:
        return x
    keep = torch.rand_like(x, dtype=torch.float32) >= p
    return x * keep / (1.0 - p)


# ----------------------------------------------------------------------------------------------------------
# norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * g over the last dim.  (..., C) -> (..., C)

    Computed in float32 and cast back before the gain g (as HF Llama), so 16-bit inputs lose nothing.
    """
    x32 = x.float()
    mean_square = (x32 * x32).mean(dim=-1, keepdim=True)  # (..., 1)
    y = (x32 / torch.sqrt(mean_square + eps)).to(x.dtype)
    return y if weight is None else weight * y


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * g + b over the last dim.  (..., C) -> (..., C)

    var is the biased variance mean((x - mean)^2), as torch.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------------------
# rotary position embedding


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The angle of every plane: angle[pos, i] = pos * theta^(-2i/D), i = 0 .. D/2 - 1.  (...) -> (..., D/2)

    Low planes spin fast (they tell nearby positions apart), high planes slowly (long range).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)  # (D/2,)
    return positions.float()[..., None] * inv_freq.to(positions.device)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Turn every plane (a, b) of x (..., D) by its angle t:  a' = a cos t - b sin t,  b' = a sin t + b cos t.

    cos, sin (..., D/2) broadcast against x's planes. ``half``: plane i = (x[i], x[i + D/2]);
    ``interleaved``: plane i = (x[2i], x[2i + 1]). Computed in float32, returned in x's dtype.
    """
    x32 = x.float()
    if style == "half":
        a, b = x32[..., : x.shape[-1] // 2], x32[..., x.shape[-1] // 2 :]
    elif style == "interleaved":
        a, b = x32[..., 0::2], x32[..., 1::2]
    else:
        raise ValueError(f"rope style {style!r} is not one of half, interleaved")
    a2, b2 = a * cos - b * sin, a * sin + b * cos
    if style == "half":
        out = torch.cat((a2, b2), dim=-1)
    else:
        out = torch.stack((a2, b2), dim=-1).flatten(-2)  # (..., D/2, 2) -> (..., D) back in pair order
    return out.to(x.dtype)


def rope(
    x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0, style: str = "half"
) -> torch.Tensor:
    """RoPE (Su et al. 2021) from first principles: x (B, H, T, D), positions (T,) or (B, T) -> (B, H, T, D).

    Query and key at positions m and n, rotated by m * w and n * w, have a dot product that depends only
    on m - n: attention sees relative positions.
    """
    if positions.ndim == 1:
        positions = positions[None]  # (1, T)
    angles = rope_angles(positions, x.shape[-1], theta)[:, None]  # (B, 1, T, D/2): one angle per plane
    return rotate(x, torch.cos(angles), torch.sin(angles), style)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, style: str) -> torch.Tensor:
    """The model's interface: x (B, H, T, D) and the (cos, sin_signed) (B or 1, 1, T, D) tables of
    ``RotaryEmbedding``, which hold cos t and -sin t / +sin t at the first / second feature of each plane.
    Reads one cos and one sin per plane from them and calls :func:`rotate`."""
    check_rope_tables(x, cos, sin_signed)
    D = x.shape[-1]
    if style == "half":
        return rotate(x, cos[..., : D // 2], sin_signed[..., D // 2 :], style)
    return rotate(x, cos[..., 0::2], sin_signed[..., 1::2], style)


# ----------------------------------------------------------------------------------------------------------
# attention


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (T, S), True = may attend: M[t, s] = (s <= S - T + t).

    The T queries are the last T of the S positions (S > T when keys from a KV cache come first), so
    query t sits at position S - T + t and sees every key up to and including its own position.
    With T == S this is the lower triangle: row t has ones in columns 0..t.
    """
    query_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return key_pos <= query_pos  # (T, S) by broadcasting


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    explicit: bool = True,
    record: dict | None = None,
) -> torch.Tensor:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + M) V  (Vaswani et al. 2017), for every head.

    q (B, H, T, D); k, v (B, Hkv, S, D) with H a multiple of Hkv -> (B, H, T, D).
    GQA (Ainslie et al. 2023): query head h reads key/value head h // (H / Hkv); Hkv = 1 is multi-query.
    mask: bool broadcastable to (B, H, T, S), True = query may attend to key; M = 0 there, -inf elsewhere.
    causal: query t may attend to keys 0..t (T == S). dropout_p: dropout on the attention weights.
    record: a dict receiving ``scores`` (before the mask), ``mask`` and ``probs`` (as the fast path).
    ``explicit`` is accepted for the fast path's signature; this one is always explicit.
    """
    check_attention_shapes(q, k, v, mask, causal)
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    if Hkv != H:  # give every query head its key/value head: (B, Hkv, S, D) -> (B, H, S, D)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, D) @ (B, H, D, S) -> (B, H, T, S)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)  # (T, S), True = may attend
    masked = scores if mask is None else torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    probs = softmax(masked.float(), dim=-1).to(q.dtype)  # each row sums to 1 over the allowed keys
    if record is not None:
        record.update(scores=scores.detach().float(), mask=mask, probs=probs.detach())
    probs = dropout(probs, dropout_p)
    return probs @ v  # (B, H, T, S) @ (B, H, S, D) -> (B, H, T, D): a weighted average of the values


# ----------------------------------------------------------------------------------------------------------
# loss


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean over the N' targets != ignore_index of  -(1 - eps) log p[y] - eps * (1/V) sum_v log p[v].

    logits (N, V), targets (N,) long -> scalar. p = softmax(logits). With eps = label_smoothing
    (Szegedy et al. 2016), the target distribution is 1 - eps on y plus eps / V on every class.
    All targets ignored -> NaN (0 / 0), as torch.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (N, V) "
            "and (N,); flatten the batch and time dims first"
        )
    logp = log_softmax(logits, dim=-1)  # (N, V)
    valid = targets != ignore_index  # (N,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # any class for ignored rows (zeroed below)
    nll = -logp.gather(1, safe[:, None])[:, 0]  # (N,): -log p[y]
    loss = nll if label_smoothing == 0.0 else (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return (loss * valid).sum() / valid.sum()
