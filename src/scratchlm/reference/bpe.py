"""Byte-level BPE in its simplest correct form (Sennrich et al. 2016; GPT-2's byte-level variant): training,
and the :class:`Tokenizer` that encodes and decodes with the result.

The fast trainer (:func:`scratchlm.tokenizer.bpe.learn_merges`) keeps incremental pair counts and a heap;
this one recounts everything at every merge, which is slow (O(merges x corpus)) but fits on one screen.
Both produce the same merges (tests/reference): ties go to the greatest pair of byte strings.

    vocab = the 256 bytes (id = byte value)
    repeat num_merges times:
        count every adjacent pair of ids in every pre-token, weighted by the pre-token's count
        best = the most frequent pair (ties: the greatest (bytes_a, bytes_b))
        give it the next id, and replace each occurrence (left to right) in every pre-token

    encode(text): cut at special tokens (longest first); cut the rest into pre-tokens with the regex;
                  in each pre-token start from its UTF-8 bytes and apply the learned merges, always the
                  adjacent pair that was learned first, until none applies; map the byte strings to ids
    decode(ids):  concatenate the ids' byte strings, decode UTF-8 (invalid bytes -> U+FFFD)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import regex

# the pre-tokenizer regex of GPT-2 (the default of ScratchLM and of CS336): contractions, letters, digits,
# other symbols, each with an optional leading space, and runs of whitespace
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN


def merge_word(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, scanning left to right (so "aaa" -> "Xa")."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[int, int]]:
    """Learn up to ``num_merges`` merges from pre-token counts; merge k creates token id 256 + k.

    word_counts: pre-token (text) -> how often it occurs. Returns [(left_id, right_id), ...] in order.
    """
    words = {tuple(word.encode("utf-8")): count for word, count in word_counts.items()}
    token_bytes = [bytes([b]) for b in range(256)]  # what each id stands for
    merges = []
    for _ in range(num_merges):
        pairs: Counter[tuple[int, int]] = Counter()
        for ids, count in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every pre-token is a single token
        best = max(pairs, key=lambda p: (pairs[p], token_bytes[p[0]], token_bytes[p[1]]))
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        merges.append(best)
        merged: Counter[tuple[int, ...]] = Counter()
        for ids, count in words.items():
            merged[tuple(merge_word(list(ids), best, new_id))] += count
        words = merged
    return merges


class Tokenizer:
    """Encode text to ids and back with a learned vocabulary and merge list (CS336's ``Tokenizer``).

    vocab: id -> bytes (all 256 single bytes among them); merges: [(bytes_a, bytes_b), ...] in the order
    they were learned (each a + b is in vocab); special_tokens: strings always encoded as one token (added to
    vocab if missing). The same ids as the fast :class:`scratchlm.tokenizer.Tokenizer`'s
    ``encode(text, allowed_special="all")`` (tests/reference).
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
        pattern: str = GPT2_PATTERN,
    ):
        self.vocab = dict(vocab)
        for token in special_tokens or []:
            if token.encode("utf-8") not in self.vocab.values():
                self.vocab[len(self.vocab)] = token.encode("utf-8")
        self.id_of = {b: i for i, b in self.vocab.items()}  # bytes -> id
        self.rank = {pair: r for r, pair in enumerate(merges)}  # (bytes, bytes) -> when it was learned
        self.special_tokens = sorted(special_tokens or [], key=len, reverse=True)  # longest first
        self.pattern = regex.compile(pattern)

    @classmethod
    def from_merge_ids(
        cls, merge_ids: list[tuple[int, int]], special_tokens: list[str] | None = None
    ) -> Tokenizer:
        """The layout :func:`train_merges` produces: byte x has id x, merge k id 256 + k, then specials."""
        vocab = {x: bytes([x]) for x in range(256)}
        merges = []
        for k, (a, b) in enumerate(merge_ids):
            merges.append((vocab[a], vocab[b]))
            vocab[256 + k] = vocab[a] + vocab[b]
        return cls(vocab, merges, special_tokens)

    def _merge(self, piece: bytes) -> list[int]:
        """One pre-token: its bytes, merged (learned-first pair, left to right) as long as a merge applies."""
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
            if best not in self.rank:
                break  # no adjacent pair was ever merged
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.id_of[p] for p in parts]

    def _encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for match in self.pattern.finditer(text):
            ids.extend(self._merge(match.group().encode("utf-8")))
        return ids

    def encode(self, text: str) -> list[int]:
        """text -> ids. Special tokens (longest first) become their one id; the text between them is
        pre-tokenized and merged."""
        if not self.special_tokens:
            return self._encode_ordinary(text)
        splitter = "(" + "|".join(regex.escape(s) for s in self.special_tokens) + ")"
        ids = []
        for i, chunk in enumerate(regex.split(splitter, text)):
            if i % 2:  # the captured separators sit at the odd positions
                ids.append(self.id_of[chunk.encode("utf-8")])
            else:
                ids.extend(self._encode_ordinary(chunk))
        return ids

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Ids of each string in turn (e.g. the lines of an open file), lazily, in constant memory.

        Each string is encoded alone, so no pre-token spans two of them: pass lines or documents, not
        arbitrary chunks (a chunk boundary inside a word would split it)."""
        for text in texts:
            yield from self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text: the bytes of each id, concatenated, decoded as UTF-8 (invalid bytes -> U+FFFD)."""
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")
