"""evaluate_lm: loss equals the model's own loss, perplexity = exp(loss), bits per byte against a brute-force
sum over tokens and their byte lengths (special tokens excluded)."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.eval.perplexity import evaluate_lm, token_byte_lengths
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator

TEXTS = [
    "hello world, hello there",
    "the quick brown fox jumps über the lazy dog",
    "def main():\n    return 0\n",
] * 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (on a busy 2-core machine, 2 threads make each forward far slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_iterator(
        TEXTS, vocab_size=300, special_tokens=("<|endoftext|>", "<|pad|>"), progress=False
    )


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, context_length=32)
    )
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return m


def make_batches(tok, n_batches: int = 3, B: int = 2, T: int = 16, seed: int = 0):
    """(x, y) pairs from real text with end-of-text tokens between documents and a few -100 targets."""
    ids = []
    for text in TEXTS:
        ids += tok.encode(text) + [tok.eot_id]
    g = torch.Generator().manual_seed(seed)
    stream = torch.tensor(ids)
    batches = []
    for _ in range(n_batches):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=g)
        x = torch.stack([stream[s : s + T] for s in starts])
        y = torch.stack([stream[s + 1 : s + T + 1] for s in starts])
        y[0, :3] = -100  # ignored targets
        batches.append((x, y))
    # make sure special tokens are among the targets
    batches[0][1][1, -1] = tok.eot_id
    return batches


def test_loss_equals_model_loss_and_perplexity_is_exp(model, tok):
    batches = make_batches(tok)
    result = evaluate_lm(model, batches)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        _, loss = model(x, y)  # one batch: the token-weighted mean over all the batches
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)
    assert result["tokens"] == int((y != -100).sum())
    assert "bits_per_byte" not in result  # only with token_bytes


def test_bits_per_byte_brute_force(model, tok):
    batches = make_batches(tok, seed=1)
    token_bytes = token_byte_lengths(tok)
    result = evaluate_lm(model, batches, token_bytes)
    specials = set(tok.special_tokens.values())
    vocab = tok.vocab()  # id -> bytes of the non-special tokens
    nll_sum, n_bytes, n_special = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            logits, _ = model(x)
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            for b in range(y.shape[0]):
                for t in range(y.shape[1]):
                    target = int(y[b, t])
                    if target == -100:
                        continue
                    if target in specials:  # no bytes: left out of both sums
                        n_special += 1
                        continue
                    nll_sum -= float(logprobs[b, t, target])
                    n_bytes += len(vocab[target])
    assert n_special > 0
    assert result["bits_per_byte"] == pytest.approx(nll_sum / (math.log(2) * n_bytes), rel=1e-5)


def test_token_byte_lengths(tok):
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.vocab_size,)
    assert lengths[:256].tolist() == [1] * 256  # the byte tokens of a byte-level BPE
    for name, i in tok.special_tokens.items():
        assert lengths[i] == 0, name
    text = "the quick brown fox"
    assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))


def test_eval_mode_during_the_pass_and_restored(model, tok):
    torch.manual_seed(0)
    m = build_model(
        ModelConfig(
            vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=32, dropout=0.5
        )
    )
    m.train()
    batches = make_batches(tok, n_batches=1)
    a = evaluate_lm(m, batches)
    b = evaluate_lm(m, batches)
    assert a["loss"] == b["loss"]  # dropout off: deterministic
    assert m.training
