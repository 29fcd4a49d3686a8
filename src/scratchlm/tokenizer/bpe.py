"""Byte-level BPE training with incremental pair counts.

The vocabulary starts as the 256 single bytes (id = byte value). Each step finds the most frequent adjacent
pair of tokens over all pre-tokens (weighted by how often each pre-token occurs), appends the merged token
with the next id, and rewrites the pre-tokens that contain the pair. Ties go to the lexicographically
greatest pair of byte strings, ``max((bytes_a, bytes_b))`` (the GPT-2 / CS336 convention).
Special tokens get the ids after the merges, so ``id order == merge priority`` (what tiktoken needs).

Why it is fast and small (see docs/tokenizer.md; ``scratchlm.reference.bpe`` is the one-screen version):
- a pre-token is stored once with its count, never per occurrence, as a linked list of token ids in flat
  int32 arrays (``_PairTable``: 16 bytes per byte of the unique pre-tokens, no Python object per word);
- ``where[pair]`` holds the positions where a pair starts, so a merge touches only those;
- pair counts are updated by the difference between the old and new neighbours of each merged position,
  position by position in Python for a small merge, with numpy on all positions at once for a large one;
- the best pair comes from a max-heap with lazy invalidation: an old pair's count can only go down, so a
  popped entry whose count is stale is pushed back with its current count and the next one is tried.
Positions are int32: up to 2 G bytes of *unique* pre-tokens (30 MB of mixed text has 0.8 M).
"""

from __future__ import annotations

import array
import heapq
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from scratchlm.errors import DataError, TokenizerError
from scratchlm.tokenizer.pretokenize import (
    CHUNK_CHARS,
    check_special_tokens,
    iter_file_chunks,
    iter_text_chunks,
    parallel_count,
    release_freed_memory,
    replaced_bytes,
    resolve_pattern,
)
from scratchlm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:  # numpy is imported where it is used: forked pre-tokenizer workers stay small
    import numpy as np

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


def check_training_args(
    vocab_size: int, special_tokens: Sequence[str], option: str = "tokenizer.vocab_size"
) -> None:
    """Raise TokenizerError for a duplicate/empty special token or a vocab_size below 256 + specials;
    ``option`` is the setting the message tells the user to raise (the config key, or a CLI flag)."""
    check_special_tokens(special_tokens)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: it needs 256 byte tokens + {len(special_tokens)} special "
            f"token(s) = {minimum} at least; raise {option}"
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
    return learn_merges_from_arrays(*pretoken_arrays(word_counts), num_merges, progress)


def pretoken_arrays(word_counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data, lengths, freqs)``: the pre-tokens' UTF-8 bytes back to back (uint8, shape (L,)), the byte
    length of each and its count (int64, shape (W,) both). About 1/10 of the dict's memory."""
    import numpy as np

    encoded = [_utf8(w) for w in word_counts]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    freqs = np.fromiter(word_counts.values(), np.int64, len(encoded))
    data = np.frombuffer(b"".join(encoded), np.uint8)
    return data, lengths, freqs


def learn_merges_from_arrays(
    data: np.ndarray, lengths: np.ndarray, freqs: np.ndarray, num_merges: int, progress: bool = False
) -> list[Pair]:
    """:func:`learn_merges` on pre-tokens given as arrays: ``data`` (uint8, shape (L,)) = their UTF-8 bytes
    back to back, ``lengths`` (shape (W,)) = bytes of each pre-token, ``freqs`` (shape (W,)) = its count."""
    table = _PairTable(data, lengths, freqs)
    rev = [_reversed_key(bytes([x])) for x in range(256)]  # of every token id, merged ones appended
    heap = [_heap_entry(c, rev[k >> _SHIFT] + rev[k & _LOW], k) for k, c in table.counts.items()]
    heapq.heapify(heap)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_merges, desc="bpe merges", unit="merge", mininterval=0.5)
    merges: list[Pair] = []
    counts = table.counts
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(merges) < num_merges and heap:
        entry = heappop(heap)
        key = int.from_bytes(entry[-8:], "big")
        count = counts.get(key, 0)
        if count <= 0:  # merged already, or no occurrence left
            continue
        if count != _MAX_COUNT - int.from_bytes(entry[:8], "big"):  # stale: the count went down since
            heappush(heap, _heap_entry(count, entry[8:-8], key))
            continue
        a, b = key >> _SHIFT, key & _LOW
        new = len(rev)
        rev.append(rev[a][:-1] + rev[b])  # = _reversed_key(bytes of a + bytes of b)
        merges.append((a, b))
        # pairs containing the new token are the only ones whose count went up: push them once
        for k, c in table.merge(key, new):
            heappush(heap, _heap_entry(c, rev[k >> _SHIFT] + rev[k & _LOW], k))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return merges


