"""Pre-tokenization: split text into pre-tokens (the units BPE never merges across) and count them.

Byte-level BPE never merges across a *pre-token* boundary: text is first cut by a regex into words,
numbers, punctuation runs and whitespace runs, and merges happen only inside those pieces. Special tokens
(``<|endoftext|>``) are cut out even before that, so no merge ever crosses them either.

Training only needs ``Counter[pre-token] -> count``; this module computes it in parallel worker processes
over chunks of the input that are cut at document and special-token boundaries, streaming files block
by block, so memory grows with the number of *unique* pre-tokens, not with the corpus size.
The chunks depend only on the input (never on the number of workers), and counting is a sum, so the
result is identical for any ``num_workers``.
"""

from __future__ import annotations

import codecs
import functools
import multiprocessing
import os
import queue
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex

from scratchlm.errors import ConfigError, DataError, TokenizerError

# The GPT-2 pattern (same matches as OpenAI's original
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ ; written with possessive
# quantifiers, which regex engines execute faster). HF's ByteLevel(use_regex=True) uses the original.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# The GPT-4 (cl100k) pattern: case-insensitive contractions, digits in groups of at most 3,
# punctuation keeps its trailing newlines, newlines are split from the following indentation.
# (tiktoken writes \p{N}{1,3}+; the Oniguruma engine of HF tokenizers reads "{1,3}+" as "({1,3})+",
# so we drop that "+", which changes nothing: nothing follows the digits in that alternative.)
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# Counting shortcut: cut text into "units" at points that are always pre-token boundaries, count the units
# with the stdlib `re` (faster than `regex` on this simple pattern), then pre-tokenize each *unique* unit
# once. Boundaries: GPT-2 - every non-space -> space transition (no alternative spans it and matching
# restarts from scratch there); GPT-4 - every non-space -> space transition except into \r or \n
# (punctuation keeps its trailing newlines). `_WS` is exactly regex's \s (Unicode White_Space), which
# differs from re's \s (that one also has U+001C..U+001F).
_WS = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_NWS = "[^" + _WS[1:]
_UNIT_PATTERNS = {
    GPT2_PATTERN: f"{_WS}*{_NWS}+|{_WS}+",
    GPT4_PATTERN: f"{_WS}*{_NWS}+(?:[\r\n]{_WS}*{_NWS}+)*(?:[\r\n]{_WS}*\\Z)?|{_WS}+",
}

CHUNK_CHARS = 1 << 20  # ~1 MB of text per worker task: big enough to amortise IPC, small enough to stream


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one): the default worker count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# bounds on a custom pre-tokenizer regex, checked before it is compiled: the regex engines expand a counted
# repetition into code, so `a{99999999}` takes gigabytes (and `(a{1000}){1000}` a million copies). The
# gpt2 / gpt4 patterns cost 40 units; 10,000 compile in milliseconds.
MAX_PATTERN_CHARS = 10_000
MAX_PATTERN_COST = 10_000
_COUNTED = regex.compile(r"\{(\d*)(?:,(\d*))?\}")


def pattern_cost(pattern: str) -> int:
    """Upper bound of the atoms a regex compiles to: every counted repetition ``{m,n}`` multiplies the cost
    of what it repeats (an atom, a class, a group) by ``max(m, n)``; alternatives add up. ``*``, ``+`` and
    ``?`` do not expand. A scan of the text, no compile: safe on any input (Python ints do not overflow)."""
    stack: list[list[int]] = [[]]  # per open group: the costs of its atoms so far
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":  # an escape is one atom; \p{..}, \N{..}, \x{..} carry braces that are no repetition
            j = i + 2
            if j < n and pattern[j] == "{" and pattern[i + 1] in "pPNxugk":
                end = pattern.find("}", j)
                j = n if end < 0 else end + 1
            stack[-1].append(1)
            i = j
        elif c == "[":  # a character class is one atom (nested sets and escapes inside skipped)
            j, depth = i + 1, 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and depth:
                if pattern[j] == "\\":
                    j += 1
                elif pattern[j] == "[":
                    depth += 1
                elif pattern[j] == "]":
                    depth -= 1
                j += 1
            stack[-1].append(1)
            i = j
        elif c == "(":
            stack.append([])
            i += 1
        elif c == ")":
            inner = stack.pop() if len(stack) > 1 else []
            stack[-1].append(max(sum(inner), 1))
            i += 1
        elif c == "{" and (m := _COUNTED.match(pattern, i)) and (m.group(1) or m.group(2)):
            bound = max(int(m.group(1) or 0), int(m.group(2) or 0))
            if stack[-1]:
                stack[-1][-1] *= max(bound, 1)
            i = m.end()
        else:
            stack[-1].append(1)
            i += 1
    return sum(sum(level) for level in stack)


