"""The fast path as plain functions: what the model's layers call (norms, activations, RoPE, attention, loss).

Each function here has a hand-written twin with the same name and signature in
:mod:`scratchlm.reference.functional`, tested equal in forward and backward; ``model.impl=reference`` makes
the layers call those instead (see :func:`scratchlm.reference.use_reference`). These call torch's fused
kernels and check the shapes that would otherwise broadcast silently into a wrong result.

Conventions (shared with the reference twins):
- a boolean attention ``mask`` is True where a query MAY attend to a key (torch's sdpa convention);
- RoPE pairs features either ``half`` (i, i + D/2; HF Llama) or ``interleaved`` (2i, 2i + 1; the paper);
- ``gelu`` is the exact erf form, ``gelu_tanh`` the tanh approximation (GPT-2's "gelu_new");
- ``cross_entropy`` skips targets equal to ``ignore_index`` and averages over the rest.

Shapes: B batch, T queries, S keys, H query heads, Hkv key/value heads, D head_dim, C features, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# norms


def _check_norm(x: torch.Tensor, weight: torch.Tensor | None, name: str) -> None:
    if weight is not None and (weight.ndim != 1 or weight.shape[0] != x.shape[-1]):
        raise ValueError(
            f"{name}: weight {tuple(weight.shape)} must be ({x.shape[-1]},) for x {tuple(x.shape)}"
        )


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last dim (biased var).  (..., C) -> (..., C)"""
    _check_norm(x, weight, "layer_norm")
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim.  (..., C) -> (..., C)

    A 16-bit x is normalised in float32, cast back, then scaled by the weight (as HF Llama).
    """
    _check_norm(x, weight, "rms_norm")
    if x.dtype == torch.float32:  # one fused op (the common case: the fp32 residual stream)
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    y = F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)
    return y if weight is None else weight * y


# ----------------------------------------------------------------------------------------------------------
# activations


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max x) / sum exp(x - max x) along ``dim``."""
    return F.softmax(x, dim=dim)


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x - logsumexp(x) along ``dim``."""
    return F.log_softmax(x, dim=dim)


def relu(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0)."""
    return F.relu(x)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) (a.k.a. swish)."""
    return F.silu(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, exact (Hendrycks & Gimpel 2016):  x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's ``gelu_new``):  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Eager: ATen's fused kernel. Under torch.compile the same function is written with a sigmoid,
    ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`` (because (1 + tanh z) / 2 = sigmoid(2z)), in float32,
    which inductor's CPU code runs about twice as fast as its tanh (forward + backward, measured).
    """
    if torch.compiler.is_compiling():
        x32 = x.float()
        z = math.sqrt(2.0 / math.pi) * (x32 + 0.044715 * x32 * x32 * x32)
        return (x32 * torch.sigmoid(2.0 * z)).to(x.dtype)
    return F.gelu(x, approximate="tanh")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating (Shazeer 2020): silu(gate) * up, elementwise; both (..., F)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------
