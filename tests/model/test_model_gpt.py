"""The decoder-only GPT: causality, KV cache == full forward, padding, loss, overfitting, counts."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.config import PRESETS, ModelConfig, load_config
from scratchlm.errors import ConfigError
from scratchlm.model import build_model
from scratchlm.model.gpt import GPT, estimate_mfu

LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False, multiple_of=16)
VARIANTS = {
    "gpt2": {},
    "llama-gqa": dict(LLAMA, n_kv_head=2),
    "llama-mqa-interleaved": dict(LLAMA, n_kv_head=1, rope_style="interleaved"),
    "sinusoidal-relu2-qknorm": dict(pos="sinusoidal", mlp="relu2", qk_norm=True),
    "nope-post-ln": dict(pos="none", norm_position="post"),
}


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=100, d_model=32, n_head=4, n_layer=2, context_length=32), **kw})
    return build_model(cfg).eval()


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_future_tokens_never_change_earlier_logits(variant, attention):
    model = tiny(attention=attention, **VARIANTS[variant])
    idx = torch.randint(0, 100, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 100
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_equals_manual_for_the_whole_model(variant):
    sdpa, manual = tiny(**VARIANTS[variant]), tiny(attention="manual", **VARIANTS[variant])
    idx = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(sdpa(idx)[0], manual(idx)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_incremental_logits_equal_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 100, (2, 12))
    full = model(idx)[0]
    cache = model.make_cache(2, max_len=16)
    steps = [model(idx[:, :4], cache=cache)[0], model(idx[:, 4:7], cache=cache)[0]]  # prefill, chunk
    steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 12)]  # one token at a time
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    cache.reset()
    torch.testing.assert_close(model(idx, cache=cache)[0], full, atol=1e-5, rtol=1e-5)


def test_gqa_with_n_kv_head_equal_to_n_head_is_plain_mha():
    a, b = tiny(**dict(LLAMA, n_kv_head=4)), tiny(**LLAMA)
    idx = torch.randint(0, 100, (2, 10))
    assert a.num_params() == b.num_params()
    torch.testing.assert_close(a(idx)[0], b(idx)[0])


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_left_padded_batch_matches_unpadded_rows(variant, attention):
    """Row 1 is row 0's prompt shorter by 3, left-padded; with its positions and mask it gives its own logits."""
    model = tiny(attention=attention, **VARIANTS[variant])
    long, short = torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 5))
    idx = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model.make_cache(2, max_len=12)
    logits = model(idx, cache=cache, positions=positions, attention_mask=mask)[0]
    assert torch.isfinite(logits).all()  # padding queries see no key: must not be NaN
    torch.testing.assert_close(logits[0], model(long)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1, 3:], model(short)[0][0], atol=1e-5, rtol=1e-5)
    # decode two more tokens for both rows together
    nxt = torch.randint(0, 100, (2, 2))
    for t in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        positions = positions[:, -1:] + 1
        step = model(nxt[:, t : t + 1], cache=cache, positions=positions, attention_mask=mask)[0]
    torch.testing.assert_close(
        step[1, -1], model(torch.cat([short, nxt[1:]], 1))[0][0, -1], atol=1e-5, rtol=1e-5
    )


def test_cache_reorder_selects_rows():
    model = tiny(**VARIANTS["llama-gqa"])
    idx = torch.randint(0, 100, (3, 6))
    cache = model.make_cache(3, max_len=8)
    model(idx, cache=cache)
    cache.reorder(torch.tensor([2, 2, 0]))
    nxt = torch.randint(0, 100, (3, 1))
    out = model(nxt, cache=cache)[0][:, -1]
    expected = model(torch.cat([idx[[2, 2, 0]], nxt], dim=1))[0][:, -1]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_loss_at_init_is_about_log_vocab(variant):
    model = tiny(vocab_size=256, **VARIANTS[variant])
    idx, targets = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    targets[:, :4] = -100  # ignored
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 16, 256)
    assert abs(loss.item() - math.log(256)) < 0.1
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 256), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_tiny_model_overfits_one_batch(variant):
    model = tiny(**VARIANTS[variant]).train()
    idx = torch.randint(0, 100, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _step in range(200):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {_step} steps"


def test_gpt2_preset_has_gpt2_parameter_count():
    cfg = load_config(overrides=["preset=gpt2"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == 124_439_808  # GPT-2 small with tied embeddings
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768  # minus wpe
    with torch.device("meta"):
        medium = build_model(ModelConfig(**PRESETS["gpt2-medium"]["model"]))
    assert medium.num_params() == 354_823_168  # GPT-2 medium


def test_parameter_labels_with_tied_embeddings():
    """GPT-2 small: 124.4M parameters, 85.1M non-embedding (Kaplan et al. 2020's N, and what HF's
    ``num_parameters(exclude_embeddings=True)`` gives): the tied wte is an embedding, not "non-embedding"
    (the dry run said "123,653,376 non-embedding", counting the tied table as the head's matmul)."""
    from scratchlm.model import describe_params, param_counts

    with torch.device("meta"):
        model = build_model(load_config(overrides=["preset=gpt2"]).model)
    counts = param_counts(model)
    assert counts == {
        "total": 124_439_808,
        "embedding": 50257 * 768 + 1024 * 768,
        "non_embedding": 85_056_000,
        "tied": True,
    }
    assert describe_params(model) == (
        "124,439,808 (39,383,808 embedding, tied to the output head; 85,056,000 non-embedding)"
    )
    untied = tiny(tie_embeddings=False)
    c = param_counts(untied)
    assert not c["tied"] and c["embedding"] == 100 * 32 + 32 * 32
    assert c["non_embedding"] == c["total"] - c["embedding"] and "tied" not in describe_params(untied)


def test_flops_per_token_and_mfu():
    model = tiny()
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 32
    assert model.flops_per_token(seq_len=8) == 6 * n + 12 * 2 * 8 * 32
    assert estimate_mfu(1e9, 100.0, 1e12) == pytest.approx(0.1)
    untied = tiny(tie_embeddings=False)
    assert untied.num_params(non_embedding=True) == untied.num_params() - 100 * 32 - 32 * 32  # wte, wpe


def test_build_model_needs_a_vocabulary():
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(ModelConfig())


def test_learned_positions_refuse_sequences_beyond_context():
    model = tiny(context_length=8)
    with pytest.raises(ValueError, match="context_length"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds(preset):
    cfg = load_config(overrides=[f"preset={preset}"]).model
    if cfg.vocab_size == 0:
        cfg.vocab_size = load_config(overrides=[f"preset={preset}"]).tokenizer.vocab_size
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.flops_per_token() > 6 * model.num_params(non_embedding=True) > 0
