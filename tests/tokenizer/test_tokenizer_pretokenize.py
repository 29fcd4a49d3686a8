"""Pre-tokenization shortcuts are exact: unit counting and safe cut points change no pre-token."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.corpus import builtin_corpus
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN, _safe_cut, count_pretokens

PATTERNS = [GPT2_PATTERN, GPT4_PATTERN]
# whitespace of every kind (incl. U+001C, which str.isspace() has and regex's \s has not), letters, digits,
# punctuation followed by newlines, contractions
pieces = st.one_of(
    st.sampled_from(
        [" ", "  ", "\n", "\n\n", "\r\n", "\t", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u3000", " \n "]
    ),
    st.sampled_from(
        ["a", "word", "Été", "日本", "x1", "123456", ".", "!!", ".\n", "'s", "'LL", "😀", "e\u0301"]
    ),
    st.text(max_size=4),
)
texts = st.lists(pieces, max_size=40).map("".join)


@pytest.mark.parametrize("pattern", PATTERNS, ids=["gpt2", "gpt4"])
def test_unit_counting_equals_direct_regex_on_corpora(pattern, shared_data):
    docs = [
        (shared_data / "tinyshakespeare.txt").read_text()[:200_000],
        (shared_data / "tinystories/valid_head.txt").read_text()[:200_000],
        *[p.read_text(errors="replace") for p in builtin_corpus().train.paths[:40]],
    ]
    direct = Counter()
    for d in docs:
        direct.update(regex.findall(pattern, d))
    assert count_pretokens(docs, pattern, []) == direct


@settings(max_examples=200, deadline=None)
@given(text=texts)
def test_unit_counting_equals_direct_regex_property(text):
    for pattern in PATTERNS:
        assert count_pretokens([text], pattern, []) == Counter(regex.findall(pattern, text))


@settings(max_examples=200, deadline=None)
@given(text=texts, frac=st.floats(0, 1))
def test_safe_cut_is_a_boundary(text, frac):
    prefix = text[: int(len(text) * frac)]
    cut = _safe_cut(prefix)
    if cut < 0:
        return
    assert 0 < cut < len(prefix) + 1
    for pattern in PATTERNS:
        whole = regex.findall(pattern, text)
        assert regex.findall(pattern, text[:cut]) + regex.findall(pattern, text[cut:]) == whole


# units the counting shortcut cuts without the regex (letters, one ASCII symbol, leading spaces/newlines)
# and units next to them that must still go through it
SHORTCUT_UNITS = [
    "word",
    " word",
    "  word",
    "   word,",
    "\nWord",
    "\n\nWord.",
    " \nword",
    "\n word!",
    " \n word;",
    "\n\n  Été)",
    " 日本語",
    "word's",
    " don't",
    "x\x1cword",
    "\x1cword",
    "word\x1c",
    "\tword",
    "\r\nword",
    " word.\n",
    " word..",
    " word1",
    " 123",
    " é,",
    " ,",
    ",",
    " \u3000word",
    "\xa0word",
    " wörd~",
    " word€",
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=["gpt2", "gpt4"])
def test_counting_shortcut_is_exact_on_tricky_units(pattern):
    for unit in SHORTCUT_UNITS:
        for text in (unit, "a" + unit, unit + " b", unit + "\n"):
            assert count_pretokens([text], pattern, []) == Counter(regex.findall(pattern, text)), repr(text)


def test_isalpha_letters_are_unicode_letters():
    # the shortcut takes str.isalpha() for the patterns' \p{L}; letters newer than Python's Unicode tables
    # (isalpha False) just go through the regex
    letter = regex.compile(r"\p{L}")
    assert [hex(c) for c in range(sys.maxunicode + 1) if chr(c).isalpha() and not letter.match(chr(c))] == []
