"""A tiny duck-typed byte-level tokenizer for data tests: ids = UTF-8 bytes, <|endoftext|> = 256.

It is independent of scratchlm.tokenizer, so prepare/loader tests check the data pipeline alone (and its
ids are trivially correct: decoding is ``bytes(ids).decode()``). Module-level so that spawn workers can
unpickle it.
"""

from __future__ import annotations


class ByteTokenizer:
    eot_id = 256

    def __init__(
        self, vocab_size: int | None = None, fingerprint: str = "bytes-v1", specials=("<|endoftext|>",)
    ):
        self.special_tokens = {tok: 256 + i for i, tok in enumerate(specials)}
        self.vocab_size = vocab_size or 256 + len(specials)
        self.fingerprint = fingerprint

    def encode(self, text: str, allowed_special="none") -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, allowed_special="none") -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def split_docs(tokens, eot: int = 256) -> list[list[int]]:
    """Token stream -> documents (each must end with eot)."""
    docs, cur = [], []
    for t in tokens:
        if t == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(int(t))
    assert not cur, "token stream does not end with the end-of-text token"
    return docs
