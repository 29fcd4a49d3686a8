"""Every course module of scratchlm.reference loads its fast twin's state dict and computes the same thing.

Tolerance (fp32, CPU): outputs, losses and parameter gradients within atol = rtol = 1e-5 (measured: a few
1e-7 for the layers, up to ~2e-6 for whole models: the same math, summed in another order). Norm gains and
biases are randomised so that a swapped or missing parameter would show.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.model import build_model
from scratchlm.model.gpt import Block
from scratchlm.model.layers import MLP, Attention, LayerNorm, RMSNorm, RotaryEmbedding, sinusoidal_table
from scratchlm.model.seq2seq import DecoderBlock
from scratchlm.reference import layers as ref
from scratchlm.reference import transformer as reft

TOL = dict(atol=1e-5, rtol=1e-5)
V = 53


def cfg_of(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, d_model=32, context_length=16)
    return ModelConfig(**{**base, **kw})


GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True)
LLAMA = dict(
    norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False, multiple_of=16
)
LM_VARIANTS = {
    "gpt2": GPT2,
    "llama-gqa": {**LLAMA, "label_smoothing": 0.1},
    "rope-interleaved-mqa-qknorm": {**LLAMA, "rope_style": "interleaved", "n_kv_head": 1, "qk_norm": True},
    "sinusoidal-postnorm-relu2": dict(pos="sinusoidal", norm_position="post", mlp="relu2", d_ff=48),
    "nopos-gelu": dict(pos="none", mlp="gelu"),
}
S2S_VARIANTS = {
    "paper": dict(pos="sinusoidal", norm_position="post", mlp="relu", label_smoothing=0.1, n_encoder_layer=3),
    "prenorm-learned-untied-gqa": dict(
        pos="learned",
        norm="rmsnorm",
        mlp="swiglu",
        share_embeddings=False,
        tie_embeddings=False,
        n_kv_head=2,
        multiple_of=16,
    ),
    "nopos": dict(pos="none", mlp="gelu"),
}


def randomise(model: nn.Module) -> None:
    """Norm gains near 1 and biases near 0, all different (a default 1 / 0 would hide a mix-up)."""
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0))


def twin(fast: nn.Module, reference: nn.Module) -> nn.Module:
    """``reference`` with the fast module's weights, loaded strictly (same names, same shapes)."""
    randomise(fast)
    reference.load_state_dict(fast.state_dict(), strict=True)
    return reference


def assert_same_grads(fast: nn.Module, reference: nn.Module) -> None:
    fast_grads = {n: p.grad for n, p in fast.named_parameters()}
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert fast_grads.keys() == ref_grads.keys()
    for name, g in fast_grads.items():
        torch.testing.assert_close(ref_grads[name], g, **TOL, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------------------
# layers


def test_linear_and_embedding_equal_torch():
    torch.manual_seed(0)
    lin, emb = nn.Linear(12, 7), nn.Embedding(20, 6)
    r_lin, r_emb = twin(lin, ref.Linear(12, 7, bias=True)), twin(emb, ref.Embedding(20, 6))
    x, ids = torch.randn(3, 5, 12), torch.randint(0, 20, (3, 5))
    torch.testing.assert_close(r_lin(x), lin(x), **TOL)
    torch.testing.assert_close(r_emb(ids), emb(ids), **TOL)
    # the course init: std sqrt(2 / (in + out)) truncated at 3 sigma, embeddings N(0, 1) truncated at 3
    w = ref.Linear(400, 600).weight
    assert abs(w.std().item() / (2 / 1000) ** 0.5 - 0.986) < 0.01  # a 3-sigma cut keeps 0.986 of the std
    assert w.abs().max() <= 3 * (2 / 1000) ** 0.5


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norms_equal_the_fast_ones(kind):
    fast = RMSNorm(24, 1e-6) if kind == "rmsnorm" else LayerNorm(24, 1e-6, bias=True)
    r = twin(fast, ref.make_norm(kind, 24, 1e-6, bias=True))
    x = torch.randn(2, 5, 24, requires_grad=True)
    torch.testing.assert_close(r(x), fast(x), **TOL)


def test_sinusoidal_positions_equal_the_fast_table():
    torch.testing.assert_close(ref.sinusoidal_positions(50, 34), sinusoidal_table(50, 34), **TOL)


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "gelu_tanh", "relu", "relu2"])
def test_feed_forward_equals_the_fast_mlp(kind):
    cfg = cfg_of(mlp=kind, d_ff=40, bias=kind != "swiglu")
    fast = MLP(cfg)
    r = twin(fast, ref.FeedForward(32, 40, kind, cfg.bias))
    x = torch.randn(2, 6, 32)
    (fast(x).square().sum()).backward()
    (r(x).square().sum()).backward()
    assert_same_grads(fast, r)


