"""Character-level tokenizer: one id per distinct character (Tiny Shakespeare, nanoGPT's shakespeare_char).

Ids: the training characters sorted by code point get ``0 .. n-1``, special tokens follow. Saved as a small
JSON file ``{"type": "scratchlm-char", "version": 1, "chars": [...], "special_tokens": {...}}``.
Same interface as :class:`~scratchlm.tokenizer.tokenizer.Tokenizer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from scratchlm.errors import TokenizerError
from scratchlm.tokenizer.pretokenize import check_special_tokens, special_splitter
from scratchlm.tokenizer.tokenizer import AllowedSpecial, json_fingerprint, write_json_atomic

CHAR_FORMAT = "scratchlm-char"


class CharTokenizer:
    """One token per character; characters unseen in training cannot be encoded (TokenizerError)."""

    chat_template: str | None = None  # name of the stored chat template (tokenizer/chat_template.py)

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = ("<|endoftext|>",)):
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("char tokenizer: 'chars' must be distinct single characters")
        check_special_tokens(special_tokens)
        self.chars = list(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        self._special = {s: len(self.chars) + i for i, s in enumerate(special_tokens)}
        self._itos = self.chars + list(self._special)

    @classmethod
    def train(cls, texts: Iterable[str], special_tokens: Sequence[str] = ("<|endoftext|>",)) -> CharTokenizer:
        """The sorted set of characters in ``texts`` (special-token strings are removed first)."""
        splitter = special_splitter(special_tokens)
        chars: set[str] = set()
        for text in texts:
            for piece in splitter.split(text) if splitter is not None else (text,):
                chars.update(piece)
        if not chars:
            raise TokenizerError("char tokenizer: the training text is empty; give it some text")
        return cls(sorted(chars), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eot_id(self) -> int:
        if "<|endoftext|>" in self._special:
            return self._special["<|endoftext|>"]
        if not self._special:
            raise TokenizerError("this char tokenizer has no special tokens, so no end-of-text id")
        return next(iter(self._special.values()))

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            raise TokenizerError(
                f"char tokenizer: character {e.args[0]!r} was not in the training text; retrain on text with it"
            ) from None

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Text -> ids; allowed special tokens (``"all"`` or a set) are matched longest first."""
        if allowed_special == "none":
            return self._encode_plain(text)
        allowed = set(self._special) if allowed_special == "all" else set(allowed_special)
        if not allowed <= set(self._special):
            raise TokenizerError(
                f"allowed_special names unknown special token(s) {sorted(allowed - set(self._special))}"
            )
        splitter = special_splitter(allowed)
        if splitter is None:
            return self._encode_plain(text)
        ids: list[int] = []
        pos = 0
        for m in splitter.finditer(text):
            ids += self._encode_plain(text[pos : m.start()])
            ids.append(self._special[m.group()])
            pos = m.end()
        return ids + self._encode_plain(text[pos:])

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = "none") -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def encode_iterable(
        self, iterable: Iterable[str], allowed_special: AllowedSpecial = "none"
    ) -> Iterator[int]:
        if allowed_special == "none":
            for piece in iterable:
                yield from self._encode_plain(piece)
        else:  # a special token may straddle two pieces: encode the whole text
            yield from self.encode("".join(iterable), allowed_special)

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join([self._itos[i] if i >= 0 else self._itos[len(self._itos)] for i in ids])
        except (IndexError, TypeError):
            raise TokenizerError(
                f"cannot decode: token ids must be ints in 0..{self.vocab_size - 1}"
            ) from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict:
        return {"type": CHAR_FORMAT, "version": 1, "chars": self.chars, "special_tokens": self._special}

    @classmethod
    def from_dict(cls, data: dict, where: str = "char tokenizer") -> CharTokenizer:
        try:
            chars = list(data["chars"])
            specials = data.get("special_tokens", {})
            ordered = sorted(specials, key=specials.get)
            if [specials[s] for s in ordered] != list(range(len(chars), len(chars) + len(ordered))):
                raise TokenizerError(f"{where}: special token ids must follow the characters densely")
            return cls(chars, ordered)
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise TokenizerError(
                f"{where}: not a valid char tokenizer file ({type(e).__name__}: {str(e)[:80]})"
            ) from None

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @property
    def fingerprint(self) -> str:
        return json_fingerprint(self.to_dict())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self._special)})"
