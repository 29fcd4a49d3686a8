"""``model.impl=reference`` runs only hand-written code: with every fast-path function and torch's fused ops
made to raise, GPT-2-style, Llama-style (GQA) and seq2seq models still train, and their losses equal the
fast path's; the real trainer runs the same way.

What raises (the decision is written down in docs/reference.md):
- every function of :mod:`scratchlm.model.functional` and the chunked loss of :mod:`scratchlm.model.loss`,
  under every module attribute that refers to it (``from ... import apply_rope`` included), except the two
  shape checks, which compute nothing the model uses and are shared on purpose;
- torch's fused ops: ``torch.nn.functional`` linear, embedding, layer_norm, rms_norm, softmax,
  log_softmax, gelu, silu, relu, dropout, scaled_dot_product_attention, cross_entropy, nll_loss, and their
  ``torch.*`` / ``Tensor.*`` spellings (``torch.softmax``, ``x.softmax()``, ``torch.logsumexp``, ...).
Primitives stay: matmul, elementwise math (exp, log, sqrt, erf, tanh, sigmoid, sin, cos), reductions,
indexing, where, reshapes.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import scratchlm.model.functional as fast
import scratchlm.model.loss as fast_loss
from scratchlm.config import ModelConfig
from scratchlm.model import build_model
from scratchlm.reference import functional as ref
from scratchlm.reference.optim import AdamW

SHARED_CHECKS = {"check_attention_shapes", "check_rope_tables"}  # validation only, used by both paths
FUSED_F = [
    "linear",
    "embedding",
    "layer_norm",
    "rms_norm",
    "softmax",
    "log_softmax",
    "gelu",
    "silu",
    "relu",
    "dropout",
    "scaled_dot_product_attention",
    "cross_entropy",
    "nll_loss",
]
FUSED_TORCH = [
    "softmax",
    "log_softmax",
    "layer_norm",
    "rms_norm",
    "embedding",
    "dropout",
    "relu",
    "logsumexp",
]
FUSED_TENSOR = ["softmax", "log_softmax", "relu", "logsumexp"]

V = 61
GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True)
LLAMA = dict(
    norm="rmsnorm",
    pos="rope",
    mlp="swiglu",
    bias=False,
    n_head=4,
    n_kv_head=2,
    tie_embeddings=False,
    multiple_of=16,
    label_smoothing=0.1,
)
SEQ2SEQ = dict(
    arch="seq2seq",
    n_encoder_layer=2,
    pos="sinusoidal",
    norm_position="post",
    mlp="relu",
    label_smoothing=0.1,
)


class FastPathCalled(AssertionError):
    pass


def _raiser(name: str):
    def raise_(*args, **kwargs):
        raise FastPathCalled(f"model.impl=reference called the fast {name}")

    return raise_


def _fast_functions() -> dict[int, str]:
    """id -> name of every fast-path function that must not run under impl=reference."""
    found = {
        id(obj): f"scratchlm.model.functional.{name}"
        for name, obj in vars(fast).items()
        if isinstance(obj, types.FunctionType)
        and obj.__module__ == fast.__name__
        and name not in SHARED_CHECKS
    }
    found[id(fast_loss.chunked_cross_entropy)] = "chunked_cross_entropy"
    return found


def make_fast_path_raise(monkeypatch) -> int:
    """Patch every module attribute that refers to a fast function, and torch's fused ops; returns the
    number of attributes patched."""
    targets = _fast_functions()
    n = 0
    for module in list(sys.modules.values()):
        if module is None or not getattr(module, "__name__", "").startswith("scratchlm"):
            continue
        for attr, obj in list(vars(module).items()):
            if id(obj) in targets:
                monkeypatch.setattr(module, attr, _raiser(targets[id(obj)]))
                n += 1
    monkeypatch.setattr(fast_loss.ChunkedLinearCrossEntropy, "apply", _raiser("chunked loss"))
    for name in FUSED_F:
        monkeypatch.setattr(F, name, _raiser(f"F.{name}"))
    for name in FUSED_TORCH:
        monkeypatch.setattr(torch, name, _raiser(f"torch.{name}"))
    for name in FUSED_TENSOR:
        monkeypatch.setattr(torch.Tensor, name, _raiser(f"Tensor.{name}"))
    return n


def _model(impl: str, arch: dict, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    base = dict(vocab_size=V, n_layer=2, n_head=2, d_model=32, context_length=16, dropout=dropout)
    return build_model(ModelConfig(**{**base, **arch, "impl": impl}))


def _batches(arch: dict, steps: int) -> list[tuple]:
    """A learnable task, fixed per seed: predict a repeating pattern (GPT); seq2seq: memorise one batch
    of reversed sources (8 steps are too few to learn reversal itself)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        if arch.get("arch") == "seq2seq":
            g.manual_seed(1)
            src = torch.randint(3, V, (4, 9), generator=g)
            src_mask = torch.ones(4, 9, dtype=torch.bool)
            src_mask[1, 6:] = False  # padding in the source: the key mask is used
            tgt = torch.cat([torch.ones(4, 1, dtype=torch.long), src.flip(1)[:, :6]], dim=1)
            targets = tgt[:, 1:].clone()
            targets[2, 4:] = -100  # ignored targets
            out.append((src, tgt[:, :-1], targets, src_mask))
        else:
            start = torch.randint(0, 5, (4, 1), generator=g)
            seq = (start + torch.arange(17)) % 7 + 3
            out.append((seq[:, :-1], seq[:, 1:]))
    return out