# rotary positions


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the tables (cos, sin_signed) (B or 1, 1, T, D) of ``RotaryEmbedding``.

    Each plane (a, b) turns by its angle t:  a' = a cos t - b sin t,  b' = b cos t + a sin t, i.e.
    x' = x * cos + swap(x) * sin_signed, where swap exchanges the two features of every plane and
    sin_signed holds -sin t at the first feature of a plane and +sin t at the second:

    half:        plane i = (x[i], x[i + D/2]):  swap(x) = cat(x[D/2:], x[:D/2]) (a roll by D/2)
    interleaved: plane i = (x[2i], x[2i+1]):    swap(x)[2i] = x[2i+1], swap(x)[2i+1] = x[2i]

    (HF's ``rotate_half(x) * sin`` with the sign folded into the table: the same numbers, fewer ops.)
    """
    check_rope_tables(x, cos, sin_signed)
    if style == "half":
        swapped = x.roll(x.shape[-1] // 2, dims=-1)
    elif style == "interleaved":
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (B, H, T, D/2, 2) pairs swapped
    else:
        raise ValueError(f"rope style {style!r} is not one of half, interleaved")
    out = x * cos + swapped * sin_signed  # float32 tables: a 16-bit x is rotated in float32
    return out if out.dtype == x.dtype else out.to(x.dtype)


def check_rope_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Refuse tables that would broadcast against x (B, H, T, D) along the wrong axes (e.g. H == T)."""
    B, _, T, D = x.shape
    for t in (cos, sin):
        if t.ndim != 4 or t.shape[1] != 1 or t.shape[2] != T or t.shape[3] != D or t.shape[0] not in (1, B):
            raise ValueError(
                f"RoPE tables {tuple(t.shape)} do not fit x {tuple(x.shape)}: expected ({B} or 1, 1, {T}, {D})"
            )


# ----------------------------------------------------------------------------------------------------------
# attention

# The explicit formula beats sdpa's CPU kernel when training in 16 bits with a small score matrix: the CPU
# flash-attention *backward* in bf16 is slow there (torch 2.13, 2-core AVX-512/AMX machine, fwd+bwd per
# layer: (B, H, T, D) = (12, 4, 64, 32): 11.7 ms sdpa vs 3.2 ms explicit; (8, 6, 256, 64): 36 vs 31 ms;
# in fp32 sdpa wins: 2.0 vs 2.5 and 30 vs 49 ms). The explicit path keeps the B*H*T*S probabilities for
# the backward, so it is used only up to this many of them (2^24: 32 MB in bf16 per layer).
_CPU_MATH_MAX_SCORES = 1 << 24


def _cpu_math_is_faster(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether to compute the formula rather than call sdpa (CPU, 16-bit, training, small S)."""
    return (
        q.device.type == "cpu"
        and v.dtype in (torch.bfloat16, torch.float16)
        and q.requires_grad
        and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= _CPU_MATH_MAX_SCORES
    )


def causal_mask(T: int, S: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean (T, S), True = may attend: query t sits at absolute slot S - T + t and sees keys <= it."""
    q_slot = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_slot


def check_attention_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> None:
    """q (B, H, T, D), k and v (B, Hkv, S, D) with H % Hkv == 0; mask bool, broadcastable to (B, H, T, S)."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, H, T, D) "
            "and (B, Hkv, S, D) with k and v of one shape"
        )
    (B, H, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if Bk != B or Dk != D or H % Hkv:
        raise ValueError(
            f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} need one batch and head_dim, and the "
            "query heads a multiple of the key/value heads"
        )
    if mask is not None:
        if causal:
            raise ValueError("attention: give either a mask or causal=True (fold causality into the mask)")
        if mask.dtype != torch.bool:
            raise ValueError(f"attention: mask must be bool (True = may attend), got {mask.dtype}")
        ok = mask.ndim == 4 and mask.shape[0] in (1, B) and mask.shape[1] in (1, H)
        if not (ok and mask.shape[2] in (1, T) and mask.shape[3] == S):
            raise ValueError(
                f"attention: mask {tuple(mask.shape)} must be (B or 1, H or 1, T or 1, S) = "
                f"({B}, {H}, {T}, {S})"
            )
    elif causal and T != S:
        raise ValueError(f"attention: causal=True needs T == S (got {T} queries, {S} keys); pass a mask")


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    explicit: bool = False,
    record: dict | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + M) v per head; M = 0 where ``mask`` is True, -inf elsewhere.

    q (B, H, T, D), k and v (B, Hkv, S, D) -> (B, H, T, D). Query head h reads key/value head
    h // (H / Hkv) (GQA). mask: bool, broadcastable to (B, H, T, S), True = may attend; or ``causal``
    (T == S, query t sees keys <= t). dropout_p: dropout on the probabilities (pass 0 in eval).

    explicit: compute the formula step by step instead of calling torch's fused kernel (also chosen
    automatically where it is faster: CPU, 16-bit training). record: a dict that receives, from the
    explicit computation, ``scores`` (q k^T / sqrt(D), before the mask, (B, H, T, S), float32), ``mask``
    ((T, S) or as given, bool, or None) and ``probs`` (the softmax after the mask, (B, H, T, S)), detached.
    """
    check_attention_shapes(q, k, v, mask, causal)
    gqa = k.shape[1] != q.shape[1]
    if not (explicit or record is not None or _cpu_math_is_faster(q, k, v)):
        # enable_gqa: sdpa maps query heads to kv heads itself, without copying k and v per group
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, enable_gqa=gqa
        )
    if gqa:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    masked = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(masked.float(), dim=-1).to(q.dtype)
    if record is not None:
        record.update(scores=scores.detach().float(), mask=mask, probs=probs.detach())
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


# ----------------------------------------------------------------------------------------------------------
# loss


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean over targets != ignore_index of  -(1 - eps) log p[target] - eps * mean_v log p[v].

    logits (N, V) float, targets (N,) long; p = softmax(logits); eps = label_smoothing (Szegedy et al.
    2016: the target distribution puts 1 - eps on the target and eps spread evenly over all V classes).
    Every target ignored -> NaN (0 / 0), as torch.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must be (N, V) "
            "and (N,); flatten the batch and time dims first"
        )
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=label_smoothing)
