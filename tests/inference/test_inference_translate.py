"""Batched translation (inference/translate.py) and beam-search invariants on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_inference_beam import tiny_seq2seq

from scratchlm.errors import GenerationError
from scratchlm.inference.beam import beam_search, sequence_score
from scratchlm.inference.translate import translate_batched, translate_texts
from scratchlm.tokenizer import train_bpe_from_iterator

SPECIALS = ("<|endoftext|>", "<|bos|>", "<|pad|>")
TEXTS = ["ein hund läuft", "a dog", "der mann fährt rad schnell", "rad", "ein mann und ein hund"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_iterator(TEXTS * 3, vocab_size=280, special_tokens=SPECIALS, progress=False)


@pytest.mark.parametrize("beams", [1, 3])
def test_batched_translation_equals_one_at_a_time_in_input_order(tok, beams):
    # batches sort sources by length and pad them: the padding must not change any output
    model = tiny_seq2seq(4, vocab_size=tok.vocab_size)
    kw = dict(beam_size=beams, max_len_a=0.0, max_len_b=8)  # one output bound for every batch
    batched = translate_batched(model, tok, TEXTS, batch_size=3, **kw)
    alone = [translate_batched(model, tok, [t], **kw)[0] for t in TEXTS]
    for b, a, text in zip(batched, alone, TEXTS):
        assert b.tokens == a.tokens, text
        assert b.score == pytest.approx(a.score, abs=1e-4)
    out = translate_texts(model, tok, TEXTS, beam_size=beams, batch_size=2)
    assert len(out) == len(TEXTS) and all(isinstance(s, str) for s in out)


def test_output_length_is_bounded_relative_to_the_source(tok):
    model = tiny_seq2seq(5, vocab_size=tok.vocab_size)
    for a, b in [(0.0, 3), (0.5, 2), (1.0, 1)]:
        hyps = translate_batched(model, tok, TEXTS, beam_size=2, batch_size=1, max_len_a=a, max_len_b=b)
        for text, h in zip(TEXTS, hyps):
            S = len(tok.encode(text)) + 1
            assert 1 <= len(h.tokens) <= int(a * S + b)
    with pytest.raises(GenerationError, match="must be positive"):
        translate_batched(model, tok, TEXTS, max_len_a=0, max_len_b=0)
    with pytest.raises(GenerationError, match="source 2 has"):
        translate_batched(model, tok, ["rad", "x" * 60])


def test_over_long_source_is_truncated_to_the_context_when_asked(tok):
    """truncate=True: the source becomes its first context_length - 1 tokens + EOS (fairseq's
    --truncate-source), one warning names it, and the others are translated as before."""
    model = tiny_seq2seq(5, vocab_size=tok.vocab_size)
    ctx, eos = model.config.context_length, tok.eot_id
    long_text = " ".join(["ein hund läuft"] * 20)
    ids = tok.encode(long_text)
    assert len(ids) + 1 > ctx
    kw = dict(beam_size=2, max_len_a=0.0, max_len_b=6)
    with pytest.warns(
        UserWarning, match=rf"1 of 2 sources .* context_length {ctx} .* source 2 \({len(ids) + 1} "
    ):
        hyps = translate_batched(
            model, tok, ["rad", long_text], truncate=True, strict_option="--strict", **kw
        )
    src = torch.tensor([ids[: ctx - 1] + [eos]])  # what the model must have been given
    bos = tok.special_tokens["<|bos|>"]
    (expected,) = beam_search(model, src, torch.ones_like(src, dtype=torch.bool), bos, eos, 6, 2, 1.0)
    assert hyps[1].tokens == expected.tokens
    assert hyps[0].tokens == translate_batched(model, tok, ["rad"], **kw)[0].tokens


def test_beam_hypothesis_log_probability_is_non_increasing_and_scored_by_the_formula(tok):
    model = tiny_seq2seq(6, vocab_size=tok.vocab_size)
    specials = tok.special_tokens
    bos, eos = specials["<|bos|>"], tok.eot_id
    src = torch.tensor([tok.encode(TEXTS[2]) + [eos]])
    for alpha in (0.0, 0.6, 1.0):
        (h,) = beam_search(model, src, None, bos, eos, max_len=10, beam_size=4, length_penalty=alpha)
        with torch.no_grad():
            logits, _ = model(src, torch.tensor([[bos] + h.tokens[:-1]]))
        steps = F.log_softmax(logits[0].float(), -1).gather(1, torch.tensor(h.tokens)[:, None])[:, 0]
        prefix = steps.cumsum(0)
        assert (prefix[1:] <= prefix[:-1] + 1e-6).all()  # each token multiplies by a probability <= 1
        assert h.logprob == pytest.approx(prefix[-1].item(), abs=1e-4)
        assert h.score == pytest.approx(h.logprob / len(h.tokens) ** alpha, abs=1e-5)
    assert sequence_score(-6.0, 4, 0.0) == -6.0
    assert sequence_score(-6.0, 4, 1.0) == -1.5
    assert sequence_score(-6.0, 4, 0.5) == pytest.approx(-3.0)
    assert sequence_score(-6.0, 0, 1.0) == -6.0  # length counted as at least 1
