"""Tokenizers: byte-level BPE (trained here, or GPT-2's files) and character-level.

    tok = train_bpe(["input.txt"], vocab_size=4096)      # or train_bpe_from_iterator(texts, ...)
    ids = tok.encode("hello world"); text = tok.decode(ids)
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")

See docs/tokenizer.md for how the algorithm works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scratchlm.errors import TokenizerError
from scratchlm.tokenizer.bpe import train_bpe, train_bpe_from_iterator
from scratchlm.tokenizer.char import CHAR_FORMAT, CharTokenizer
from scratchlm.tokenizer.hf_format import from_hf_dict, load_gpt2_files
from scratchlm.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "CharTokenizer", "train_bpe", "train_bpe_from_iterator", "load_tokenizer"]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | CharTokenizer:
    """Load a tokenizer: a HF ``tokenizer.json``, a char-tokenizer JSON, or a directory holding either
    ``tokenizer.json`` or GPT-2's ``vocab.json`` + ``merges.txt``. ``.chat_template`` is the name of the chat
    template stored beside it in ``tokenizer_config.json`` (see ``chat_template.py``), else None."""
    from scratchlm.tokenizer.chat_template import read_template_name

    tok = _load(Path(path))
    tok.chat_template = read_template_name(Path(path) if Path(path).is_dir() else Path(path).parent)
    return tok


def _load(p: Path) -> Tokenizer | CharTokenizer:
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return load_gpt2_files(p)
        else:
            raise TokenizerError(f"{p} holds neither tokenizer.json nor vocab.json + merges.txt")
    if not p.is_file():
        raise TokenizerError(f"tokenizer file {p} does not exist; train one with `scratchlm tokenizer train`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, 5,000-digit ints
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0][:100]
        raise TokenizerError(f"{p} is not valid JSON ({reason}); the file is corrupt, re-create it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{p} is not a tokenizer file (expected a JSON object)")
    if data.get("type") == CHAR_FORMAT:
        return CharTokenizer.from_dict(data, str(p))
    if "model" in data:
        return from_hf_dict(data, str(p))
    raise TokenizerError(f"{p} is neither a tokenizer.json (no 'model') nor a char tokenizer file")
