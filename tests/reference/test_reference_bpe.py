"""The one-screen BPE trainer learns the same merges as the fast incremental one; its Tokenizer encodes and
decodes as the fast one."""

from __future__ import annotations

from scratchlm.corpus import stdlib_root
from scratchlm.reference.bpe import Tokenizer, merge_word, train_merges
from scratchlm.tokenizer import Tokenizer as FastTokenizer
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


SPECIALS = ["<|endoftext|>", "<|pad|>", "<|pad|><|pad|>"]  # the last overlaps the second: longest first
SAMPLES = [
    "def f(x):\n    return x  # it's fine\n\n\n   trailing   ",
    "héllo wörld ñ 日本語 🙂 naïve café",
    "<|endoftext|>a<|pad|><|pad|><|pad|>b<|endoftext|><|endoftext|>",
    "",
    " ",
    "don't we'll they've 12345 3.14",
]


def _tokenizers():
    text = (stdlib_root() / "textwrap.py").read_text(encoding="utf-8")[:20_000] + " héllo wörld ñ 日本語 " * 5
    merges = train_merges(dict(count_pretokens([text], resolve_pattern("gpt2"), [])), 200)
    return Tokenizer.from_merge_ids(merges, SPECIALS), FastTokenizer.from_merges(merges, SPECIALS)


def test_reference_encode_decode_equal_the_fast_tokenizer():
    ref, fast = _tokenizers()
    body = (stdlib_root() / "difflib.py").read_text(encoding="utf-8")[:5_000]  # text it was not trained on
    for text in [*SAMPLES, body]:
        ids = ref.encode(text)
        assert ids == fast.encode(text, allowed_special="all"), text
        assert ref.decode(ids) == text == fast.decode(ids)
    assert ref.encode("<|pad|><|pad|>") == [fast.special_tokens["<|pad|><|pad|>"]]
    assert ref.decode([0xC3]) == "\ufffd"  # half a UTF-8 character


def test_reference_tokenizer_takes_the_course_format():
    """CS336's constructor: vocab id -> bytes and merges as pairs of bytes, from any tokenizer's tables."""
    _, fast = _tokenizers()
    vocab = fast.vocab()  # no special tokens: the constructor adds them
    merges = [(fast.token_bytes(a), fast.token_bytes(b)) for a, b in fast.merges]
    ref = Tokenizer(vocab, merges, SPECIALS)
    text = SAMPLES[0] + SAMPLES[2]
    assert ref.encode(text) == fast.encode(text, allowed_special="all")
    assert list(ref.encode_iterable(["ab\n", "cd\n"])) == ref.encode("ab\ncd\n")
