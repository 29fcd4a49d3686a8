"""Batching parallel pairs by tokens: the budget, length sorting, shapes rounded to few sizes, resume."""

from __future__ import annotations

import json

import pytest
import torch
from data_bytetok import ByteTokenizer
from test_data_pairs import SEQ2SEQ_SPECIALS, toy_pairs

from scratchlm.data.pairs import PairLoader
from scratchlm.errors import DataError


def tok():
    return ByteTokenizer(specials=SEQ2SEQ_SPECIALS)


def epoch(loader):
    return [loader.next_batch() for _ in range(loader.batches_per_epoch)]


def test_token_batches_respect_the_budget_and_cover_each_pair_once():
    pairs = toy_pairs(400)
    loader = PairLoader(pairs, tok(), 8, seed=3, batch_tokens=600, max_len=60, pad_to=8)
    seen, shapes, real, padded = [], set(), 0, 0
    for b in epoch(loader):
        B, S = b["src"].shape
        T = b["tgt_in"].shape[1]
        assert B * (S + T) <= 600  # the padded source + target tokens of a batch
        assert S % 8 == 0 or S == 61  # rounded up to a multiple of 8, at most max_len + 1
        shapes.add((S, T))
        real += int(b["src_mask"].sum()) + int((b["targets"] != -100).sum())
        padded += B * (S + T)
        seen += [bytes(r[m][:-1].tolist()).decode() for r, m in zip(b["src"], b["src_mask"])]
    assert sorted(seen) == sorted(s for s, _ in pairs) and loader.epoch == 1
    assert real / padded > 0.7  # length-sorted: little padding despite the rounding
    assert len(shapes) <= 16  # few distinct shapes (what a compiled model needs)
    rows = {b["src"].shape[0] for b in epoch(loader)}
    assert max(rows) > 2 * min(rows)  # short pairs travel in bigger batches
    exact = PairLoader(pairs, tok(), 8, seed=3, batch_tokens=600, max_len=60)  # pad_to=1: tightest
    assert sum(b["src"].numel() + b["tgt_in"].numel() for b in epoch(exact)) < padded


def test_token_batches_resume_exactly_and_are_shuffled_per_epoch():
    pairs = toy_pairs(300)
    ref = PairLoader(pairs, tok(), 8, seed=5, batch_tokens=500)
    expected = [ref.next_batch() for _ in range(3 * ref.batches_per_epoch // 2)]
    first = PairLoader(pairs, tok(), 8, seed=5, batch_tokens=500)
    for _ in range(len(expected) // 2):
        first.next_batch()
    resumed = PairLoader(pairs, tok(), 8, seed=5, batch_tokens=500)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for want in expected[len(expected) // 2 :]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    other = PairLoader(pairs, tok(), 8, seed=5)
    with pytest.raises(DataError, match="batch_tokens"):
        other.load_state_dict(first.state_dict())
    n = ref.batches_per_epoch
    assert [b["src"].shape for b in expected[: n // 2]] != [b["src"].shape for b in expected[n : n + n // 2]]


def test_token_budget_smaller_than_one_pair_is_refused():
    with pytest.raises(DataError, match="data.batch_tokens=50"):
        PairLoader(toy_pairs(10), tok(), 8, batch_tokens=50, max_len=40)
