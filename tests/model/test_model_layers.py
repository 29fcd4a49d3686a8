"""Layers against torch references: norms, sinusoids, RoPE conventions, attention backends and GQA."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.model.gpt import attention_mask_for
from scratchlm.model.layers import (
    MLP,
    Attention,
    LayerNorm,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    causal_mask,
    mlp_hidden_dim,
    sinusoidal_table,
)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=100, d_model=32, n_head=4, n_layer=2, context_length=32)
    return ModelConfig(**{**base, **kw})


def test_norms_match_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    ln, ref = LayerNorm(16, 1e-5), torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
        ref.weight.copy_(ln.weight), ref.bias.copy_(ln.bias)
    torch.testing.assert_close(ln(x), ref(x))
    rms, ref_rms = RMSNorm(16, 1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_(), ref_rms.weight.copy_(rms.weight)
    torch.testing.assert_close(rms(x), ref_rms(x))


def test_sinusoidal_table_follows_the_paper_formula():
    table = sinusoidal_table(20, 8)
    for pos in (0, 3, 19):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rope_conventions_differ_by_a_feature_permutation():
    torch.manual_seed(0)
    D, T = 8, 6
    q, k = torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    pos = torch.arange(T)[None]
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))  # interleaved feature -> half slot
    half, inter = RotaryEmbedding(D, style="half"), RotaryEmbedding(D, style="interleaved")
    q_half = apply_rope(q[..., perm], *half(pos), "half")
    q_inter = apply_rope(q, *inter(pos), "interleaved")
    torch.testing.assert_close(q_half, q_inter[..., perm])
    # so the attention scores are identical
    k_half, k_inter = apply_rope(k[..., perm], *half(pos), "half"), apply_rope(k, *inter(pos), "interleaved")
    torch.testing.assert_close(q_half @ k_half.transpose(-1, -2), q_inter @ k_inter.transpose(-1, -2))
    # and the scores depend only on the relative position (the point of RoPE)
    shifted = apply_rope(q, *inter(pos + 5), "interleaved") @ apply_rope(k, *inter(pos + 5), "interleaved").mT
    torch.testing.assert_close(shifted, q_inter @ k_inter.mT, atol=1e-5, rtol=1e-5)


def test_rope_half_matches_hf_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    torch.manual_seed(0)
    D, T = 16, 7
    hf_cfg = LlamaConfig(
        hidden_size=4 * D,
        num_attention_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    q, k = torch.randn(2, 4, T, D), torch.randn(2, 4, T, D)
    pos = torch.arange(3, 3 + T)[None].expand(2, T)
    cos, sin = llama.LlamaRotaryEmbedding(hf_cfg)(q, pos)
    q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryEmbedding(D, theta=500.0, style="half")(pos)
    torch.testing.assert_close(apply_rope(q, *ours, "half"), q_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(apply_rope(k, *ours, "half"), k_ref, atol=1e-6, rtol=1e-5)


def test_mlp_hidden_width_conventions():
    assert mlp_hidden_dim(tiny(mlp="gelu")) == 128
    assert mlp_hidden_dim(tiny(d_model=288, mlp="swiglu", multiple_of=32)) == 768  # llama2.c 15M
    assert mlp_hidden_dim(tiny(mlp="swiglu", d_ff=50)) == 50
    x = torch.randn(2, 3, 32)
    for kind in ("gelu", "relu", "relu2", "swiglu"):
        assert MLP(tiny(mlp=kind))(x).shape == x.shape


def _attn_inputs(n_kv_head=None, **kw):
    torch.manual_seed(0)
    attn = Attention(tiny(n_kv_head=n_kv_head, **kw)).eval()
    return attn, torch.randn(2, 6, 32)


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_sdpa_equals_manual_with_masks(n_kv_head):
    attn, x = _attn_inputs(n_kv_head, qk_norm=True)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    masks = [dict(causal=True), dict(mask=attention_mask_for(6, 6, key_mask, x.device))]
    for kw in masks:
        attn.backend = "sdpa"
        out_sdpa = attn(x, **kw)
        attn.backend = "manual"
        torch.testing.assert_close(attn(x, **kw), out_sdpa, atol=1e-6, rtol=1e-5)


def test_attention_records_scores_mask_and_probabilities():
    attn, x = _attn_inputs()
    out = attn(x, causal=True)
    attn.record = {}
    torch.testing.assert_close(attn(x, causal=True), out, atol=1e-6, rtol=1e-5)  # same output, recorded
    scores, mask, probs = attn.record["scores"], attn.record["mask"], attn.record["probs"]
    assert probs.shape == scores.shape == (2, 4, 6, 6) and mask.shape == (6, 6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))
    assert (probs.triu(1) == 0).all()  # no weight on future keys
    upper = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert (scores[..., upper] != 0).all() and scores.isfinite().all()  # recorded before the mask
    torch.testing.assert_close(probs, torch.softmax(scores.masked_fill(~mask, float("-inf")), -1))


def test_mha_matches_torch_multihead_attention():
    attn, x = _attn_inputs(None)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.c_q.bias, attn.c_k.bias, attn.c_v.bias]))
        ref.out_proj.weight.copy_(attn.c_proj.weight), ref.out_proj.bias.copy_(attn.c_proj.bias)
    mask = ~causal_mask(6, 6)  # torch: True = not allowed
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x, causal=True), expected, atol=1e-6, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa, x = _attn_inputs(2)
    mha = Attention(tiny()).eval()
    D = 8
    with torch.no_grad():
        for name in ("c_q", "c_proj"):
            getattr(mha, name).load_state_dict(getattr(gqa, name).state_dict())
        for name in ("c_k", "c_v"):  # query head h reads kv head h // 2
            w, b = getattr(gqa, name).weight.view(2, D, 32), getattr(gqa, name).bias.view(2, D)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
            getattr(mha, name).bias.copy_(b.repeat_interleave(2, dim=0).reshape(32))
    torch.testing.assert_close(gqa(x, causal=True), mha(x, causal=True), atol=1e-6, rtol=1e-5)


def test_flash_triton_falls_back_to_sdpa_on_cpu_with_one_warning():
    attn, x = _attn_inputs(attention="flash_triton")
    with pytest.warns(UserWarning, match="flash_triton not used"):
        out = attn(x, causal=True)
    attn.backend = "sdpa"
    torch.testing.assert_close(out, attn(x, causal=True))


def test_gelu_tanh_compiled_form_is_the_same_function():
    from scratchlm.model.layers import gelu_tanh

    x = torch.linspace(-8, 8, 4001)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(gelu_tanh(x), ref)
    compiled = torch.compile(gelu_tanh, fullgraph=True)
    torch.testing.assert_close(compiled(x), ref, atol=1e-6, rtol=1e-6)
    # the gradient too (the form matters for the backward inductor generates)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    gelu_tanh(a).sum().backward()
    compiled(b).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5)
