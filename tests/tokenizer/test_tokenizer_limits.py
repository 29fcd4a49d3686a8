"""A pre-tokenizer regex is size-checked before it is compiled: `a{99999999}` in a tokenizer.json took 13.8 GB
in 40 s (`tokenizer encode`, and every command that loads a run's tokenizer); now it is one line at once."""

from __future__ import annotations

import copy
import json
import time

import pytest
import regex

from scratchlm.cli import main
from scratchlm.errors import ConfigError
from scratchlm.tokenizer import load_tokenizer, train_bpe_from_iterator
from scratchlm.tokenizer.pretokenize import MAX_PATTERN_COST, PATTERNS, pattern_cost, resolve_pattern

TEXT = "the cat sat on the mat. the dog sat on the log, 12 345!\n" * 20


@pytest.fixture(scope="module")
def tok_dict() -> dict:
    return train_bpe_from_iterator([TEXT], vocab_size=300, progress=False, num_workers=1).to_hf_dict()


def _with_pattern(d: dict, pattern: str) -> dict:
    d = copy.deepcopy(d)
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    return d


@pytest.mark.parametrize(
    "pattern",
    ["a{99999999}", "(?:a{1000}){1000}", r"\w{5000,20000}", "[ab]{,99999}", "x" * 10_001],
)
def test_a_huge_regex_in_tokenizer_json_is_one_line_before_compiling(tmp_path, tok_dict, capsys, pattern):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_with_pattern(tok_dict, pattern)))
    start = time.perf_counter()
    assert main(["tokenizer", "encode", "--tokenizer", str(path), "--text", "hello"]) == 2
    assert time.perf_counter() - start < 5  # (it ran for minutes, taking gigabytes)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "repeats too much" in err or "characters long" in err


def test_ordinary_patterns_pass_and_keep_working(tmp_path, tok_dict):
    for name, pattern in PATTERNS.items():
        assert pattern_cost(pattern) < 100, name
        assert resolve_pattern(name) == pattern
    pattern = r"\p{L}{1,3}|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+"
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(_with_pattern(tok_dict, pattern)))
    tok = load_tokenizer(path)
    assert tok.decode(tok.encode("the 12345 cats!")) == "the 12345 cats!"


@pytest.mark.parametrize(
    "pattern, cost",
    [
        ("a", 1),
        ("a{3}", 3),
        ("a{2,7}", 7),
        ("(?:ab){10}", 40),  # ( ? : a b -> 4 atoms, times 10
        (r"\p{N}{1,3}", 3),  # the braces of \p{N} are no repetition
        ("[{}]{4}", 4),  # nor are braces inside a class
        ("(a{10}){10}", 100),
        ("a|b{5}", 7),
    ],
)
def test_pattern_cost_is_an_upper_bound_that_multiplies_nested_repetitions(pattern, cost):
    assert pattern_cost(pattern) == cost
    regex.compile(pattern)  # each is a valid regex


def test_the_limit_is_cheap_to_compile():
    start = time.perf_counter()
    regex.compile(f"a{{{MAX_PATTERN_COST}}}")
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ConfigError, match="repeats too much"):
        resolve_pattern(f"a{{{MAX_PATTERN_COST + 1}}}")
