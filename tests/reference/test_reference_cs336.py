"""The CS336 mapping: a TransformerLM written in the test from the course's equations, reading the course's
weight names, gives the logits of ScratchLM's reference TransformerLM and of the fast GPT (atol 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model import build_model
from scratchlm.reference.cs336 import cs336_config, from_cs336, to_cs336
from scratchlm.reference.transformer import TransformerLM

ARGS = dict(
    vocab_size=41, context_length=12, d_model=32, num_layers=2, num_heads=4, d_ff=56, rope_theta=10000.0
)


def course_forward(w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """CS336's TransformerLM, straight from the handout: RMSNorm, RoPE on (x_{2i}, x_{2i+1}) as a complex
    multiplication, causal multi-head attention, SwiGLU W2(SiLU(W1 x) * W3 x), pre-norm, untied head."""
    B, T = ids.shape
    H, C = ARGS["num_heads"], ARGS["d_model"]
    D = C // H
    freqs = 1.0 / ARGS["rope_theta"] ** (torch.arange(0, D, 2).float() / D)
    turn = torch.polar(torch.ones(T, D // 2), torch.arange(T).float()[:, None] * freqs)  # e^{i pos w}

    def rope(t):  # (B, H, T, D): pairs (2i, 2i+1) as complex numbers, times e^{i pos w}
        return torch.view_as_real(torch.view_as_complex(t.reshape(B, H, T, D // 2, 2)) * turn).flatten(-2)

    def rms(x, g):
        return F.rms_norm(x, (C,), g, 1e-5)

    x = w["token_embeddings.weight"][ids]
    for i in range(ARGS["num_layers"]):
        p = f"layers.{i}."
        h = rms(x, w[p + "ln1.weight"])
        q, k, v = ((h @ w[p + f"attn.{n}_proj.weight"].T).view(B, T, H, D).transpose(1, 2) for n in "qkv")
        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + a.transpose(1, 2).reshape(B, T, C) @ w[p + "attn.output_proj.weight"].T
        h = rms(x, w[p + "ln2.weight"])
        ffn = (F.silu(h @ w[p + "ffn.w1.weight"].T) * (h @ w[p + "ffn.w3.weight"].T)) @ w[
            p + "ffn.w2.weight"
        ].T
        x = x + ffn
    return rms(x, w["ln_final.weight"]) @ w["lm_head.weight"].T


def test_cs336_weights_run_in_the_reference_and_the_fast_model():
    cfg = cs336_config(**ARGS)
    torch.manual_seed(0)
    fast = build_model(cfg)
    with torch.no_grad():  # gains away from 1 so that a swapped norm would show
        for name, p in fast.named_parameters():
            if "ln" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    course_weights = to_cs336(fast.state_dict())
    assert {k for k in course_weights if not k.startswith("layers.")} == {
        "token_embeddings.weight",
        "ln_final.weight",
        "lm_head.weight",
    }
    assert len(course_weights) == 3 + 9 * ARGS["num_layers"]
    ref = TransformerLM(cfg)
    ref.load_state_dict(from_cs336(course_weights), strict=True)
    ids = torch.randint(0, ARGS["vocab_size"], (2, ARGS["context_length"]))
    want = course_forward(course_weights, ids)
    with torch.no_grad():
        torch.testing.assert_close(ref(ids)[0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast(ids)[0], want, atol=1e-5, rtol=1e-5)


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="not a weight of the CS336"):
        from_cs336({"layers.0.ffn.w4.weight": torch.zeros(1)})