def check_pattern_size(pattern: str) -> None:
    """ConfigError, before any compile, for a regex too long or expanding to too much code (see above)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(
            f"tokenizer pattern is {len(pattern):,} characters long (at most {MAX_PATTERN_CHARS:,}); a "
            "pre-tokenizer regex splits text into words, numbers and punctuation: keep it short"
        )
    cost = pattern_cost(pattern)
    if cost > MAX_PATTERN_COST:
        raise ConfigError(
            f"tokenizer pattern {pattern[:80]!r} repeats too much ({cost:,} compiled atoms, at most "
            f"{MAX_PATTERN_COST:,}): a counted repetition such as {{99999999}} makes the regex engine build "
            "gigabytes of code; use + or * or a small bound such as {1,3}"
        )


def resolve_pattern(pattern: str) -> str:
    """``"gpt2"`` / ``"gpt4"`` -> the regex; any other string is taken as a regex itself (size-checked with
    :func:`check_pattern_size`, then compiled)."""
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if not isinstance(pattern, str):
        raise ConfigError(f"tokenizer pattern {pattern!r} is not a string (gpt2, gpt4 or a regex)")
    check_pattern_size(pattern)
    try:
        compiled = regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as e:
        raise ConfigError(
            f"tokenizer pattern {pattern[:80]!r} is neither gpt2/gpt4 nor a valid regex ({e})"
        ) from None
    try:
        empty = _empty_match(compiled)
    except TimeoutError:
        raise ConfigError(
            f"tokenizer pattern {pattern[:80]!r} backtracks catastrophically (over 1 s on a short text); "
            "simplify it (no nested quantifiers such as (a+)+)"
        ) from None
    if empty is not None:  # tiktoken's Rust encoder panics on an empty pre-token; HF drops them silently
        raise ConfigError(
            f"tokenizer pattern {pattern[:80]!r} matches the empty string (in {empty!r}); a pre-tokenizer "
            "regex must match at least one character, e.g. write x+ instead of x* and drop bare lookarounds"
        )
    return pattern


# text with every kind of character a pre-tokenizer regex distinguishes, to find empty matches before
# a native library meets them (a regex like "", "a*", "(?=a)" or "\b" matches the empty string)
_PROBE = "Hello, World! it's 12 345\tx\n\n  \r\nÉté ÀB ünï 中文 😀 _-+=()[]{}<>/\\'\"a\u2028 z"


def _empty_match(compiled: regex.Pattern) -> str | None:
    """A probe text (or '') in which ``compiled`` matches the empty string, or None."""
    for text in ("", _PROBE):
        for m in compiled.finditer(text, timeout=1.0):
            if m.start() == m.end():
                return text
    return None


def covering_pattern(pattern: str) -> str:
    """The regex the encoder and the trainer run: every character of the text ends up in one piece.

    gpt2 and gpt4 match every character already. A custom regex (``\\w+``) may not; the text between its
    matches is then a piece of its own, as Hugging Face's ``Split(behavior="Isolated")`` makes it, instead
    of being dropped (which would encode "a b" as "ab"). A regex with a named group, which may not be
    repeated, gets one piece per unmatched character instead.
    """
    if pattern in PATTERNS.values():
        return pattern
    exact = f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"  # a gap: characters where no match starts
    try:
        regex.compile(exact)
        return exact
    except regex.error:
        return f"(?:{pattern})|[\\s\\S]"


def match_pieces(pat: regex.Pattern, text: str) -> list[str]:
    """The whole matches of ``pat`` in ``text`` (``findall`` would return a capturing group's text)."""
    return [m.group() for m in pat.finditer(text)]


def pattern_name(pat: str) -> str:
    """The short name of a known pattern regex, else the regex itself."""
    for name, p in PATTERNS.items():
        if p == pat:
            return name
    return pat


def check_special_tokens(special_tokens: Iterable[str]) -> None:
    """TokenizerError unless the special tokens are distinct non-empty strings (an empty one would match
    between every two characters and be inserted there)."""
    seen: set[str] = set()
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise TokenizerError(f"special token {s!r} must be a non-empty string")
        if s in seen:
            raise TokenizerError(f"special token {s!r} is given twice; list each once")
        seen.add(s)


def special_splitter(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A regex matching any special token, longest first (so ``<|a|><|a|>`` beats ``<|a|>``); None if none."""
    specials = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    if not specials:
        return None
    return regex.compile("|".join(regex.escape(s) for s in specials))


class PretokenCounter:
    """Adds up pre-token counts over texts (each a document); special tokens are dropped, not counted.

    With the gpt2/gpt4 pattern the text is first cut into whitespace-delimited units (see ``_UNIT_PATTERNS``)
    with the stdlib ``re``; the units of each :meth:`add` call are counted, and each *unique* unit is cut
    into pre-tokens once. Most units are cut without the regex, by what both patterns do with them:

    - ``body`` = letters (``str.isalpha`` is exactly ``\\p{L}``, tested), optionally followed by one ASCII
      symbol: the letters are one pre-token (`` ?\\p{L}++``), the symbol another;
    - before the body, spaces (and for gpt2 newlines) W: one space joins the letters (`` ?\\p{L}``); a
      longer W gives ``W[:-1]`` (``\\s+(?!\\S)``), then its last character joins the letters if it is a
      space, else is a pre-token of its own (``\\s``).

    The rest (digits, contractions, other whitespace, ...) go through the regex; tests compare the counts
    with the regex on whole texts. Any other pattern runs on the text directly.
    """

    def __init__(self, pattern: str, special_tokens: Sequence[str]) -> None:
        self.pattern = regex.compile(covering_pattern(pattern))
        self.splitter = special_splitter(special_tokens)
        unit_pattern = _UNIT_PATTERNS.get(pattern)
        self.find_units = re.compile(unit_pattern).findall if unit_pattern else None
        # leading whitespace the shortcut handles: gpt4 keeps newlines apart from what follows them
        self.lead_ws = " \n" if pattern == GPT2_PATTERN else " "
        self.counts: Counter[str] = Counter()

    def add(self, texts: Iterable[str]) -> None:
        """Count the pre-tokens of ``texts``."""
        units: Counter[str] = Counter()
        for text in texts:
            for piece in self.splitter.split(text) if self.splitter is not None else (text,):
                if self.find_units is None:
                    units.update(match_pieces(self.pattern, piece))
                    continue
                for part in _unit_slices(piece):  # the list of units of a slice is small
                    units.update(self.find_units(part))
        if self.find_units is None:
            self.counts.update(units)
            return
        counts = self.counts
        get = counts.get
        findall = self.pattern.findall  # the gpt2/gpt4 patterns have no capturing group
        lead_ws = self.lead_ws
        for unit, n in units.items():
            body = unit.lstrip(lead_ws)
            symbol = None
            if not body.isalpha():
                symbol = body[-1:]
                if not (
                    body[:-1].isalpha() and symbol.isascii() and not symbol.isalnum() and not symbol.isspace()
                ):
                    for pretoken in findall(unit):  # the general case
                        counts[pretoken] = get(pretoken, 0) + n
                    continue
                body = body[:-1]
            lead = len(unit) - len(body) - (symbol is not None)
            if lead:
                if lead > 1:
                    ws = unit[: lead - 1]
                    counts[ws] = get(ws, 0) + n
                if unit[lead - 1] == " ":
                    body = " " + body
                else:
                    ws = unit[lead - 1]
                    counts[ws] = get(ws, 0) + n
            counts[body] = get(body, 0) + n
            if symbol is not None:
                counts[symbol] = get(symbol, 0) + n


def release_freed_memory() -> None:
    """Give memory that was freed back to the OS (glibc only; elsewhere nothing happens).

    Once glibc has freed a large block it raises its mmap threshold, and from then on blocks of a few MB
    (1 MB text chunks, their pickles, numpy temporaries) come from its heap and stay resident after they are
    freed: counting 1 GB of text grew the trainer to ~110 MB and each worker to ~85 MB that way, of which
    ~20 MB are counts. ``malloc_trim`` hands the free pages back (~1 ms; the allocator's settings stay as
    they were). Called after each counted chunk, and after building the pair table (16 MB at 30 MB of text).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, looked up once (it is called after every chunk); None elsewhere."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return None


_SLICE_CHARS = 1 << 16


def _unit_slices(text: str) -> Iterator[str]:
    """``text`` in slices of about 64K characters, cut before a space that follows a non-space: a unit
    boundary in both unit patterns (the non-space ends a unit, the space starts one)."""
    start = 0
    while len(text) - start > _SLICE_CHARS:
        cut = text.find(" ", start + _SLICE_CHARS)
        while cut > 0 and text[cut - 1].isspace():  # isspace is wider than \s: then it is a non-space
            cut = text.find(" ", cut + 1)
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def count_pretokens(texts: Iterable[str], pattern: str, special_tokens: Sequence[str]) -> Counter[str]:
    """Count the pre-tokens of ``texts`` (each a document); special tokens are dropped, not counted."""
    counter = PretokenCounter(pattern, special_tokens)
    counter.add(texts)
    return counter.counts


def _safe_cut(buf: str) -> int:
    """The last position where ``buf`` can be cut without changing its pre-tokenization, or -1.

    For both the GPT-2 and the GPT-4 pattern these are pre-token boundaries whose left side tokenizes
    the same whether the text goes on or ends there, and whose right side starts a fresh match:
    - before a space that follows a non-space (no alternative carries a non-space into a following space);
    - after a newline that follows a non-space and precedes a letter (no alternative joins a newline to a
      following letter).
    ``str.isspace`` is a superset of the patterns' ``\\s``, so testing "not isspace" is conservative.
    """
    cut = -1
    i = len(buf) - 1
    while i > 0:
        i = buf.rfind(" ", 1, i + 1)
        if i > 0 and not buf[i - 1].isspace():
            cut = i
            break
        i -= 1
    i = len(buf) - 2
    while i > max(cut - 1, 0):
        i = buf.rfind("\n", max(cut, 1), i + 1)
        if i <= 0:
            break
        if buf[i + 1].isalpha() and not buf[i - 1].isspace():
            return max(cut, i + 1)
        i -= 1
    return cut


def iter_file_chunks(
    paths: Sequence[Path], special_tokens: Sequence[str], chunk_chars: int = CHUNK_CHARS
) -> Iterator[list[str]]:
    """Stream ``paths`` as lists of independent texts of about ``chunk_chars`` characters.

    Each file is a document. A file larger than ``chunk_chars`` is read in blocks and cut after the last
    special token of a block (or, lacking one, at a safe point, see :func:`_safe_cut`), so a
    multi-GB file is never loaded whole. Undecodable bytes become U+FFFD (counted, see :func:`replaced_bytes`).
    """
    splitter = special_splitter(special_tokens)
    # a safe cut could fall inside a special token that contains whitespace: then cut at specials only
    spaced_special = any(any(c.isspace() for c in s) for s in special_tokens)
    batch: list[str] = []
    size = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="scratchlm_replace", newline="") as f:
            tail = ""
            while True:
                block = f.read(chunk_chars)
                if not block:
                    break
                buf = tail + block
                cut = -1
                if splitter is not None:
                    ends = [m.end() for m in splitter.finditer(buf)]
                    cut = ends[-1] if ends else -1
                if cut < 0 and not spaced_special:
                    cut = _safe_cut(buf)
                if cut < 0:  # no boundary yet: keep reading (a huge special-free, newline-free document)
                    tail = buf
                    continue
                batch.append(buf[:cut])
                size += cut
                tail = buf[cut:]
                if size >= chunk_chars:
                    yield batch
                    batch, size = [], 0
            if tail:
                batch.append(tail)
                size += len(tail)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def iter_text_chunks(texts: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
    """Group an iterable of documents into lists of about ``chunk_chars`` characters."""
    batch: list[str] = []
    size = 0
    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"training texts must be str, got {type(text).__name__}; decode your data first")
        batch.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def parallel_count(
    chunks: Iterable[list[str]],
    pattern: str,
    special_tokens: Sequence[str],
    num_workers: int | None = None,
    start_method: str | None = None,
) -> Counter[str]:
    """Count the pre-tokens of ``chunks`` (lists of documents) on ``num_workers`` cores (None = all).

    This process and ``num_workers - 1`` worker processes each add chunks into their own
    :class:`PretokenCounter`: a chunk goes to the workers' bounded queue while it has room (at most 2 per
    worker wait, so the input is streamed, never held whole) and is counted here when it is full. A worker
    sends its counts through a pipe whenever it holds :data:`_FLUSH_ITEMS` distinct pre-tokens, and once
    at the end; they are added here between chunks. So only this process holds the corpus' counts, and a
    worker a bounded share of them, however many distinct pre-tokens a corpus has. Every process hands its
    freed pages back after each chunk (:func:`release_freed_memory`). One process fewer than cores, since
    this process would otherwise sit idle. ``start_method``: multiprocessing start method (None = the platform
    default; "spawn" works too).
    """
    if num_workers is not None and (type(num_workers) is not int or num_workers < 0):
        raise TokenizerError(
            f"num_workers must be a whole number >= 1 (got {num_workers!r}); None (or 0) uses all cores"
        )
    num_workers = num_workers or available_cores()
    counter = PretokenCounter(pattern, special_tokens)
    if num_workers <= 1:
        for chunk in chunks:
            counter.add(chunk)
        return counter.counts
    ctx = multiprocessing.get_context(start_method)
    tasks = ctx.Queue(maxsize=2 * (num_workers - 1))
    pipes = [ctx.Pipe(duplex=False) for _ in range(num_workers - 1)]  # (receive here, send there)
    workers = [
        ctx.Process(target=_count_worker, args=(tasks, send, pattern, list(special_tokens)), daemon=True)
        for _, send in pipes
    ]
    for w in workers:
        w.start()
    for _, send in pipes:
        send.close()  # the worker holds the only sending end: its death reads as end of file here
    try:
        done = [False] * len(workers)
        for chunk in chunks:
            try:
                tasks.put_nowait(chunk)
            except queue.Full:  # the workers are busy: count this one here
                counter.add(chunk)
                release_freed_memory()
                _check_workers(workers)
                for i, ((receive, _), w) in enumerate(zip(pipes, workers)):  # add what they flushed
                    while not done[i] and receive.poll():
                        done[i] = _receive_message(receive, w, counter.counts)
        while True:  # the input is read: take back what still waits, so no worker is left with a backlog
            try:
                chunk = tasks.get_nowait()
            except queue.Empty:
                break
            counter.add(chunk)
        for _ in workers:
            _put(tasks, None, workers)
        for i, ((receive, _), w) in enumerate(zip(pipes, workers)):
            while not done[i]:
                while not receive.poll(0.5):
                    _check_workers([w])
                done[i] = _receive_message(receive, w, counter.counts)
        for w in workers:
            w.join()
        return counter.counts
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()
                w.join()
        tasks.cancel_join_thread()  # after an error, chunks nobody reads must not block this process's exit


_SEND_ITEMS = 20_000  # (pre-token, count) items per message: neither side ever holds a pickle of the whole
_FLUSH_ITEMS = 250_000  # a worker sends its counts when it holds this many distinct pre-tokens (~30 MB)


def _count_worker(tasks, conn, pattern: str, special_tokens: list[str]) -> None:
    """Worker process: count the chunks of ``tasks`` until None; whenever it holds ``_FLUSH_ITEMS``
    distinct pre-tokens, and at the end, send the counts over ``conn`` as ``("part", items)`` messages
    (and a last ``("done", items)``, or ``("error", message)``) and start afresh. ``send`` blocks while
    the pipe is full, so the counts stream to the parent instead of piling up here."""

    def send(counts: Counter[str], last: bool) -> None:
        batch: list[tuple[str, int]] = []
        for item in counts.items():
            batch.append(item)
            if len(batch) == _SEND_ITEMS:
                conn.send(("part", batch))
                batch = []
        conn.send(("done" if last else "part", batch))

    try:
        counter = PretokenCounter(pattern, special_tokens)
        while (chunk := tasks.get()) is not None:
            counter.add(chunk)
            release_freed_memory()
            if len(counter.counts) >= _FLUSH_ITEMS:
                send(counter.counts, last=False)
                counter.counts = Counter()
        send(counter.counts, last=True)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _check_workers(workers: list) -> None:
    dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
    if dead:
        raise TokenizerError(
            f"a pre-tokenizer worker process died (exit code {dead[0]}; -9 is usually the out-of-memory "
            "killer); retry with fewer workers (num_workers / --workers) or on a machine with more memory"
        )


def _put(tasks, item, workers: list) -> None:
    """Put ``item`` on the bounded task queue, waiting while the workers are busy, never on a dead worker."""
    while True:
        try:
            tasks.put(item, timeout=0.5)
            return
        except queue.Full:
            _check_workers(workers)


def _receive_message(conn, worker, counts: Counter[str]) -> bool:
    """Add one message of a worker's counts into ``counts``; True after its last one. Its exception or
    death is raised here."""
    try:
        status, payload = conn.recv()
    except EOFError:  # it exited without a last message
        worker.join(1.0)
        _check_workers([worker])
        raise TokenizerError("a pre-tokenizer worker process ended without its counts; retry") from None
    if status == "error":
        raise TokenizerError(f"pre-tokenization failed in a worker process: {payload}")
    get = counts.get
    for pretoken, n in payload:
        counts[pretoken] = get(pretoken, 0) + n
    return status == "done"


def _replace_and_count(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: like ``errors="replace"`` (one U+FFFD per bad sequence), counting the bytes."""
    _REPLACED_BYTES[0] += err.end - err.start
    return "\ufffd", err.end


_REPLACED_BYTES = [0]
codecs.register_error("scratchlm_replace", _replace_and_count)


def replaced_bytes() -> int:
    """Undecodable bytes replaced by U+FFFD so far by :func:`iter_file_chunks` in this process."""
    return _REPLACED_BYTES[0]