def _positions_tables(cfg: ModelConfig, T: int):
    pos = torch.arange(T)
    return pos, RotaryEmbedding(cfg.d_model // cfg.n_head, cfg.rope_theta, cfg.rope_style)(pos)


@pytest.mark.parametrize(
    "kw",
    [
        dict(pos="learned"),
        dict(pos="rope", n_kv_head=2, bias=False),
        dict(pos="rope", rope_style="interleaved", n_kv_head=1, qk_norm=True, rope_theta=500.0),
    ],
    ids=["mha", "rope-gqa", "rope-interleaved-mqa-qknorm"],
)
def test_causal_self_attention_equals_the_fast_attention(kw):
    cfg = cfg_of(**kw)
    fast = Attention(cfg)
    rope = cfg.pos == "rope"
    r = twin(
        fast,
        ref.MultiHeadSelfAttention(
            32,
            4,
            cfg.n_kv_head,
            rope_theta=cfg.rope_theta if rope else None,
            rope_style=cfg.rope_style,
            bias=cfg.bias,
            qk_norm=cfg.qk_norm,
        ),
    )
    x = torch.randn(3, 9, 32)
    pos, tables = _positions_tables(cfg, 9)
    want = fast(x, rope=tables if rope else None, causal=True)
    got = r(x, pos)
    torch.testing.assert_close(got, want, **TOL)
    want.sum().backward()
    got.sum().backward()
    assert_same_grads(fast, r)


def test_padded_self_attention_and_cross_attention_equal_the_fast_attention():
    cfg = cfg_of(n_kv_head=2)
    fast_self, fast_cross = Attention(cfg), Attention(cfg)
    r_self = twin(fast_self, ref.MultiHeadSelfAttention(32, 4, 2, bias=True))
    r_cross = twin(fast_cross, ref.CrossAttention(32, 4, 2, bias=True))
    x, memory = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    key_mask = torch.ones(3, 7, dtype=torch.bool)
    key_mask[1, 4:] = False
    key_mask[2] = False  # a row of padding only: opened, finite
    fast_mask = key_mask[:, None, None, :]
    fast_mask = fast_mask | ~fast_mask.any(-1, keepdim=True)
    torch.testing.assert_close(
        r_self(x, causal=False, key_mask=key_mask), fast_self(x, mask=fast_mask), **TOL
    )
    mem_mask = torch.ones(3, 5, dtype=torch.bool)
    mem_mask[0, 2:] = False
    want = fast_cross(x, memory, mask=mem_mask[:, None, None, :])
    got = r_cross(x, memory, mem_mask)
    torch.testing.assert_close(got, want, **TOL)
    want.sum().backward()
    got.sum().backward()
    assert_same_grads(fast_cross, r_cross)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa", "sinusoidal-postnorm-relu2"])
def test_transformer_block_equals_the_fast_block(variant):
    cfg = cfg_of(**LM_VARIANTS[variant])
    fast = Block(cfg)
    r = twin(fast, reft.TransformerBlock(cfg))
    x = torch.randn(2, 8, 32)
    pos, tables = _positions_tables(cfg, 8)
    want = fast(x, rope=tables if cfg.pos == "rope" else None, causal=True)
    got = r(x, pos)
    torch.testing.assert_close(got, want, **TOL)


def test_decoder_block_equals_the_fast_one():
    cfg = cfg_of(**S2S_VARIANTS["paper"], arch="seq2seq")
    fast = DecoderBlock(cfg)
    r = twin(fast, reft.DecoderBlock(cfg))
    y, memory = torch.randn(2, 6, 32), torch.randn(2, 5, 32)
    mem_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    want = fast(y, memory, mask=None, causal=True, src_mask=mem_mask[:, None, None, :], cache=None, layer=0)
    torch.testing.assert_close(r(y, memory, mem_mask), want, **TOL)


# ----------------------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("variant", list(LM_VARIANTS))
def test_transformer_lm_equals_the_fast_gpt(variant):
    cfg = cfg_of(**LM_VARIANTS[variant])
    torch.manual_seed(0)
    fast = build_model(cfg)
    r = twin(fast, reft.TransformerLM(cfg))
    if cfg.tie_embeddings:
        assert r.lm_head.weight is r.wte.weight
    ids, targets = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    targets[0, :5] = -100
    want_logits, want_loss = fast(ids, targets)
    got_logits, got_loss = r(ids, targets)
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    want_loss.backward()
    got_loss.backward()
    assert_same_grads(fast, r)


@pytest.mark.parametrize("variant", list(S2S_VARIANTS))
def test_encoder_decoder_equals_the_fast_seq2seq(variant):
    cfg = cfg_of(arch="seq2seq", **S2S_VARIANTS[variant])
    torch.manual_seed(0)
    fast = build_model(cfg)
    r = twin(fast, reft.EncoderDecoderTransformer(cfg))
    src, tgt_in, targets = (
        torch.randint(0, V, (3, 9)),
        torch.randint(0, V, (3, 7)),
        torch.randint(0, V, (3, 7)),
    )
    src_mask = torch.ones(3, 9, dtype=torch.bool)
    src_mask[1, 5:] = False
    targets[2, 4:] = -100
    want_logits, want_loss = fast(src, tgt_in, targets, src_mask=src_mask)
    got_logits, got_loss = r(src, tgt_in, targets, src_mask=src_mask)
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    want_loss.backward()
    got_loss.backward()
    assert_same_grads(fast, r)


def test_reference_models_train_in_eval_and_train_mode_alike_without_dropout():
    """train() only matters through dropout: with dropout 0 the outputs are the same in both modes."""
    cfg = cfg_of(**GPT2)
    model = reft.TransformerLM(cfg)
    ids = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(model.train()(ids)[0], model.eval()(ids)[0])
    drop = reft.TransformerLM(cfg_of(**GPT2, dropout=0.5)).train()
    assert not torch.allclose(drop(ids)[0], drop(ids)[0])  # dropout draws new masks each call