def _heap_entry(count: int, reversed_pair: bytes, key: int) -> bytes:
    """The heap key of a pair as one bytes object: the (min-)heap pops the highest count first, then the
    greatest pair of byte strings. Same order as ``(-count, rev_a, rev_b, key)`` (a reversed key ends in a
    terminator that occurs nowhere else in it, so ``rev_a + rev_b`` compares like the tuple), at half the
    memory and with one memcmp per comparison."""
    return (_MAX_COUNT - count).to_bytes(8, "big") + reversed_pair + key.to_bytes(8, "big")


_MAX_COUNT = (1 << 63) - 1
# the pair (a, b) is the int key a << 32 | b: one Python int per pair, and arrays of keys are plain int64
_SHIFT = 32
_LOW = (1 << _SHIFT) - 1
# a merge at no more than this many positions runs element by element in Python: the array path makes ~70
# numpy calls of ~1.5 us whatever their size, one position costs ~2.5 us in Python (measured: 30 MB of text)
_SMALL = 48


class _PairTable:
    """The unique pre-tokens as linked lists of token ids in flat arrays, with pair counts and a pair index.

    Position ``i`` of the pre-tokens' bytes laid end to end holds ``sym[i]`` (a token id; -1 once merged
    into its left neighbour), ``nxt[i]`` / ``prv[i]`` (the next / previous live position of the same
    pre-token, -1 at its ends) and ``freq[i]`` (how often its pre-token occurs). Merging ``a b`` at ``i``
    sets ``sym[i] = new`` and unlinks the right half, so nothing ever moves. Shapes: (L,), L = total bytes
    of the unique pre-tokens (about 0.8 M for 30 MB of mixed text).

    ``counts[key]`` = Σ freq over the live occurrences of the pair (pairs at 0 are dropped), and
    ``where[key]`` = the ascending positions where it started when it appeared (int32 bytes: 33 bytes of
    overhead per pair, where an array object would take 112). A pair (u, v) only ever
    appears in the merge that creates max(u, v) (a merge writes the new id and links nodes to it), so
    ``where`` is written once per pair; positions that went stale since are skipped when it is merged.
    """

    def __init__(self, data: np.ndarray, lengths: np.ndarray, freqs: np.ndarray) -> None:
        import numpy as np

        keep = lengths >= 2  # a single byte has no pair: it can never be merged
        if not keep.all():
            data = data[np.repeat(keep, lengths)]
            lengths, freqs = lengths[keep], freqs[keep]
        size = len(data)
        ends = np.cumsum(lengths) - 1  # last position of each pre-token
        self.sym = data.astype(np.int32)
        # a count needs int64 only if one pre-token occurs over 2^31 times
        big = len(freqs) and int(freqs.max()) >= 2**31
        self.freq = np.repeat(freqs.astype(np.int64 if big else np.int32), lengths)
        self.nxt = np.arange(1, size + 1, dtype=np.int32)
        self.nxt[ends] = -1
        self.prv = np.arange(-1, size - 1, dtype=np.int32)
        self.prv[ends[:-1] + 1] = -1
        # the same memory read and written as Python ints, for the merges done element by element
        self.views = tuple(memoryview(x) for x in (self.sym, self.nxt, self.prv, self.freq))
        self.counts: dict[int, int] = {}
        self.where: dict[int, bytes] = {}

        starts = np.arange(size, dtype=np.int32)[self.nxt >= 0]  # the positions where a pair starts
        byte_pairs = (data[starts].astype(np.uint16) << 8) | data[starts + 1]  # (a, b) as a * 256 + b
        order = np.argsort(byte_pairs, kind="stable")  # of 16-bit keys: a radix sort
        starts, byte_pairs = starts[order], byte_pairs[order]
        del order
        first = _group_starts(byte_pairs)
        keys = byte_pairs[first].astype(np.int64)
        self._index(((keys >> 8) << _SHIFT) | (keys & 0xFF), first, starts, self.freq[starts])
        release_freed_memory()

    def _index(self, keys: np.ndarray, first: np.ndarray, positions: np.ndarray, weights: np.ndarray) -> list:
        """Record new pairs: ``positions`` / ``weights`` sorted by pair, the pair ``keys[g]`` owning the run
        that starts at ``first[g]``. Returns ``[(key, count), ...]``."""
        import numpy as np

        totals = np.add.reduceat(weights, first, dtype=np.int64).tolist()
        bounds = (first * 4).tolist()
        bounds.append(len(positions) * 4)
        packed = positions.astype(np.int32).tobytes()
        added = list(zip(keys.tolist(), totals))
        for g, (key, total) in enumerate(added):
            self.counts[key] = total
            self.where[key] = packed[bounds[g] : bounds[g + 1]]
        return added

    def _decrease(self, merged: int, lost: Iterable[tuple[int, int]]) -> None:
        """Lower the counts of existing pairs by ``(key, by)`` each, dropping a pair at 0 (the merged pair
        itself is gone already)."""
        counts, where = self.counts, self.where
        for key, by in lost:
            if key == merged:
                continue
            count = counts[key] - by
            if count:
                counts[key] = count
            else:
                del counts[key]
                where.pop(key, None)

    def merge(self, key: int, new: int) -> list[tuple[int, int]]:
        """Replace every occurrence of the pair ``key`` = (a, b) by ``new``, left to right in each pre-token.

        Only the neighbours of a merged occurrence change: ``x a b y`` -> ``x new y`` turns the pairs
        (x, a), (b, y) into (x, new), (new, y), each weighted by the pre-token's count; in a run ``a b a b``
        the middle (b, a) becomes (new, new). Returns the new pairs with their counts.
        """
        import numpy as np

        positions = self.where.pop(key)  # int32 bytes
        del self.counts[key]
        if len(positions) <= 4 * _SMALL:
            return self._merge_few(key, memoryview(positions).cast("i").tolist(), new)
        return self._merge_many(key, np.frombuffer(positions, np.int32), new)

    def _merge_few(self, key: int, positions: list[int], new: int) -> list[tuple[int, int]]:
        """:meth:`merge` one occurrence at a time (positions ascending, so runs merge left to right)."""
        sym, nxt, prv, freq = self.views
        a, b = key >> _SHIFT, key & _LOW
        lost: dict[int, int] = {}
        gained: dict[int, list[int]] = {}  # new pair -> [count, position, position, ...]
        lost_get = lost.get
        for p in positions:
            if sym[p] != a:
                continue  # stale: merged since the pair appeared here
            n = nxt[p]
            if n < 0 or sym[n] != b:
                continue
            f = freq[p]
            y = nxt[n]
            sym[p] = new
            sym[n] = -1
            nxt[p] = y
            if y >= 0:
                prv[y] = p
            x = prv[p]
            if x >= 0:
                left = sym[x]
                if left == new:  # x merged just before: (b, a) -> (new, new)
                    old, pair = (b << _SHIFT) | a, (new << _SHIFT) | new
                else:
                    old, pair = (left << _SHIFT) | a, (left << _SHIFT) | new
                lost[old] = lost_get(old, 0) + f
                _gain(gained, pair, f, x)
            if y >= 0:
                right = sym[y]
                z = nxt[y]
                if right != a or z < 0 or sym[z] != b:  # else y merges next and counts (new, new) itself
                    old = (b << _SHIFT) | right
                    lost[old] = lost_get(old, 0) + f
                    _gain(gained, (new << _SHIFT) | right, f, p)
        self._decrease(key, lost.items())
        counts, where = self.counts, self.where
        added = []
        for pair, (count, *at) in gained.items():
            counts[pair] = count
            where[pair] = array.array("i", at).tobytes()
            added.append((pair, count))
        return added

    def _merge_many(self, key: int, positions: np.ndarray, new: int) -> list[tuple[int, int]]:
        """:meth:`merge` with array operations over all occurrences at once (int32 positions, shape (P,))."""
        import numpy as np

        sym, nxt, prv, freq = self.sym, self.nxt, self.prv, self.freq
        a, b = key >> _SHIFT, key & _LOW
        p = positions[sym[positions] == a]
        n = nxt[p]
        live = n >= 0
        live[live] = sym[n[live]] == b
        p, n = p[live], n[live]
        if a == b and len(p) > 1:  # a run a a a a: occurrences overlap; keep every other one, from the left
            chained = np.zeros(len(p), dtype=bool)
            chained[1:] = prv[p[1:]] == p[:-1]
            if chained.any():
                i = np.arange(len(p))
                run_start = np.maximum.accumulate(np.where(chained, 0, i))
                keep = (i - run_start) % 2 == 0
                p, n = p[keep], n[keep]
        f = freq[p]
        y = nxt[n]
        sym[p] = new
        sym[n] = -1
        nxt[p] = y
        has_y = y >= 0
        y, p_y, f_y = y[has_y], p[has_y], f[has_y]
        prv[y] = p_y
        x = prv[p]  # read after relinking: in a b a b the second occurrence's left is the first's new
        has_x = x >= 0
        x, f_x = x[has_x], f[has_x]
        left = sym[x].astype(np.int64)
        right = sym[y].astype(np.int64)
        alone = right != new  # else y merged too, and its left side counts (new, new)
        right, p_y, f_y = right[alone], p_y[alone], f_y[alone]

        old = np.concatenate(
            (np.where(left == new, (b << _SHIFT) | a, (left << _SHIFT) | a), (b << _SHIFT) | right)
        )
        weights = np.concatenate((f_x, f_y))
        order = np.argsort(old)
        old, lost = old[order], weights[order]
        first = _group_starts(old)
        self._decrease(key, zip(old[first].tolist(), np.add.reduceat(lost, first, dtype=np.int64).tolist()))

        gained = np.concatenate(((left << _SHIFT) | new, (new << _SHIFT) | right))
        order = np.argsort(gained, kind="stable")  # stable: positions stay ascending within a pair
        gained = gained[order]
        first = _group_starts(gained)
        return self._index(gained[first], first, np.concatenate((x, p_y))[order], weights[order])


def _gain(gained: dict[int, list[int]], pair: int, count: int, position: int) -> None:
    entry = gained.get(pair)
    if entry is None:
        gained[pair] = [count, position]
    else:
        entry[0] += count
        entry.append(position)


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Indices where a new value starts in a sorted array (shape (G,), G = distinct values)."""
    import numpy as np

    if not len(sorted_keys):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))


def _build(
    counts: dict[str, int], vocab_size: int, special_tokens: Sequence[str], pat: str, progress: bool
) -> Tokenizer:
    num_merges = vocab_size - 256 - len(special_tokens)
    arrays = pretoken_arrays(counts)
    counts.clear()  # the arrays hold the same in a tenth of the memory
    merges = learn_merges_from_arrays(*arrays, num_merges, progress=progress)
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
