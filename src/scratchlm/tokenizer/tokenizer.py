"""The byte-level BPE tokenizer: encode, decode, special tokens, save/load, tiktoken fast path.

Token ids are dense, ``0 .. vocab_size - 1``:
- non-special ids map to byte strings (``vocab[id] -> bytes``); every single byte has an id;
- each merge ``(left_id, right_id)`` creates the token ``vocab[left] + vocab[right]``; merges are applied by
  priority (their order), and for tokenizers trained here and for GPT-2, a merge's result id grows with its
  priority (``id == rank``): exactly what tiktoken needs for its ``mergeable_ranks``;
- special tokens (``<|endoftext|>``) take the remaining ids and are never produced by merges.

Encoding a text: (1) if special tokens are allowed, cut the text at them (longest first); (2) split each
piece into pre-tokens with the regex; (3) in each pre-token, starting from its UTF-8 bytes, repeatedly merge
the adjacent pair with the highest priority until none applies. With tiktoken installed, steps (2)-(3) run
in tiktoken (Rust) built from our ranks; the pure-Python code below stays the reference and both give the
same ids (tested).

Threads: tiktoken releases the GIL while it encodes, so the fast path spreads work over ``num_threads``
threads (default: the cores this process may use). ``encode_batch`` gives each thread one contiguous group
of texts (cheaper than tiktoken's own batch call, which schedules one future per text), and a long text
(>= ``_PARALLEL_MIN_CHARS``) is cut at safe pre-token boundaries (``pretokenize._safe_cut``, proven for the
gpt2 and gpt4 patterns) into one piece per thread, so the ids are exactly those of a single call.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import regex

from scratchlm.errors import TokenizerError
from scratchlm.tokenizer.pretokenize import (
    PATTERNS,
    _safe_cut,
    available_cores,
    check_special_tokens,
    covering_pattern,
    match_pieces,
    pattern_name,
    resolve_pattern,
    special_splitter,
)

AllowedSpecial = Literal["none", "all"] | set[str] | frozenset[str]

_STREAM_CHARS = 1 << 16  # encode_iterable buffers about this many characters between safe cuts
_PARALLEL_MIN_CHARS = 1 << 18  # a text at least this long is encoded by several threads (fast path)
_BATCH_MIN_TEXTS = 64  # encode_batch uses threads from this many texts on


def _map_threads(fn, items: list, threads: int) -> list:
    """``[fn(x) for x in items]`` on ``threads`` fresh threads (tiktoken releases the GIL while it encodes).

    Fresh threads per call, as tiktoken's own batch API does: measured here, the first threads that ever
    call into a tiktoken encoder stay ~30% slower than threads started later, so a long-lived pool would
    keep its slowest threads forever. Starting two threads costs ~0.1 ms, against >= 30 ms of work.
    """
    with ThreadPoolExecutor(threads, thread_name_prefix="scratchlm-encode") as pool:
        return list(pool.map(fn, items))


def split_at_safe_cuts(text: str, pieces: int) -> list[str]:
    """Cut ``text`` into at most ``pieces`` parts of about equal length, only at ``_safe_cut`` points
    (gpt2/gpt4 pre-token boundaries that do not depend on the text around them), so that encoding the parts
    one by one and concatenating gives exactly the ids of encoding ``text`` whole."""
    parts, lo = [], 0
    for j in range(1, pieces):
        target = len(text) * j // pieces
        if target <= lo:
            continue
        cut = _safe_cut(text[lo:target])
        if cut > 0:
            parts.append(text[lo : lo + cut])
            lo += cut
    parts.append(text[lo:])
    return parts


class Tokenizer:
    """Byte-level BPE tokenizer (see module docstring for the id layout).

    Args:
        vocab: id -> bytes for every non-special token (must include all 256 single bytes).
        merges: ``(left_id, right_id)`` pairs in priority order; each result must be in ``vocab``.
        special_tokens: special string -> id (ids disjoint from ``vocab``; together dense from 0).
        pattern: ``"gpt2"``, ``"gpt4"`` or a pre-tokenizer regex.
        use_tiktoken: encode through tiktoken when it is installed and the ids allow it.
    """

    chat_template: str | None = None  # name of the stored chat template (tokenizer/chat_template.py)

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[int, int]],
        special_tokens: dict[str, int] | None = None,
        pattern: str = "gpt2",
        use_tiktoken: bool = True,
    ):
        special_tokens = dict(special_tokens or {})
        check_special_tokens(special_tokens)
        n = len(vocab) + len(special_tokens)
        ids = set(vocab) | set(special_tokens.values())
        if len(ids) != n or ids != set(range(n)):
            raise TokenizerError(
                f"tokenizer ids must be dense 0..{n - 1} and unique (vocab + special tokens)"
            )
        self._id_to_bytes: list[bytes] = [b""] * n
        for i, t in vocab.items():
            self._id_to_bytes[i] = t
        for s, i in special_tokens.items():
            self._id_to_bytes[i] = s.encode("utf-8")
        self._bytes_to_id = {t: i for i, t in vocab.items()}
        if len(self._bytes_to_id) != len(vocab):
            raise TokenizerError("tokenizer vocabulary has two ids for the same byte string")
        missing = [x for x in range(256) if bytes([x]) not in self._bytes_to_id]
        if missing:
            raise TokenizerError(
                f"tokenizer vocabulary lacks {len(missing)} single-byte tokens (e.g. {missing[0]})"
            )
        self._byte_ids = [self._bytes_to_id[bytes([x])] for x in range(256)]
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        # pair -> (priority, result id)
        self._merge_rank: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            merged = vocab.get(a, b"") + vocab.get(b, b"")
            result = self._bytes_to_id.get(merged) if a in vocab and b in vocab else None
            if result is None:
                raise TokenizerError(f"merge #{rank} ({a}, {b}) does not produce a token of the vocabulary")
            self._merge_rank.setdefault((a, b), (rank, result))
        self._special = special_tokens
        self.pattern = resolve_pattern(pattern)
        self._pat = regex.compile(covering_pattern(self.pattern))  # a custom regex's gaps are pieces too
        self._splitters: dict[frozenset[str], regex.Pattern | None] = {}
        self._cache: dict[str, list[int]] = {}
        self.use_tiktoken = use_tiktoken
        self.num_threads: int | None = None  # fast-path encoding threads; None = available_cores()
        self._tiktoken = None
        self._tiktoken_tried = False
        self._fingerprint: str | None = None
        self.train_info: dict = {}

    @classmethod
    def from_merges(
        cls, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str] = (), pattern: str = "gpt2"
    ) -> Tokenizer:
        """The layout of trained tokenizers: byte ``x`` has id ``x``, merge k has id ``256 + k``, then specials."""
        vocab = {x: bytes([x]) for x in range(256)}
        for k, (a, b) in enumerate(merges):
            vocab[256 + k] = vocab[a] + vocab[b]
        specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
        return cls(vocab, merges, specials, pattern)

    # ---- vocabulary --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids: single bytes + merges + special tokens."""
        return len(self._id_to_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``, else of the first special token."""
        if "<|endoftext|>" in self._special:
            return self._special["<|endoftext|>"]
        if not self._special:
            raise TokenizerError(
                "this tokenizer has no special tokens, so no end-of-text id; retrain with one"
            )
        return next(iter(self._special.values()))

    @property
    def pattern_name(self) -> str:
        return pattern_name(self.pattern)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token's UTF-8 string)."""
        return self._id_to_bytes[token_id]

    def vocab(self) -> dict[int, bytes]:
        """id -> bytes of the non-special tokens."""
        specials = set(self._special.values())
        return {i: t for i, t in enumerate(self._id_to_bytes) if i not in specials}

    # ---- encoding ----------------------------------------------------------------------------------------
    def _allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special == "none":
            return frozenset()
        if allowed_special == "all":
            return frozenset(self._special)
        if isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special={allowed_special!r}: use 'none', 'all' or a set of tokens")
        allowed = frozenset(allowed_special)
        unknown = allowed - set(self._special)
        if unknown:
            raise TokenizerError(f"allowed_special names unknown special token(s) {sorted(unknown)}")
        return allowed

    def _splitter(self, allowed: frozenset[str]) -> regex.Pattern | None:
        if allowed not in self._splitters:
            self._splitters[allowed] = special_splitter(allowed)
        return self._splitters[allowed]

    def encode(self, text: str, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Text -> ids. Special-token strings are ordinary text unless listed in ``allowed_special``
        (``"all"`` or a set); allowed ones are matched longest first. Never raises on any ``str`` (with
        gpt2/gpt4; a custom regex that backtracks catastrophically on it is a TokenizerError)."""
        return self._encode_split(text, self._allowed(allowed_special), self.encode_ordinary)

    def _encode_split(self, text: str, allowed: frozenset[str], ordinary) -> list[int]:
        """Cut ``text`` at the ``allowed`` special tokens and encode the pieces between with ``ordinary``."""
        if not allowed:
            return ordinary(text)
        ids: list[int] = []
        pos = 0
        for m in self._splitter(allowed).finditer(text):
            ids.extend(ordinary(text[pos : m.start()]))
            ids.append(self._special[m.group()])
            pos = m.end()
        ids.extend(ordinary(text[pos:]))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ``text`` with no special-token handling (fast path when available; a long text is
        encoded by several threads, see the module docstring)."""
        enc = self._fast()
        if enc is None:
            return self.encode_reference(text)
        threads = self._threads()
        if threads > 1 and len(text) >= _PARALLEL_MIN_CHARS and self.pattern in PATTERNS.values():
            parts = split_at_safe_cuts(text, threads)
            if len(parts) > 1:
                ids: list[int] = []
                for part_ids in _map_threads(enc.encode_ordinary, parts, threads):
                    ids.extend(part_ids)
                return ids
        return self._native_encode(text)

    def _native_encode(self, text: str) -> list[int]:
        """tiktoken's ``encode_ordinary``, its failures on a custom regex said as one TokenizerError (the
        empty matches that make it panic are refused when the pattern is loaded; this is the net)."""
        try:
            return self._tiktoken.encode_ordinary(text)
        except BaseException as e:  # pyo3's PanicException derives from BaseException, not Exception
            if not isinstance(e, ValueError) and type(e).__name__ != "PanicException":
                raise
            raise TokenizerError(
                f"the pre-tokenizer regex {self.pattern_name[:80]!r} failed on this text "
                f"({str(e).splitlines()[0][:100]}); simplify it (no nested quantifiers such as (a+)+)"
            ) from None

    def encode_batch(self, texts: Sequence[str], allowed_special: AllowedSpecial = "none") -> list[list[int]]:
        """Encode several texts; with the fast path, each thread encodes one contiguous group of them."""
        texts = list(texts)
        threads = self._threads()
        if self._fast() is None or threads == 1 or len(texts) < _BATCH_MIN_TEXTS:
            return [self.encode(t, allowed_special) for t in texts]
        allowed = self._allowed(allowed_special)  # checked here, so a bad value raises in this thread
        n = len(texts)
        groups = [texts[n * j // threads : n * (j + 1) // threads] for j in range(threads)]
        out: list[list[int]] = []
        for group_ids in _map_threads(lambda g: [self._encode_one(t, allowed) for t in g], groups, threads):
            out.extend(group_ids)
        return out

    def _encode_one(self, text: str, allowed: frozenset[str]) -> list[int]:
        """One text of a batch, on the calling (worker) thread: no nested threads."""
        return self._encode_split(text, allowed, self._native_encode)

    def _threads(self) -> int:
        return max(1, self.num_threads if self.num_threads is not None else available_cores())

    def encode_iterable(
        self, iterable: Iterable[str], allowed_special: AllowedSpecial = "none"
    ) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. an open text file, read line by line) with bounded memory.

        The stream is cut only where the gpt2/gpt4 pre-tokenization has a boundary anyway (before an
        allowed special token, or at a safe point, see ``pretokenize._safe_cut``), so the ids equal
        ``encode("".join(iterable))``. Memory stays bounded unless the text has no such point (with a custom
        regex pattern only special tokens are used as cut points).
        """
        allowed = self._allowed(allowed_special)
        splitter = self._splitter(allowed)
        buf = ""
        for piece in iterable:
            buf += piece
            if len(buf) < _STREAM_CHARS:
                continue
            cut = -1
            if splitter is not None:  # cut *before* the last special: it may be the start of a longer one
                for m in splitter.finditer(buf):  # (``<|endoftext|>`` + ``<|endoftext|><|endoftext|>``)
                    cut = m.start()
            # the safe-cut rules are proven for gpt2/gpt4 only, and must not cut a special token
            if self.pattern in PATTERNS.values() and not any(any(c.isspace() for c in t) for t in allowed):
                cut = max(cut, _safe_cut(buf))
            if cut > 0:
                yield from self.encode(buf[:cut], allowed_special)
                buf = buf[cut:]
        if buf:
            yield from self.encode(buf, allowed_special)

    def encode_reference(self, text: str) -> list[int]:
        """The pure-Python encoder (regex pre-tokenization + rank-ordered merges); the reference path."""
        try:
            return self._encode_py(text)
        except UnicodeEncodeError:  # lone surrogates: encode them as U+FFFD, as tiktoken does
            return self._encode_py(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def _encode_py(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in match_pieces(self._pat, text):
            out = cache.get(piece)
            if out is None:
                out = self._bpe(piece.encode("utf-8"))
                if len(cache) < 100_000:
                    cache[piece] = out
            ids.extend(out)
        return ids

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge the bytes of one pre-token: always the adjacent pair of best priority, left to right."""
        ranks = self._merge_rank
        ids = [self._byte_ids[x] for x in piece]
        none = (sys.maxsize, -1)
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, none))
            rank, new = ranks.get(pair, none)
            if new < 0:
                break
            a, b = pair
            out = []
            i = 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    # ---- fast path ---------------------------------------------------------------------------------------
    @property
    def fast(self) -> bool:
        """Whether encoding goes through tiktoken."""
        return self._fast() is not None

    def _fast(self):
        if self._tiktoken_tried or not self.use_tiktoken:
            return self._tiktoken
        self._tiktoken_tried = True
        reason = self._tiktoken_incompatible()
        if reason is None:
            try:
                import tiktoken
            except ImportError:
                reason = "tiktoken is not installed (pip install 'scratchlm[fast]')"
        if reason is not None:
            print(f"scratchlm: tokenizer uses the pure-Python encoder: {reason}", file=sys.stderr)
            return None
        ranks = {t: i for t, i in self._bytes_to_id.items()}
        try:
            self._tiktoken = tiktoken.Encoding(
                name=f"scratchlm-bpe-{len(ranks)}",
                pat_str=covering_pattern(self.pattern),
                mergeable_ranks=ranks,
                special_tokens={},
            )
        except ValueError as e:  # a regex Python's `regex` reads but tiktoken's engine does not ('a(?=a)+')
            reason = f"tiktoken's regex engine rejects the pattern ({str(e).splitlines()[0][:80]})"
            print(f"scratchlm: tokenizer uses the pure-Python encoder: {reason}", file=sys.stderr)
        return self._tiktoken

    def _tiktoken_incompatible(self) -> str | None:
        """tiktoken merges by the rank (= id) of the merged bytes: ids must follow merge priority."""
        results = [r for _, r in self._merge_rank.values()]
        if len(results) != len(self.merges) or len(self._bytes_to_id) != 256 + len(self.merges):
            return "its vocabulary has tokens that no merge creates (or duplicate merges)"
        if any(r2 <= r1 for r1, r2 in zip(results, results[1:])) or min(results, default=256) < max(
            self._byte_ids
        ):
            return "its token ids do not follow merge priority"
        return None

    # ---- decoding ----------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes (may end inside a UTF-8 character; streaming decoders use this)."""
        table = self._id_to_bytes
        try:
            return b"".join([table[i] for i in ids if i >= 0 or _negative(i)])
        except (IndexError, TypeError) as e:
            raise TokenizerError(
                f"cannot decode: token ids must be ints in 0..{self.vocab_size - 1} ({e})"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- files -------------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        from scratchlm.tokenizer.hf_format import to_hf_dict

        return to_hf_dict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` in the Hugging Face tokenizers format (atomically)."""
        write_json_atomic(Path(path), self.to_hf_dict())

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the sha256 of the canonical saved JSON."""
        if self._fingerprint is None:
            self._fingerprint = json_fingerprint(self.to_hf_dict())
        return self._fingerprint

    def __getstate__(self) -> dict:
        """For multiprocessing workers: the tiktoken encoder and the cache are rebuilt lazily there."""
        state = dict(self.__dict__)
        state.update(_tiktoken=None, _tiktoken_tried=False, _cache={})
        return state

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={list(self._special)}, pattern={self.pattern_name!r})"
        )


def _negative(i: int) -> bool:
    raise IndexError(f"negative token id {i}")


def json_fingerprint(obj: dict) -> str:
    """Short sha256 of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    if path.is_dir():
        raise TokenizerError(
            f"{path} is a directory; give a file path for the tokenizer, e.g. {path}/tokenizer.json"
        )
    from scratchlm import fileio

    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))
