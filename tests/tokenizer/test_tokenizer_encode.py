"""Encoding and decoding behaviour: special tokens, U+FFFD, streaming, batches, round trips."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import TokenizerError
from scratchlm.tokenizer import Tokenizer, train_bpe_from_iterator

EOT, DOUBLE = "<|endoftext|>", "<|endoftext|><|endoftext|>"
TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024; don't panic!\n"
    "  def f(x):\n      return x * 12345\n日本語のテキストです。 Ünïcödé café 😀👍🏽\n"
) * 40

# Code points assigned in Python's Unicode data (14.0) only: for characters assigned later the libraries
# compared here disagree among themselves (regex 2026 has Unicode 17 tables, tiktoken's Rust regex an older
# version: U+323B0, CJK Extension J, is a letter to one and not to the other), so \p{L} splits differ.
ASSIGNED = st.characters(codec="utf-8", exclude_categories=("Cn",))


@pytest.fixture(scope="module", params=[True, False], ids=["tiktoken", "python"])
def tok(request) -> Tokenizer:
    t = train_bpe_from_iterator(
        [TRAIN_TEXT], 600, special_tokens=[EOT, DOUBLE, "<|pad|>"], num_workers=1, progress=False
    )
    t.use_tiktoken = request.param
    if request.param:
        pytest.importorskip("tiktoken")
        assert t.fast
    return t


def test_special_tokens_default_are_text(tok):
    ids = tok.encode(f"a{EOT}b")
    assert tok.special_tokens[EOT] not in ids
    assert tok.decode(ids) == f"a{EOT}b"


def test_special_tokens_allowed_longest_first(tok):
    sp = tok.special_tokens
    assert tok.encode(f"x{DOUBLE}y", allowed_special="all") == [
        *tok.encode("x"),
        sp[DOUBLE],
        *tok.encode("y"),
    ]
    three = tok.encode(EOT * 3, allowed_special="all")
    assert three == [sp[DOUBLE], sp[EOT]]
    # only EOT allowed: the double one is two EOTs
    assert tok.encode(DOUBLE, allowed_special={EOT}) == [sp[EOT], sp[EOT]]
    assert tok.encode("<|pad|>", allowed_special={EOT}) == tok.encode("<|pad|>")
    assert tok.eot_id == sp[EOT]
    with pytest.raises(TokenizerError):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_decode_never_raises_on_partial_utf8(tok):
    ids = tok.encode("😀")
    raw = tok.decode_bytes(ids)
    assert raw == "😀".encode()
    # every single token of a multi-byte character decodes to U+FFFD pieces, never an exception
    for i in range(256):
        text = tok.decode([i])
        assert text == bytes([i]).decode("utf-8", errors="replace")
    assert tok.decode([]) == ""
    with pytest.raises(TokenizerError):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_encode_batch_and_iterable(tok):
    lines = TRAIN_TEXT.splitlines(keepends=True) * 30
    text = "".join(lines)
    assert tok.encode_batch(lines[:50]) == [tok.encode(x) for x in lines[:50]]
    assert tok.encode_batch([f"a{EOT}"], allowed_special="all") == [
        tok.encode(f"a{EOT}", allowed_special="all")
    ]
    assert list(tok.encode_iterable(io.StringIO(text))) == tok.encode(text)
    with_specials = text.replace("\n  def", f"\n{EOT}  def")
    streamed = list(tok.encode_iterable(io.StringIO(with_specials), allowed_special="all"))
    assert streamed == tok.encode(with_specials, allowed_special="all")


def test_encode_iterable_keeps_overlapping_specials_across_buffer_edges(tok):
    # the stream's buffer fills exactly at the end of an EOT whose doubled form continues in the next piece
    from scratchlm.tokenizer.tokenizer import _STREAM_CHARS

    head = "x" * (_STREAM_CHARS - len(EOT)) + EOT
    pieces = [head, EOT + "y", "z" * 10 + EOT, EOT]
    text = "".join(pieces)
    expected = tok.encode(text, allowed_special="all")
    assert expected.count(tok.special_tokens[DOUBLE]) == 2
    assert list(tok.encode_iterable(pieces, allowed_special="all")) == expected


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=ASSIGNED, max_size=60))
def test_roundtrip_arbitrary_strings(text):
    t = _shared()
    assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode(text, allowed_special="all")) == text
    assert t.encode(text) == t.encode_reference(text)


_TOK: list[Tokenizer] = []


def _shared() -> Tokenizer:
    if not _TOK:
        _TOK.append(train_bpe_from_iterator([TRAIN_TEXT], 600, num_workers=1, progress=False))
    return _TOK[0]


def test_lone_surrogates_become_replacement_char(tok):
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")


def test_tokenizer_can_be_sent_to_worker_processes(tok):
    import multiprocessing

    texts = ["hello world", "日本語 😀", f"x{EOT}y"]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        remote = pool.map(tok.encode, texts)
    assert remote == [tok.encode(t) for t in texts]
