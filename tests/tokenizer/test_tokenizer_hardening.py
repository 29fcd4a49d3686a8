"""Hostile and careless tokenizer input: repeated CLI flags, bad ids, hostile tokenizer.json files.

Each case is refused with one TokenizerError line (exit code 2 from the CLI), before anything reaches a
native library (tiktoken's Rust regex engine panics on an empty pre-token). The generated versions of
these cases live in tests/fuzz/test_fuzz_tokenizer.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import re

import pytest

from scratchlm.cli import build_parser, main
from scratchlm.errors import TokenizerError
from scratchlm.tokenizer import Tokenizer, load_tokenizer, train_bpe_from_iterator

TEXT = "the cat sat on the mat. the dog sat on the log, 12 345!\n" * 20


@pytest.fixture(scope="module")
def tok_dict() -> dict:
    tok = train_bpe_from_iterator(
        [TEXT], vocab_size=300, special_tokens=["<|endoftext|>", "<|bos|>"], progress=False
    )
    return tok.to_hf_dict()


def _write(tmp_path, obj, name="tokenizer.json", raw: str | None = None):
    p = tmp_path / name
    p.write_text(raw if raw is not None else json.dumps(obj), encoding="utf-8")
    return p


def _bos_id(raw: str, new_id: str) -> str:
    """The tokenizer.json text with the id of <|bos|> replaced by ``new_id`` (JSON text)."""
    return re.sub(r'"id": \d+(, "content": "<\|bos\|>")', lambda m: f'"id": {new_id}{m.group(1)}', raw)


def _with_pattern(d: dict, pattern: str) -> dict:
    d = copy.deepcopy(d)
    split = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, byte_level]}
    return d


# ---- 1. a repeated --special (or any list option) keeps every value ----------------------------------------


def test_repeated_special_keeps_all_of_them(tmp_path, capsys):
    (tmp_path / "a.txt").write_text(TEXT)
    out = tmp_path / "tok.json"
    args = [
        "tokenizer",
        "train",
        "--input",
        str(tmp_path / "a.txt"),
        "--vocab-size",
        "300",
        "--out",
        str(out),
    ]
    assert (
        main([*args, "--no-progress", "--workers", "1", "--special", "<|endoftext|>", "--special", "<|bos|>"])
        == 0
    )
    assert list(load_tokenizer(out).special_tokens) == ["<|endoftext|>", "<|bos|>"]


def _all_actions(parser: argparse.ArgumentParser, prefix: str = "scratchlm"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_actions(sub, f"{prefix} {name}")
        else:
            yield prefix, action


def test_every_list_option_accumulates_when_repeated():
    """The class of case 1: an option taking several values (nargs * or +) must not drop the values of its
    first occurrence when given twice (argparse's default 'store' keeps only the last)."""
    offenders = [
        f"{where} {action.option_strings[0]}"
        for where, action in _all_actions(build_parser())
        if action.option_strings
        and action.nargs in ("*", "+")
        and not isinstance(action, argparse._ExtendAction | argparse._AppendAction)
    ]
    assert offenders == []


# ---- 10. hostile tokenizer.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: _bos_id(s, "1e400"), id="id-1e400"),
        pytest.param(lambda s: _bos_id(s, "9" * 5000), id="id-5000-digits"),
        pytest.param(lambda s: _bos_id(s, "279.0"), id="id-float"),
        pytest.param(lambda s: _bos_id(s, "true"), id="id-bool"),
        pytest.param(lambda s: _bos_id(s, "-1"), id="id-negative"),
        pytest.param(lambda s: '{"model": ' + "[" * 200_000 + "]" * 200_000 + "}", id="nesting-200k"),
        pytest.param(lambda s: s.replace('"content": "<|bos|>"', '"content": ""'), id="empty-special"),
        pytest.param(lambda s: s.replace('"content": "<|bos|>"', '"content": 5'), id="int-special"),
        pytest.param(lambda s: s[: len(s) // 2], id="truncated"),
        pytest.param(lambda s: "[1, 2]", id="a-list"),
    ],
)
def test_hostile_tokenizer_json_is_one_error(tmp_path, tok_dict, mutate, capsys):
    raw = mutate(json.dumps(tok_dict))
    path = _write(tmp_path, None, raw=raw)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(path)
    assert main(["tokenizer", "encode", "--tokenizer", str(path), "--text", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("pattern", ["", "(?=a)", r"\b", r"\w*", "a?", "(?:)", "x|", "(?<=a)"])
def test_a_pattern_matching_the_empty_string_is_refused_before_tiktoken(tmp_path, tok_dict, pattern, capfd):
    path = _write(tmp_path, _with_pattern(tok_dict, pattern))
    with pytest.raises(TokenizerError, match="matches the empty string"):
        load_tokenizer(path)
    assert "panicked" not in capfd.readouterr().err  # nothing reached the Rust engine


def test_a_catastrophic_pattern_is_one_error_not_a_panic_traceback(tmp_path, tok_dict):
    """fancy-regex (tiktoken) gives up on ``(?:a|a)+`` after its backtracking limit: a panic, caught."""
    pattern = r"(?:a|a)+(?=b)c|[^a]+|a"
    tok = load_tokenizer(_write(tmp_path, _with_pattern(tok_dict, pattern)))
    if not tok.fast:
        pytest.skip("tiktoken is not installed: the pure-Python encoder has no backtracking limit")
    with pytest.raises(TokenizerError, match="failed on this text"):
        tok.encode("a" * 40 + "!")


def test_empty_special_token_refused_by_every_tokenizer():
    with pytest.raises(TokenizerError, match="non-empty"):
        Tokenizer.from_merges([], ["<|endoftext|>", ""])
    from scratchlm.tokenizer import CharTokenizer

    with pytest.raises(TokenizerError, match="non-empty"):
        CharTokenizer(["a", "b"], ["", "<|x|>"])
    with pytest.raises(TokenizerError):
        CharTokenizer.from_dict({"chars": [1, 2], "special_tokens": {}})


# ---- 11. `tokenizer decode` with a non-integer: one line, not argparse's usage block --------------------------


@pytest.mark.parametrize("bad", ["x", "1.5", "0x10", "-"])
def test_decode_non_integer_is_one_line(tmp_path, tok_dict, bad, capsys):
    path = _write(tmp_path, tok_dict)
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "decode", "--tokenizer", str(path), "1", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: scratchlm tokenizer decode: ") and err.count("\n") == 1, err
    assert "usage:" not in err


def test_decode_out_of_range_id_is_one_error(tmp_path, tok_dict, capsys):
    path = _write(tmp_path, tok_dict)
    assert main(["tokenizer", "decode", "--tokenizer", str(path), "1", "100000"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


# ---- a custom pre-tokenizer regex that does not match every character loses no text --------------------------

_GAP_TEXTS = ["a b, c", "the cat sat on the mat. 12 345!\n\tok", "abc  abab, c1 ab!", "naïve café 中文 😀"]


@pytest.mark.parametrize("pattern", [r"\w+", r"[a-z]+|\d", r"(?<=a)b+", r"ab(?=c)", r"(a+)(b)", r" ?\p{L}+"])
def test_custom_pattern_keeps_the_text_between_matches_as_hf_does(tmp_path, pattern):
    """A regex that skips characters (``\\w+`` skips spaces) used to drop them: "a b" encoded as "ab".
    Now the text between matches is a piece, exactly as HF tokenizers' Split(Isolated) makes it."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = train_bpe_from_iterator([TEXT, *_GAP_TEXTS], vocab_size=300, pattern=pattern, progress=False)
    tok.save(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in [*_GAP_TEXTS, TEXT]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == hf.encode(text).ids
        assert tok.encode_reference(text) == ids  # the pure-Python path agrees with the fast one


def test_custom_pattern_with_a_named_group_is_lossless():
    tok = train_bpe_from_iterator([TEXT], vocab_size=280, pattern=r"(?P<word>\w+)", progress=False)
    for text in _GAP_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_a_pattern_tiktoken_rejects_falls_back_to_the_python_encoder(capfd):
    """Found by the long fuzz run: Python's regex reads 'a(?=a)+', tiktoken's engine refuses to build."""
    tok = Tokenizer.from_merges([], ["<|endoftext|>"], pattern="a(?=a)+|[^a]+|a")
    assert not tok.fast and "rejects the pattern" in capfd.readouterr().err
    assert tok.decode(tok.encode("aab ba")) == "aab ba"