def _train(model: torch.nn.Module, arch: dict, steps: int) -> list[float]:
    """A few steps of AdamW (the hand-written one) on fixed batches; the losses."""
    model.train()
    opt = AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    losses = []
    for batch in _batches(arch, steps):
        if arch.get("arch") == "seq2seq":
            src, tgt_in, targets, src_mask = batch
            _, loss = model(src, tgt_in, targets, src_mask=src_mask)
        else:
            _, loss = model(*batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_patch_reaches_every_import(monkeypatch):
    """The check itself: the fast functions imported by name elsewhere (layers.apply_rope, ...) are patched."""
    import scratchlm.model.layers as layers

    assert make_fast_path_raise(monkeypatch) > len(_fast_functions())
    with pytest.raises(FastPathCalled):
        layers.apply_rope(torch.zeros(1, 1, 2, 4), torch.ones(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), "half")
    with pytest.raises(FastPathCalled):
        F.scaled_dot_product_attention(
            torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)
        )
    with pytest.raises(FastPathCalled):  # and the fast model does call them
        _model("fast", LLAMA)(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("arch", [GPT2, LLAMA, SEQ2SEQ], ids=["gpt2", "llama-gqa", "seq2seq"])
def test_reference_trains_with_every_fast_op_raising(monkeypatch, arch):
    steps = 8
    fast_losses = _train(_model("fast", arch), arch, steps)
    make_fast_path_raise(monkeypatch)
    ref_losses = _train(_model("reference", arch), arch, steps)
    assert ref_losses[-1] < ref_losses[0] - 0.5  # it learns
    # the same model and data: the same losses up to fp32 rounding (measured: < 1e-6 relative)
    assert ref_losses == pytest.approx(fast_losses, rel=1e-5)


@pytest.mark.parametrize("arch", [GPT2, SEQ2SEQ], ids=["gpt2", "seq2seq"])
def test_reference_dropout_is_the_hand_written_one(monkeypatch, arch):
    make_fast_path_raise(monkeypatch)
    torch.manual_seed(0)
    losses = _train(_model("reference", arch, dropout=0.1), arch, 8)
    assert losses[-1] < losses[0] - 0.5


def test_reference_decoding_paths_use_no_fast_op(monkeypatch):
    """The masks of cached and left-padded decoding (causal_mask) come from the reference too."""
    gpt, s2s = _model("reference", LLAMA).eval(), _model("reference", SEQ2SEQ).eval()
    ids = torch.randint(0, V, (2, 6))
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[0, :2] = False  # left padding
    positions = (key_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want_gpt, _ = gpt(ids, positions=positions, attention_mask=key_mask)
        src, src_mask = torch.randint(3, V, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
        want_s2s = s2s.decode(ids[:, :4], s2s.encode(src, src_mask), src_mask)
    make_fast_path_raise(monkeypatch)
    with torch.no_grad():
        got, _ = gpt(ids, positions=positions, attention_mask=key_mask)
        cache = gpt.make_cache(2)  # prefill 4 tokens, then 2 more at once: the explicit (T, S) mask
        gpt(ids[:, :4], positions=positions[:, :4], attention_mask=key_mask[:, :4], cache=cache)
        got_cached, _ = gpt(ids[:, 4:], positions=positions[:, 4:], attention_mask=key_mask, cache=cache)
        memory = s2s.encode(src, src_mask)
        s_cache = s2s.make_cache(2)
        s2s.decode(ids[:, :1], memory, src_mask, cache=s_cache)
        got_s2s = s2s.decode(ids[:, 1:4], memory, src_mask, cache=s_cache)  # T = 3 after 1 cached
    torch.testing.assert_close(got, want_gpt)
    torch.testing.assert_close(got_cached, want_gpt[:, 4:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_s2s, want_s2s[:, 1:], rtol=1e-5, atol=1e-5)


def test_reference_causal_mask_equals_the_fast_one():
    for T, S in [(1, 1), (4, 4), (3, 7), (1, 5)]:
        assert torch.equal(ref.causal_mask(T, S), fast.causal_mask(T, S))


def test_the_chunked_loss_is_refused_with_impl_reference():
    """The fused chunked loss has no reference twin: asking for both is a config error, not a silent mix."""
    from scratchlm.config import load_config
    from scratchlm.errors import ConfigError

    with pytest.raises(ConfigError, match="train.loss_chunk_rows=0"):
        load_config(None, ["model.impl=reference", "train.loss_chunk_rows=64"])
    assert load_config(None, ["model.impl=reference"]).train.loss_chunk_rows == 0


def test_the_real_trainer_runs_with_every_fast_op_raising(tmp_path, monkeypatch):
    """The trainer's whole loop (loader, reference AdamW, clipping, dropout, evaluation, checkpoints) with
    impl=reference. Text samples at eval time are off: the sampler (inference, not the model) draws from
    torch.softmax of the last logits."""
    from pathlib import Path

    import scratchlm.train.trainer as trainer
    from scratchlm.train.metrics import read_metrics

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from train_helpers import ByteTokenizer, make_data, tiny_config

    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)
    data_dir = make_data(tmp_path, chars=20_000)
    make_fast_path_raise(monkeypatch)
    run_dir = tmp_path / "run"
    cfg = tiny_config(
        run_dir,
        data_dir,
        "model.impl=reference",
        "train.optimizer=adamw_reference",
        *(f"model.{k}={str(v).lower()}" for k, v in LLAMA.items()),
        "model.dropout=0.1",
        "train.max_steps=6",
        "eval.interval=6",
        "eval.num_samples=0",
        "train.grad_clip=0.5",
    )
    trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
    records = read_metrics(run_dir)
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train) >= 3 and train[-1] < train[0]
    assert any(r["kind"] == "eval" for r in records)
