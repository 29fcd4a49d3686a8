"""The one-screen BPE trainer learns the same merges as the fast incremental one."""

from __future__ import annotations

from scratchlm.corpus import stdlib_root
from scratchlm.reference.bpe import merge_word, train_merges
from scratchlm.tokenizer.bpe import learn_merges
from scratchlm.tokenizer.pretokenize import count_pretokens, resolve_pattern


def test_merge_word_scans_left_to_right():
    assert merge_word([97, 97, 97], (97, 97), 256) == [256, 97]
    assert merge_word([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]


def test_reference_bpe_learns_the_fast_trainers_merges():
    text = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8")[:20_000] + " héllo wörld ñ 日本語 " * 5
    counts = dict(count_pretokens([text], resolve_pattern("gpt2"), []))
    assert train_merges(counts, 150) == learn_merges(counts, 150)
    assert train_merges({"ab": 1}, 5) == [(97, 98)]  # stops when no pair is left
