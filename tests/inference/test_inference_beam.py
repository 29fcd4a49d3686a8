"""Seq2seq greedy and beam search on tiny random encoder-decoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.errors import GenerationError
from scratchlm.inference.beam import beam_search, greedy_search, sequence_score, translate
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator

V, BOS, EOS, PAD = 40, 1, 2, 0


def tiny_seq2seq(seed: int, vocab_size: int = V):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch="seq2seq",
        vocab_size=vocab_size,
        n_layer=2,
        n_head=2,
        d_model=32,
        context_length=24,
        pos="sinusoidal",
        norm_position="pre",
        mlp="relu",
    )
    return build_model(cfg).eval()


def batch(seed: int, B: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 6][:B]
    src = torch.full((B, 7), PAD)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(3, V, (n,), generator=g)
    return src, src != PAD


def teacher_forced_logprob(model, src, src_mask, tokens: list[int]) -> float:
    """Reference log p(tokens | src) by one full forward without cache."""
    tgt_in = torch.tensor([[BOS] + tokens[:-1]])
    with torch.no_grad():
        logits, _ = model(src[None], tgt_in, src_mask=src_mask[None])
    return F.log_softmax(logits[0].float(), -1).gather(1, torch.tensor(tokens)[:, None]).sum().item()


def test_greedy_matches_model_greedy_decode_and_scores():
    model = tiny_seq2seq(0)
    src, mask = batch(0)
    hyps = greedy_search(model, src, mask, BOS, EOS, max_len=12, length_penalty=0.0)
    ref = model.greedy_decode(src, mask, BOS, EOS, 12)
    for b, h in enumerate(hyps):
        row = ref[b].tolist()
        want = row[: row.index(EOS) + 1] if EOS in row else row
        assert h.tokens == want
        assert h.logprob == pytest.approx(teacher_forced_logprob(model, src[b], mask[b], h.tokens), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_one_equals_greedy(length_penalty):
    model = tiny_seq2seq(1)
    src, mask = batch(1)
    greedy = greedy_search(model, src, mask, BOS, EOS, 12, length_penalty)
    beam = beam_search(model, src, mask, BOS, EOS, 12, beam_size=1, length_penalty=length_penalty)
    assert [h.tokens for h in beam] == [h.tokens for h in greedy]
    assert [h.score for h in beam] == pytest.approx([h.score for h in greedy], abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_beam_scores_at_least_greedy(length_penalty):
    better = 0
    for seed in range(4):
        model = tiny_seq2seq(10 + seed)
        src, mask = batch(seed)
        greedy = greedy_search(model, src, mask, BOS, EOS, 12, length_penalty)
        beam = beam_search(model, src, mask, BOS, EOS, 12, beam_size=4, length_penalty=length_penalty)
        for b, (g, h) in enumerate(zip(greedy, beam)):
            assert h.score >= g.score - 1e-5
            lp = teacher_forced_logprob(model, src[b], mask[b], h.tokens)  # the reported score is the model's
            assert h.logprob == pytest.approx(lp, abs=1e-4)
            assert h.score == pytest.approx(sequence_score(lp, len(h.tokens), length_penalty), abs=1e-4)
            better += h.score > g.score + 1e-5
    assert better > 0  # beam search found something greedy missed at least once


def test_translate_end_to_end():
    tok = train_bpe_from_iterator(
        ["ein hund läuft", "a dog runs"] * 3,
        vocab_size=270,
        special_tokens=("<|endoftext|>", "<|bos|>", "<|pad|>"),
        progress=False,
    )
    model = tiny_seq2seq(3, vocab_size=tok.vocab_size)
    out1 = translate(model, tok, ["ein hund", "läuft"], beam_size=1, max_len=10)
    out3 = translate(model, tok, ["ein hund", "läuft"], beam_size=3, max_len=10)
    assert len(out1) == len(out3) == 2 and all(isinstance(t, str) for t in out1 + out3)
    with pytest.raises(GenerationError, match="context_length 24"):
        translate(model, tok, ["x" * 40])
    with pytest.raises(GenerationError, match="beam_size"):
        translate(model, tok, ["ein"], beam_size=0)
