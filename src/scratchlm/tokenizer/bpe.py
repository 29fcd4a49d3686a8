"""Byte-level BPE training with incremental pair counts.

The vocabulary starts as the 256 single bytes (id = byte value). Each step finds the most frequent adjacent
pair of tokens over all pre-tokens (weighted by how often each pre-token occurs), appends the merged token
with the next id, and rewrites the pre-tokens that contain the pair. Ties go to the lexicographically
greatest pair of byte strings, ``max((bytes_a, bytes_b))`` (the GPT-2 / CS336 convention).
Special tokens get the ids after the merges, so ``id order == merge priority`` (what tiktoken needs).

Why it is fast (see docs/tokenizer.md):
- a pre-token is stored once with its count (``words[i]`` = list of ids, ``freqs[i]``), never per occurrence;
- ``where[pair]`` indexes the words that contain a pair, so a merge touches only those words;
- pair counts are updated by the difference between a word's old and new pairs;
- the best pair comes from a max-heap with lazy invalidation: an old pair's count can only go down, so a
  popped entry whose count is stale is pushed back with its current count and the next one is tried.
"""

from __future__ import annotations

import heapq
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from scratchlm.errors import DataError, TokenizerError
from scratchlm.tokenizer.pretokenize import (
    CHUNK_CHARS,
    check_special_tokens,
    iter_file_chunks,
    iter_text_chunks,
    parallel_count,
    replaced_bytes,
    resolve_pattern,
)
from scratchlm.tokenizer.tokenizer import Tokenizer

Pair = tuple[int, int]

# heap tie-break key: reverses byte-string order (a min-heap then pops the greatest pair first).
# byte x -> (1, 255 - x); the terminator 2 sorts after every byte, so a prefix sorts after its extensions.
_REVERSED_BYTE = [bytes((1, 255 - x)) for x in range(256)]


def _reversed_key(token: bytes) -> bytes:
    return b"".join(_REVERSED_BYTE[x] for x in token) + b"\x02"


def _utf8(text: str) -> bytes:
    """UTF-8 bytes; lone surrogates (possible in str from an iterator) become U+FFFD, as when encoding."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _with_progress(chunks: Iterable[list[str]], total: int | None, enabled: bool) -> Iterator[list[str]]:
    """Pass chunks through, advancing a progress bar by their characters (about bytes)."""
    if not enabled:
        yield from chunks
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="pre-tokenize", unit="B", unit_scale=True, mininterval=0.5) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(sum(len(t) for t in chunk))


def check_training_args(vocab_size: int, special_tokens: Sequence[str]) -> None:
    """Raise TokenizerError for a duplicate/empty special token or a vocab_size below 256 + specials."""
    check_special_tokens(special_tokens)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + {len(special_tokens)} special "
            f"token(s) = {minimum} at least; raise tokenizer.vocab_size"
        )


def learn_merges(word_counts: dict[str, int], num_merges: int, progress: bool = False) -> list[Pair]:
    """Learn up to ``num_merges`` merges from pre-token counts; merge k creates token id ``256 + k``.

    Args:
        word_counts: pre-token (str) -> number of occurrences in the corpus.
        num_merges: how many merges to learn (fewer when no pair is left).
        progress: show a tqdm progress bar.
    Returns:
        ``[(left_id, right_id), ...]`` in merge order.
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for word, count in word_counts.items():
        ids = list(_utf8(word))
        if len(ids) >= 2:  # a single byte has no pair: it can never be merged
            words.append(ids)
            freqs.append(count)

    pair_counts: dict[Pair, int] = defaultdict(int)
    where: dict[Pair, set[int]] = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_counts[p] += f
            where[p].add(i)

    token_bytes = [bytes([x]) for x in range(256)]
    rev = [_reversed_key(t) for t in token_bytes]
    heap = [(-c, rev[a], rev[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_merges, desc="bpe merges", unit="merge", mininterval=0.5)
    merges: list[Pair] = []
    while len(merges) < num_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        pair = (a, b)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if count != -neg:  # stale: the count went down since this entry was pushed
            heapq.heappush(heap, (-count, rev[a], rev[b], a, b))
            continue

        new = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        rev.append(_reversed_key(token_bytes[new]))
        merges.append(pair)
        # pairs containing the new token are the only ones whose count went up: push them once
        for p in _apply_merge(pair, new, words, freqs, pair_counts, where):
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, rev[p[0]], rev[p[1]], p[0], p[1]))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return merges


