"""The encoder-decoder Transformer: parity with torch.nn.Transformer, masks, cache, loss, greedy decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.model import build_model
from scratchlm.model.seq2seq import Seq2Seq

V, C = 100, 32


def tiny(**kw) -> Seq2Seq:
    torch.manual_seed(0)
    base = dict(
        arch="seq2seq",
        vocab_size=V,
        d_model=C,
        n_head=4,
        n_layer=2,
        n_encoder_layer=3,
        d_ff=64,
        context_length=32,
        pos="sinusoidal",
        norm_position="post",
        mlp="relu",
    )
    return build_model(ModelConfig(**{**base, **kw})).eval()


def batch():
    torch.manual_seed(1)
    src, tgt = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 7))
    src_mask = torch.ones(2, 9, dtype=torch.bool)
    src_mask[1, 6:] = False  # row 1 has 3 padding tokens
    return src, src_mask, tgt


def _copy_attention(ref: torch.nn.MultiheadAttention, ours) -> None:
    ref.in_proj_weight.copy_(torch.cat([ours.c_q.weight, ours.c_k.weight, ours.c_v.weight]))
    ref.in_proj_bias.copy_(torch.cat([ours.c_q.bias, ours.c_k.bias, ours.c_v.bias]))
    ref.out_proj.weight.copy_(ours.c_proj.weight)
    ref.out_proj.bias.copy_(ours.c_proj.bias)


def _copy_norm(ref: torch.nn.LayerNorm, ours) -> None:
    ref.weight.copy_(ours.weight)
    ref.bias.copy_(ours.bias)


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial norm weights and biases, so that a mix-up in copying would show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch nested-tensor notices
@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_matches_torch_nn_transformer(norm_position):
    model = tiny(norm_position=norm_position)
    _randomise(model)
    ref = torch.nn.Transformer(
        d_model=C,
        nhead=4,
        num_encoder_layers=3,
        num_decoder_layers=2,
        dim_feedforward=64,
        dropout=0.0,
        activation="relu",
        batch_first=True,
        norm_first=norm_position == "pre",
    ).eval()
    if norm_position == "post":  # the paper has no final LayerNorm after post-LN stacks; torch adds one
        ref.encoder.norm, ref.decoder.norm = None, None
    with torch.no_grad():
        for ours, theirs in zip(model.encoder, ref.encoder.layers):
            _copy_attention(theirs.self_attn, ours.attn)
            theirs.linear1.load_state_dict(ours.mlp.c_fc.state_dict())
            theirs.linear2.load_state_dict(ours.mlp.c_proj.state_dict())
            _copy_norm(theirs.norm1, ours.ln_1), _copy_norm(theirs.norm2, ours.ln_2)
        for ours, theirs in zip(model.decoder, ref.decoder.layers):
            _copy_attention(theirs.self_attn, ours.attn)
            _copy_attention(theirs.multihead_attn, ours.cross_attn)
            theirs.linear1.load_state_dict(ours.mlp.c_fc.state_dict())
            theirs.linear2.load_state_dict(ours.mlp.c_proj.state_dict())
            _copy_norm(theirs.norm1, ours.ln_1), _copy_norm(theirs.norm2, ours.ln_2)
            _copy_norm(theirs.norm3, ours.ln_3)
        if norm_position == "pre":
            _copy_norm(ref.encoder.norm, model.enc_ln_f), _copy_norm(ref.decoder.norm, model.dec_ln_f)

    src, src_mask, tgt = batch()

    def embed(ids):  # the paper's input: E[ids] * sqrt(d_model) + PE, PE computed here from the formula
        pos = torch.arange(ids.shape[1], dtype=torch.float64)[:, None]
        angle = pos / 10000 ** (torch.arange(0, C, 2, dtype=torch.float64) / C)
        pe = (
            torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1).float()
        )  # (T, C): sin, cos interleaved
        return model.src_emb.weight[ids] * math.sqrt(C) + pe

    with torch.no_grad():
        hidden = ref(
            embed(src),
            embed(tgt),
            tgt_mask=ref.generate_square_subsequent_mask(7),
            tgt_is_causal=True,
            src_key_padding_mask=~src_mask,
            memory_key_padding_mask=~src_mask,
        )
        expected = hidden @ model.src_emb.weight.T  # shared embeddings, tied output head
        logits, _ = model(src, tgt, src_mask=src_mask)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_source_padding_and_target_causality():
    model = tiny()
    src, src_mask, tgt = batch()
    logits = model(src, tgt, src_mask=src_mask)[0]
    other_pad = src.clone()
    other_pad[1, 6:] = (other_pad[1, 6:] + 7) % V  # padding content must not matter
    torch.testing.assert_close(model(other_pad, tgt, src_mask=src_mask)[0], logits)
    later = tgt.clone()
    later[:, 4:] = (later[:, 4:] + 1) % V  # future target tokens must not change earlier logits
    changed = model(src, later, src_mask=src_mask)[0]
    torch.testing.assert_close(changed[:, :4], logits[:, :4])
    assert not torch.allclose(changed[:, 4:], logits[:, 4:])


@pytest.mark.parametrize("kw", [{}, dict(norm_position="pre", n_kv_head=2, qk_norm=True)])
def test_sdpa_and_manual_attention_agree(kw):
    # self-attention (padding + causal masks) and cross-attention over a padded source, both backends
    sdpa, manual = tiny(attention="sdpa", **kw), tiny(attention="manual", **kw)
    manual.load_state_dict(sdpa.state_dict())
    src, src_mask, tgt = batch()
    torch.testing.assert_close(
        manual(src, tgt, src_mask=src_mask)[0], sdpa(src, tgt, src_mask=src_mask)[0], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "kw", [{}, dict(norm_position="pre", share_embeddings=False, n_kv_head=2, pos="learned", qk_norm=True)]
)
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_incremental_decode_equals_full_decode(kw, attention):
    model = tiny(attention=attention, **kw)
    src, src_mask, tgt = batch()
    full = model(src, tgt, src_mask=src_mask)[0]
    memory = model.encode(src, src_mask)
    cache = model.make_cache(2, max_len=8)
    steps = [
        model.decode(tgt[:, :2], memory, src_mask, cache=cache),
        model.decode(tgt[:, 2:4], memory, src_mask, cache=cache),
    ]
    steps += [model.decode(tgt[:, t : t + 1], memory, src_mask, cache=cache) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # beams: reorder rows, continue, compare with the full decode of the reordered batch
    order = torch.tensor([1, 1, 0])
    cache.reorder(order)
    nxt = torch.randint(0, V, (3, 1))
    step = model.decode(nxt, memory[order], src_mask[order], cache=cache)
    expected = model(src[order], torch.cat([tgt[order], nxt], 1), src_mask=src_mask[order])[0][:, -1:]
    torch.testing.assert_close(step, expected, atol=1e-5, rtol=1e-5)


def test_label_smoothed_loss_and_init_loss():
    model = tiny(label_smoothing=0.1)
    src, src_mask, tgt = batch()
    targets = torch.randint(0, V, tgt.shape)
    targets[1, 5:] = -100
    logits, loss = model(src, tgt, targets, src_mask=src_mask)
    expected = F.cross_entropy(
        logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100, label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)
    assert abs(model(src, tgt, targets, src_mask=src_mask)[1].item() - math.log(V)) < 0.3


def test_greedy_decode_matches_stepwise_argmax_and_learns_to_copy():
    model = tiny(n_encoder_layer=2).train()
    torch.manual_seed(0)
    bos, eos = 1, 2
    src = torch.randint(3, V, (4, 6))
    tgt_in, targets = (
        torch.cat([torch.full((4, 1), bos), src], 1),
        torch.cat([src, torch.full((4, 1), eos)], 1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):  # until teacher-forced argmax is right everywhere: then greedy must reproduce it
        logits, loss = model(src, tgt_in, targets)
        if torch.equal(logits.argmax(-1), targets):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = model.greedy_decode(src, None, bos, eos, max_len=10)
    assert torch.equal(out, targets)  # a memorised copy task, stopped at EOS
    # and greedy == argmax of the full (uncached) decode fed its own outputs
    prefix = torch.full((4, 1), bos)
    for _ in range(out.shape[1]):
        prefix = torch.cat([prefix, model(src, prefix)[0][:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(prefix[:, 1:], out)


def test_param_counts_share_tables_once():
    shared, separate = tiny(), tiny(share_embeddings=False)
    assert separate.num_params() - shared.num_params() == V * C
    assert shared.num_params(non_embedding=True) == shared.num_params()  # the one table is the tied head
    assert separate.flops_per_token() > 6 * separate.num_params(non_embedding=True)


def test_transformer_base_has_the_parameters_of_torch_nn_transformer():
    """preset transformer-base minus its shared embedding == nn.Transformer base (post-LN, no final norms)."""
    from scratchlm.config import load_config

    cfg = load_config(overrides=["preset=transformer-base", "model.vocab_size=37000"]).model
    with torch.device("meta"):
        model = build_model(cfg)
        ref = torch.nn.Transformer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    final_norms = 2 * 2 * 512  # nn.Transformer's encoder.norm and decoder.norm
    assert model.num_params() - 37000 * 512 == sum(p.numel() for p in ref.parameters()) - final_norms
    assert 60e6 < model.num_params() < 66e6  # "65M" in Table 3 of the paper (base model)
