"""Byte-level BPE training in its simplest correct form (Sennrich et al. 2016; GPT-2's byte-level variant).

The fast trainer (:func:`scratchlm.tokenizer.bpe.learn_merges`) keeps incremental pair counts and a heap;
this one recounts everything at every merge, which is slow (O(merges x corpus)) but fits on one screen.
Both produce the same merges (tests/reference): ties go to the greatest pair of byte strings.

    vocab = the 256 bytes (id = byte value)
    repeat num_merges times:
        count every adjacent pair of ids in every pre-token, weighted by the pre-token's count
        best = the most frequent pair (ties: the greatest (bytes_a, bytes_b))
        give it the next id, and replace each occurrence (left to right) in every pre-token
"""

from __future__ import annotations

from collections import Counter


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