def _apply_merge(
    pair: Pair,
    new: int,
    words: list[list[int]],
    freqs: list[int],
    pair_counts: dict[Pair, int],
    where: dict[Pair, set[int]],
) -> list[Pair]:
    """Replace ``pair`` = (a, b) by ``new`` (left to right, non-overlapping) in every word containing it.

    Only the neighbours of each merged occurrence change: ``x a b y`` -> ``x new y`` turns the pairs
    (x, a), (b, y) into (x, new), (new, y), each weighted by the word's count. In a run ``a b a b`` the
    middle pair (b, a) becomes (new, new). Returns the pairs that contain ``new`` (sorted, so the heap
    and therefore the merges are deterministic).
    """
    a, b = pair
    same = 1 + (a == b)  # how many `a`s one merged occurrence consumes
    # pairs containing `new` cannot be in `where` yet: index them here, add them to `where` at the end
    new_where: dict[Pair, set[int]] = defaultdict(set)
    for i in where.pop(pair, ()):
        w = words[i]
        left_a = w.count(a)  # `a`s not yet looked at: bounds the index() loop without exceptions
        n = len(w)
        out: list[int] = []
        merged: list[int] = []  # positions of `new` in out
        j = 0
        while left_a:  # find occurrences with list.index (C speed), copy the stretches in between
            k = w.index(a, j)
            if k + 1 < n and w[k + 1] == b:
                out.extend(w[j:k])
                merged.append(len(out))
                out.append(new)
                j = k + 2
                left_a -= same
            else:
                out.extend(w[j : k + 1])
                j = k + 1
                left_a -= 1
        if not merged:  # stale index entry: the word lost the pair in an earlier merge
            continue
        out.extend(w[j:])
        f = freqs[i]
        m = len(out)
        for q in merged:
            if q > 0:
                left = out[q - 1]
                old = (b, a) if left == new else (left, a)
                pair_counts[old] -= f
                p = (left, new)
                pair_counts[p] += f
                new_where[p].add(i)
            if q + 1 < m and out[q + 1] != new:
                right = out[q + 1]
                pair_counts[(b, right)] -= f
                p = (new, right)
                pair_counts[p] += f
                new_where[p].add(i)
        words[i] = out
    pair_counts.pop(pair, None)
    where.update(new_where)
    return sorted(new_where)


def _build(
    counts: dict[str, int], vocab_size: int, special_tokens: Sequence[str], pat: str, progress: bool
) -> Tokenizer:
    num_merges = vocab_size - 256 - len(special_tokens)
    merges = learn_merges(counts, num_merges, progress=progress)
    if len(merges) < num_merges:  # every pre-token is a single token already: nothing left to merge
        print(
            f"scratchlm: the training text allows only {len(merges)} merges, so vocab_size is "
            f"{256 + len(merges) + len(special_tokens)} instead of {vocab_size}",
            file=sys.stderr,
        )
    return Tokenizer.from_merges(merges, special_tokens=list(special_tokens), pattern=pat)


def _collect_files(files: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (sorted, recursive, regular files) and check every input exists and is non-empty."""
    if not files:
        raise DataError("no training input given; pass at least one file or directory")
    paths: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not found:
                raise DataError(f"training input directory {p} contains no files; add text files to it")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"training input {p} does not exist; check the path")
    if sum(p.stat().st_size for p in paths) == 0:
        raise DataError(f"training input is empty ({len(paths)} file(s), 0 bytes); give it some text")
    return paths


def train_bpe(
    files: Sequence[str | os.PathLike],
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    pattern: str = "gpt2",
    num_workers: int | None = None,
    progress: bool = True,
    chunk_chars: int = CHUNK_CHARS,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``files`` (each file is a document; directories are expanded).

    Files are streamed in chunks of about ``chunk_chars`` characters (cut at special tokens or file ends)
    to ``num_workers`` pre-tokenizer processes (None = all cores);
    undecodable bytes become U+FFFD (the count is reported in ``tokenizer.train_info``).
    ``vocab_size`` = 256 bytes + merges + ``len(special_tokens)``. The result does not depend on
    ``num_workers``.
    """
    special_tokens = list(special_tokens)
    check_training_args(vocab_size, special_tokens)
    pat = resolve_pattern(pattern)
    paths = _collect_files(files)
    before = replaced_bytes()
    chunks = _with_progress(
        iter_file_chunks(paths, special_tokens, chunk_chars), sum(p.stat().st_size for p in paths), progress
    )
    counts = parallel_count(chunks, pat, special_tokens, num_workers)
    if not counts:
        raise DataError(f"training input ({len(paths)} file(s)) has no text besides special tokens")
    tok = _build(counts, vocab_size, special_tokens, pat, progress)
    tok.train_info = {"files": len(paths), "replaced_bytes": replaced_bytes() - before}
    return tok


def train_bpe_from_iterator(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    pattern: str = "gpt2",
    num_workers: int | None = None,
    progress: bool = True,
) -> Tokenizer:
    """Like :func:`train_bpe`, with documents given as strings (e.g. ``source.documents()``)."""
    special_tokens = list(special_tokens)
    check_training_args(vocab_size, special_tokens)
    pat = resolve_pattern(pattern)
    counts = parallel_count(
        _with_progress(iter_text_chunks(texts), None, progress), pat, special_tokens, num_workers
    )
    if not counts:
        raise DataError("training texts are empty (or only special tokens); give the tokenizer some text")
    return _build(counts, vocab_size, special_tokens, pat, progress)


def train_bpe_on_source(
    source,
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    pattern: str = "gpt2",
    num_workers: int | None = None,
    progress: bool = True,
) -> Tokenizer:
    """Train on a text source of ``corpus.resolve_source``: the documents that ``prepare`` and streaming read.

    The source decides what a document is (one per text file, the ``text_field`` of each jsonl / jsonl.gz
    record, each parquet row), so a tokenizer never learns merges of JSON syntax or compressed bytes. Plain
    text files take the faster path of :func:`train_bpe` (read in chunks, undecodable bytes counted).
    """
    from scratchlm.corpus import FileSource, check_text_files

    if isinstance(source, FileSource):  # whole text files (TextFileSource refuses binary ones)
        check_text_files(source)
        return train_bpe(source.paths, vocab_size, special_tokens, pattern, num_workers, progress)
    return train_bpe_from_iterator(
        source.documents(), vocab_size, special_tokens, pattern, num_workers, progress
    )
