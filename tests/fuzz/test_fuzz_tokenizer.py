"""Generated hostile tokenizer.json files: any node of a real file replaced or deleted, random pre-tokenizer
regexes, and the raw text truncated or bit-flipped.

Property: load_tokenizer raises one TokenizerError line, or gives a tokenizer that encodes any text to ids
in its vocabulary and decodes them back to the same text (or, for a regex that backtracks without end,
raises TokenizerError). Nothing reaches tiktoken's Rust engine that would make it panic.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

from fuzz_helpers import DAMAGE, JSON_VALUES, damage, two_speeds
from hypothesis import strategies as st

from scratchlm.errors import TokenizerError
from scratchlm.tokenizer import load_tokenizer, train_bpe_from_iterator

_TEXT = "the cat sat on the mat. 12 345!\n\tnaïve café 中文 😀 <|endoftext|> x"
PRISTINE = train_bpe_from_iterator(
    [_TEXT * 3], vocab_size=290, special_tokens=["<|endoftext|>", "<|bos|>"], progress=False
).to_hf_dict()


def _paths(obj, prefix=()):
    """Every (path) to a node of a JSON tree, the vocab's and merges' entries sampled sparsely."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for i, (k, v) in enumerate(items):
        if i < 8 or i % 37 == 0:
            yield from _paths(v, (*prefix, k))


PATHS = list(_paths(PRISTINE))[1:]


def _replace(obj, path, value, delete: bool):
    obj = copy.deepcopy(obj)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


_FRAGMENTS = [
    "a",
    "b",
    "\\w",
    "\\d",
    "\\s",
    "\\S",
    ".",
    "+",
    "*",
    "?",
    "+?",
    "{2,}",
    "(",
    ")",
    "(?:",
    "|",
    "[a-z]",
    "[^ ]",
    "(?=a)",
    "(?!b)",
    "(?<=a)",
    "\\b",
    "^",
    "$",
    "\\p{L}",
    "(?i)",
    "\\1",
    "(?P<n>",
    " ",
]
PATTERNS = st.lists(st.sampled_from(_FRAGMENTS), min_size=0, max_size=7).map("".join)


def _with_pattern(pattern: str) -> dict:
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {**copy.deepcopy(PRISTINE), "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, level]}}


def _check(raw: str, texts: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(raw, encoding="utf-8", errors="surrogatepass")
        try:
            tok = load_tokenizer(path)
        except TokenizerError as e:
            assert "\n" not in str(e)
            return
    for text in texts:
        try:
            ids = tok.encode(text)
        except TokenizerError:  # a custom regex past tiktoken's backtracking limit
            continue
        assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text, allowed_special="all")) == text


TEXTS = st.lists(st.text(max_size=40), min_size=1, max_size=3).map(lambda t: [_TEXT, *t])


def check_mutated_node(path, value, delete, texts):
    _check(json.dumps(_replace(PRISTINE, path, value, delete)), texts)


test_mutated_node, test_mutated_node_long = two_speeds(
    fast=40, slow=3000, path=st.sampled_from(PATHS), value=JSON_VALUES, delete=st.booleans(), texts=TEXTS
)(check_mutated_node)


def check_pattern(pattern, texts):
    _check(json.dumps(_with_pattern(pattern)), texts)


test_pattern, test_pattern_long = two_speeds(fast=40, slow=3000, pattern=PATTERNS, texts=TEXTS)(check_pattern)


def check_damaged_text(dmg, texts):
    raw = json.dumps(PRISTINE).encode("utf-8")
    _check(damage(raw, *dmg).decode("utf-8", errors="replace"), texts)


test_damaged_text, test_damaged_text_long = two_speeds(fast=25, slow=2000, dmg=DAMAGE, texts=TEXTS)(
    check_damaged_text
)
