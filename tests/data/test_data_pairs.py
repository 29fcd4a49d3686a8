"""Parallel corpora: loading, the batch layout, length filtering and bucketing, resume, DDP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_bytetok import ByteTokenizer

from scratchlm.config import DataConfig
from scratchlm.data.pairs import PairLoader, build_pair_loaders, load_pairs
from scratchlm.errors import DataError

SEQ2SEQ_SPECIALS = ("<|endoftext|>", "<|bos|>", "<|pad|>")
EOS, BOS, PAD = 256, 257, 258


def tok():
    return ByteTokenizer(specials=SEQ2SEQ_SPECIALS)


def toy_pairs(n=200):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=n)  # target length follows source length, as in translation
    return [
        ("q" * int(k) + str(i), "r" * int(k + rng.integers(0, 4)) + str(i)) for i, k in enumerate(lengths)
    ]


def test_load_multi30k_is_line_aligned(shared_data):
    prefix = shared_data / "multi30k" / "train"
    pairs = load_pairs(prefix, "de", "en")
    de = (shared_data / "multi30k" / "train.de").read_text(encoding="utf-8").splitlines()
    en = (shared_data / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()
    assert len(pairs) == len(de) == 29000
    assert pairs[123] == (de[123].strip(), en[123].strip())


def test_separate_source_and_target_tokenizers(shared_data):
    """German through a BPE trained on German, English through a char-level tokenizer of English."""
    from scratchlm.tokenizer import CharTokenizer, train_bpe_from_iterator

    pairs = load_pairs(shared_data / "multi30k" / "train", "de", "en")[:300]
    src_tok = train_bpe_from_iterator(
        [s for s, _ in pairs], 400, special_tokens=list(SEQ2SEQ_SPECIALS), num_workers=1, progress=False
    )
    tgt_tok = CharTokenizer.train([t for _, t in pairs], special_tokens=list(SEQ2SEQ_SPECIALS))
    assert src_tok.vocab_size != tgt_tok.vocab_size
    loader = PairLoader(pairs, src_tok, 8, tgt_tokenizer=tgt_tok, shuffle=False)
    batch = loader.next_batch()
    t_eos, t_bos, t_pad = (tgt_tok.special_tokens[s] for s in SEQ2SEQ_SPECIALS)
    s_eos = src_tok.special_tokens["<|endoftext|>"]
    by_source = {}
    for src, m in zip(batch["src"], batch["src_mask"]):
        ids = src[m].tolist()
        assert ids[-1] == s_eos
        by_source[src_tok.decode(ids[:-1])] = len(by_source)
    for row, (tgt_in, targets) in enumerate(zip(batch["tgt_in"], batch["targets"])):
        real = targets != -100
        assert tgt_in[0] == t_bos and targets[real][-1] == t_eos
        assert (tgt_in[~real] == t_pad).all() if (~real).any() else True
        text = tgt_tok.decode(targets[real][:-1].tolist())
        src_text = src_tok.decode(batch["src"][row][batch["src_mask"][row]][:-1].tolist())
        assert (src_text, text) in pairs  # each row pairs a source with its own target


def test_tsv_and_bad_files(tmp_path):
    (tmp_path / "p.tsv").write_text("Hallo Welt\tHello world\n\nJa\tYes\n")
    assert load_pairs(tmp_path / "p.tsv") == [("Hallo Welt", "Hello world"), ("Ja", "Yes")]
    (tmp_path / "bad.tsv").write_text("one column only\n")
    with pytest.raises(DataError, match="bad.tsv:1: expected 'source<TAB>target'"):
        load_pairs(tmp_path / "bad.tsv")
    (tmp_path / "x.de").write_text("a\nb\n")
    (tmp_path / "x.en").write_text("a\n")
    with pytest.raises(DataError, match="line-aligned"):
        load_pairs(tmp_path / "x")
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "missing")


def test_batch_layout():
    pairs = [("ab", "xyz"), ("abcd", "x")]
    loader = PairLoader(pairs, tok(), 2, shuffle=False)
    b = loader.next_batch()
    rows = {tuple(r[m].tolist()) for r, m in zip(b["src"], b["src_mask"])}
    assert rows == {(97, 98, EOS), (97, 98, 99, 100, EOS)}
    for src, mask, tgt_in, targets in zip(b["src"], b["src_mask"], b["tgt_in"], b["targets"]):
        n_src = int(mask.sum())
        assert (src[n_src:] == PAD).all() and src[n_src - 1] == EOS
        real = targets != -100
        assert tgt_in[0] == BOS and targets[real][-1] == EOS
        assert torch.equal(tgt_in[1 : int(real.sum())], targets[real][:-1])  # teacher forcing: shift by one
        assert (tgt_in[int(real.sum()) :] == PAD).all()
    assert b["src"].dtype == torch.long and b["src_mask"].dtype == torch.bool


def test_length_filter_and_missing_specials():
    pairs = [("a" * 10, "b" * 10), ("a" * 11, "b"), ("a", "b" * 11), ("", "b")]
    assert PairLoader(pairs, tok(), 1, max_len=10).num_dropped == 3
    with pytest.raises(DataError, match="no special token '<\\|bos\\|>'"):
        PairLoader(pairs, ByteTokenizer(), 1)


def test_bucketing_reduces_padding_and_covers_each_pair_once():
    pairs = toy_pairs(400)

    def pad_fraction(loader):
        pads = real = 0
        for _ in range(loader.batches_per_epoch):
            m = loader.next_batch()["src_mask"]
            pads, real = pads + int((~m).sum()), real + int(m.sum())
        return pads / real

    bucketed, unbucketed = (
        PairLoader(pairs, tok(), 8, seed=1),
        PairLoader(pairs, tok(), 8, seed=1, bucket_batches=1),
    )
    assert pad_fraction(bucketed) < 0.5 * pad_fraction(unbucketed)
    loader = PairLoader(pairs, tok(), 8, seed=1)
    seen = []
    for _ in range(loader.batches_per_epoch):
        b = loader.next_batch()
        seen += [bytes(r[m][:-1].tolist()).decode() for r, m in zip(b["src"], b["src_mask"])]
    assert sorted(seen) == sorted(s for s, _ in pairs) and loader.epoch == 1


def test_resume_and_ddp():
    pairs = toy_pairs(300)
    ref = PairLoader(pairs, tok(), 8, seed=5)
    expected = [ref.next_batch() for _ in range(60)]  # crosses an epoch boundary
    first = PairLoader(pairs, tok(), 8, seed=5)
    for _ in range(33):
        first.next_batch()
    resumed = PairLoader(pairs, tok(), 8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for want in expected[33:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    ranks = [PairLoader(pairs, tok(), 8, seed=5, rank=r, world_size=2) for r in range(2)]
    srcs = [
        {
            bytes(r[m][:-1].tolist())
            for _ in range(ld.batches_per_epoch)
            for b in [ld.next_batch()]
            for r, m in zip(b["src"], b["src_mask"])
        }
        for ld in ranks
    ]
    assert not srcs[0] & srcs[1] and len(srcs[0] | srcs[1]) > 250


def test_build_pair_loaders_on_multi30k(shared_data):
    cfg = DataConfig(
        source=[str(shared_data / "multi30k" / "train")],
        val_source=[str(shared_data / "multi30k" / "val")],
        max_pair_len=200,
    )
    train, make_val = build_pair_loaders(cfg, tok(), 32, 128, seed=0, device="cpu")
    assert (
        len(train) + train.num_dropped == 29000 and train.num_dropped > 0
    )  # byte-level: long captions dropped
    b = train.next_batch()
    assert b["src"].shape[0] == 32 and b["src"].shape[1] <= 128 and b["tgt_in"].shape[1] <= 128
    v1, v2 = make_val(), make_val()
    first = v1.next_batch()
    assert torch.equal(v2.next_batch()["src"], first["src"]) if v1 is not v2 else True
    again = make_val().next_batch()
    assert torch.equal(again["src"], first["src"]) and torch.equal(again["targets"], first["targets"])
