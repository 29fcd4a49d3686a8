"""`scratchlm explain` with values: the printed and recorded tensors are the model's own intermediates."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint
from scratchlm.viz.explain import format_trace, show_token, trace_forward

TEXTS = ["def add(a, b):\n    return a + b\n", "the quick brown fox", "ein hund läuft", "a dog runs"] * 3


def _run(tmp_path, **model_kw):
    tok = train_bpe_from_iterator(
        TEXTS, vocab_size=290, special_tokens=("<|endoftext|>", "<|bos|>", "<|pad|>"), progress=False
    )
    base = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=16, context_length=32)
    cfg = Config(model=ModelConfig(**{**base, **model_kw}))
    save_config(cfg, tmp_path / "config.yaml")
    tok.save(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    save_checkpoint(tmp_path, 1, model, {}, {"step": 1}, keep_last=1)
    return model.eval(), tok


@pytest.mark.parametrize(
    "kw",
    [dict(pos="learned"), dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=1, bias=False)],
    ids=["gpt2", "llama-mqa"],
)
def test_trace_holds_the_models_intermediates(kw, tmp_path):
    model, tok = _run(tmp_path, **kw)
    idx = torch.tensor([tok.encode("def add(a, b):")])
    T = idx.shape[1]
    # independent capture of q and k from the projections, to recompute the scores
    qk = {}
    hooks = [
        model.blocks[0].attn.c_q.register_forward_hook(lambda m, a, o: qk.__setitem__("q", o)),
        model.blocks[0].attn.c_k.register_forward_hook(lambda m, a, o: qk.__setitem__("k", o)),
    ]
    trace = trace_forward(model, idx)
    for h in hooks:
        h.remove()
    assert torch.equal(trace.embeddings["wte"], model.wte.weight[idx[0]])
    if kw["pos"] == "learned":
        assert torch.equal(trace.positions["wpe"], model.wpe.weight[:T])
    a0 = trace.attention[0]
    assert [a.name for a in trace.attention] == ["blocks.0.attn", "blocks.1.attn"]
    assert a0.scores.shape == a0.probs.shape == (2, T, T) and a0.mask.shape == (T, T)
    if kw["pos"] == "learned":  # no RoPE: the scores are the projections' q.k / sqrt(D)
        q, k = qk["q"][0].view(T, 2, 8).transpose(0, 1), qk["k"][0].view(T, 2, 8).transpose(0, 1)
        torch.testing.assert_close(a0.scores, q @ k.transpose(-1, -2) / math.sqrt(8))
    torch.testing.assert_close(a0.probs, torch.softmax(a0.scores.masked_fill(~a0.mask, -math.inf), -1))
    logits = model(idx)[0]
    torch.testing.assert_close(trace.next_probs, torch.softmax(logits[0, -1], -1))
    # the model is unchanged: no record left behind, same output
    assert all(getattr(m, "record", None) is None for m in model.modules())
    # MLP activations = the input of c_proj
    seen = {}
    h = model.blocks[1].mlp.c_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    model(idx)
    h.remove()
    torch.testing.assert_close(trace.mlp["blocks.1.mlp"], seen["x"][0])
    # the printed numbers are these tensors
    text = format_trace(trace, [tok.decode([i]) for i in idx[0].tolist()], cols=4)
    row = " ".join(f"{v:+.4f}" for v in trace.embeddings["wte"][0, :4].tolist())
    assert row in text
    assert " ".join(f"{v:+.4f}" for v in a0.scores[0, -1, :4].tolist()) in text


def test_explain_cli_prints_values_and_writes_readable_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _run(tmp_path, pos="learned")
    assert main(["explain", str(tmp_path), "--text", "def add(a, b):", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "scores Q.K^T/sqrt(D) before the mask" in out and "softmax after the mask" in out
    assert "blocks.1.mlp activations" in out and "next token after the input" in out
    assert f"  259  {show_token(' a')}\n" in out  # ids and tokens, with a visible space
    for name in ("positions", "attention", "attention_blocks_0_attn", "attention_blocks_1_attn"):
        png = tmp_path / "p" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    # untrained weights and no positional encoding: still works, and says why there is no positions plot
    (tmp_path / "u").mkdir()
    _run(tmp_path / "u", pos="none")
    assert main(["explain", str(tmp_path / "u"), "--untrained", "--no-plots", "--text", "the fox"]) == 0
    assert "softmax after the mask" in capsys.readouterr().out


def test_explain_seq2seq_shows_encoder_and_cross_attention(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _run(tmp_path, arch="seq2seq", pos="sinusoidal", mlp="relu", norm_position="pre", n_layer=1)
    argv = ["explain", str(tmp_path), "--text", "ein hund", "--target", "a dog", "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("encoder.0.attn", "decoder.0.attn", "decoder.0.cross_attn"):
        assert f"{name} head 0: scores" in out
        assert (tmp_path / "p" / f"attention_{name.replace('.', '_')}.png").is_file()
    assert (tmp_path / "p" / "positions.png").is_file()
