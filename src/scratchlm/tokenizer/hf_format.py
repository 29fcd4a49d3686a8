"""Hugging Face ``tokenizer.json`` and GPT-2 ``vocab.json`` + ``merges.txt``: write and read, no pickles.

Both formats store byte-level tokens as *strings*: every byte is mapped to one printable character
(GPT-2's "bytes to unicode" table: printable Latin-1 bytes map to themselves, the 68 others to
U+0100..U+0143 in byte order), so a token's bytes become a readable string (a leading space shows as ``Ġ``).

Our tokenizer.json: a ``BPE`` model (vocab = non-special tokens, merges as ``"left right"`` strings), the
``ByteLevel`` pre-tokenizer (gpt2 pattern) or ``Split(regex) + ByteLevel(use_regex=False)`` (other
patterns), the ``ByteLevel`` decoder, and the special tokens as ``added_tokens`` with ``special: true``.
``tokenizers.Tokenizer.from_file`` loads it and encodes to the same ids (tested).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from scratchlm.errors import ConfigError, TokenizerError
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, PATTERNS
from scratchlm.tokenizer.tokenizer import Tokenizer


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's table: byte -> printable character (printable Latin-1 bytes keep their own character)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@cache
def _tables() -> tuple[dict[int, str], dict[int, str]]:
    """str.translate tables: latin-1 char of a byte -> printable char, and back (non-alphabet -> U+FFFF)."""
    forward = {b: c for b, c in byte_to_unicode().items()}
    backward = {cp: "\uffff" for cp in range(0x144)}
    backward.update({ord(c): chr(b) for b, c in byte_to_unicode().items()})
    return forward, backward


def bytes_to_str(token: bytes) -> str:
    return token.decode("latin-1").translate(_tables()[0])


def str_to_bytes(token: str, where: str) -> bytes:
    try:
        return token.translate(_tables()[1]).encode("latin-1")
    except (UnicodeEncodeError, AttributeError):
        raise TokenizerError(
            f"{where}: token {token!r} is not a byte-level BPE token; only byte-level BPE files are supported"
        ) from None


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def to_hf_dict(tok: Tokenizer) -> dict:
    """The tokenizer as a Hugging Face ``tokenizer.json`` object."""
    vocab = {bytes_to_str(t): i for i, t in sorted(tok.vocab().items())}
    merges = [f"{bytes_to_str(tok.token_bytes(a))} {bytes_to_str(tok.token_bytes(b))}" for a, b in tok.merges]
    if tok.pattern == GPT2_PATTERN:
        pre = _byte_level(use_regex=True)
    else:
        split = {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False}
        pre = {"type": "Sequence", "pretokenizers": [split, _byte_level(use_regex=False)]}
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": None,
        "decoder": _byte_level(use_regex=True),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _pattern_of(pre: dict | None, where: str) -> str:
    """Read the pre-tokenizer back: ByteLevel(use_regex) -> gpt2; Split(Regex) + ByteLevel -> that regex."""
    if not isinstance(pre, dict):
        raise TokenizerError(f"{where}: has no pre_tokenizer; expected a byte-level BPE tokenizer.json")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Split"
            and isinstance(parts[0].get("pattern"), dict)
            and "Regex" in parts[0]["pattern"]
            and parts[0].get("behavior") == "Isolated"
            and parts[1].get("type") == "ByteLevel"
            and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space")
        ):
            pat = parts[0]["pattern"]["Regex"]
            return next((name for name, p in PATTERNS.items() if p == pat), pat)
    raise TokenizerError(
        f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:80]}; only ByteLevel or Split+ByteLevel are supported"
    )


def from_hf_dict(data: dict, where: str = "tokenizer.json") -> Tokenizer:
    """Build a :class:`Tokenizer` from a Hugging Face ``tokenizer.json`` object (byte-level BPE only)."""
    try:
        model = data["model"]
        if model.get("type", "BPE") != "BPE":
            raise TokenizerError(f"{where}: model type {model.get('type')!r} is not BPE")
        if data.get("normalizer") is not None:
            raise TokenizerError(
                f"{where}: normalizers are not supported (found {data['normalizer'].get('type')})"
            )
        specials = {
            _content(t["content"], where): _token_id(t["id"], where) for t in data.get("added_tokens") or []
        }
        special_ids = set(specials.values())
        vocab = {
            _token_id(i, where): str_to_bytes(s, where)
            for s, i in model["vocab"].items()
            if _token_id(i, where) not in special_ids
        }
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        pattern = _pattern_of(data.get("pre_tokenizer"), where)
    except TokenizerError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TokenizerError(
            f"{where}: not a valid tokenizer.json ({type(e).__name__}: {e}); re-save it"
        ) from None
    return _build(vocab, merges, specials, pattern, where)


MAX_ID = 2**31 - 1  # ids are dense from 0, so no real vocabulary comes near this


def _token_id(value, where: str) -> int:
    """A token id read from JSON: an int in 0..MAX_ID (not a float such as 1e400, a bool or a string)."""
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise TokenizerError(f"{where}: token id {str(value)[:40]!r} is not an integer in 0..{MAX_ID}")
    return value


def _content(value, where: str) -> str:
    """A special token's text: a non-empty string (an empty one would match between every character)."""
    if not isinstance(value, str) or not value:
        raise TokenizerError(f"{where}: special token {str(value)[:40]!r} must be a non-empty string")
    return value


def _build(
    vocab: dict[int, bytes], merges: list, specials: dict[str, int], pattern: str, where: str
) -> Tokenizer:
    ids = {t: i for i, t in vocab.items()}
    pairs = []
    for k, m in enumerate(merges):
        if not (isinstance(m, list | tuple) and len(m) == 2 and all(isinstance(x, str) for x in m)):
            raise TokenizerError(f"{where}: merge #{k} {m!r} is not a pair of tokens")
        a, b = (str_to_bytes(x, where) for x in m)
        if a not in ids or b not in ids:
            raise TokenizerError(f"{where}: merge #{k} {m!r} uses a token missing from the vocabulary")
        pairs.append((ids[a], ids[b]))
    try:
        return Tokenizer(vocab, pairs, specials, pattern)
    except (TokenizerError, ConfigError) as e:  # ConfigError: the pre-tokenizer regex
        raise TokenizerError(f"{where}: {e}") from None


def load_gpt2_files(directory: str | os.PathLike) -> Tokenizer:
    """Load GPT-2's ``vocab.json`` + ``merges.txt`` (OpenAI's encoder.json/vocab.bpe under HF names).

    Entries of vocab.json that are neither a single byte nor made by a merge (``<|endoftext|>``) are
    special tokens.
    """
    d = Path(directory)
    where = str(d)
    try:
        raw_vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, 5,000 digits
        raise TokenizerError(f"{where}: cannot read vocab.json + merges.txt ({type(e).__name__})") from None
    if not isinstance(raw_vocab, dict):
        raise TokenizerError(f"{where}/vocab.json: expected a JSON object token -> id")
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    merged = {"".join(m) for m in merges}
    specials, vocab = {}, {}
    table = unicode_to_byte()
    for s, i in raw_vocab.items():
        if (len(s) == 1 and s in table) or s in merged:
            vocab[_token_id(i, where)] = str_to_bytes(s, where)
        else:
            specials[_content(s, where)] = _token_id(i, where)
    return _build(vocab, merges, specials, "gpt2", where)
