"""Continuous batching: one thread decodes every live request together, one token per step.

    batcher = Batcher(model, tokenizer, max_batch=16, max_queue=64)
    ticket = batcher.submit([prompt_ids], SamplingParams(max_new_tokens=32, temperature=0))
    for event in ticket.events(): ...          # TokenEvent per new token, FinishEvent per row
    batcher.close()

Why. A decoder step on a small model costs about the same for 1 row as for 16 (the weights are read once
per step either way), so clients that arrive together should share steps. The server hands every request
to :meth:`Batcher.submit`; a single scheduler thread owns the model and runs this loop (vLLM and TGI's
"continuous batching", Yu et al. 2022, *Orca*):

1. **Admit.** While the batch has room (``max_batch`` rows), waiting requests are taken oldest first and
   their prompts prefilled together, as one left-padded batch into a fresh cache (the ``n`` rows of a
   prompt share its prefill). Their keys and values are then copied into the shared batch cache,
   right-aligned with the other rows:

       batch cache k[layer]: (B, Hkv, max_len, D); row b holds its window in slots [length - w_b, length)
       key mask (B, max_len) bool: True on each row's real slots (left padding False)
       positions (B,) long: w_b, the position of the row's next token

   When a new prompt is longer than the batch's filled length, the old rows are shifted right first.
2. **Sample.** Each row draws its next token from its own logits with its own :class:`SamplingParams`
   and ``torch.Generator`` (seeded per request, so a seeded request gives the same text whoever shares its
   steps), updates its text (incremental UTF-8), checks stop ids, stop strings and ``max_new_tokens``, and
   reports a :class:`TokenEvent` (and a :class:`FinishEvent` when it ends) to its request.
3. **Retire.** Finished rows and rows of cancelled requests (a client that went away) leave the batch
   (``KVCache.reorder``), freeing their slots for the next step's admissions.
4. **Decode.** One forward of the (B, 1) sampled tokens with per-row positions and the key mask. When the
   filled length reaches ``max_len``, the columns that are padding in every row are dropped first
   (compaction); a row never outgrows the window because requests are checked at admission
   (prompt + max_new_tokens <= context_length).

Requests wait in a FIFO of at most ``max_queue`` (then :class:`QueueFullError`: the server's 503). The
model's log-probabilities (log-softmax of the raw logits, before temperature and penalties) of the chosen
token and the ``top_logprobs`` most likely ones are reported when a request asks for them.
"""

from __future__ import annotations

import atexit
import codecs
import dataclasses
import queue
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import GenerationError
from scratchlm.inference.sampling import (
    SEED_LIMIT,
    SamplingParams,
    build_processors,
    find_stop,
    make_generator,
    sample,
    stop_prefix_len,
)

MAX_BATCH = 16  # rows decoded together (scratchlm serve --max-batch)
MAX_QUEUE = 64  # requests waiting for a slot before 503 (scratchlm serve --max-queue)
SHUTTING_DOWN = "the server is shutting down; retry later"


class QueueFullError(Exception):
    """The waiting queue is full: the server answers 503 (retry later)."""


class ShuttingDownError(Exception):
    """The batcher is closing (the server is stopping): the server answers 503 (retry elsewhere or later)."""


@dataclass
class TokenEvent:
    """Row ``row`` sampled a token: ``delta`` is the text that became safe to show (may be "")."""

    row: int
    delta: str
    token_id: int
    logprob: float | None = None  # log p(token) under the model, when asked for
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log p), most likely first


@dataclass
class FinishEvent:
    """Row ``row`` ended: why, its full text and its token count."""

    row: int
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens)
    delta: str  # text held back until now (the tail of a possible stop string that was not one)
    text: str
    new_tokens: int


@dataclass
class ErrorEvent:
    """The request failed inside the scheduler (a bug, or a model that produced NaN): ``message`` is one line."""

    message: str
    client_error: bool  # True: the request's fault (a GenerationError), else the server's
    shutting_down: bool = False  # the batcher closed before the request finished (a 503, not a bug)

    def as_exception(self) -> Exception:
        """What to raise for it: ShuttingDownError (503), GenerationError (the client's: 400) or RuntimeError."""
        if self.shutting_down:
            return ShuttingDownError(self.message)
        return (GenerationError if self.client_error else RuntimeError)(self.message)


class Ticket:
    """A submitted request: its events arrive in order on :meth:`events`; :meth:`cancel` gives its rows up."""

    def __init__(self, n_rows: int, prompt_tokens: list[int]):
        self.n_rows = n_rows
        self.prompt_tokens = prompt_tokens  # tokens per prompt (as fed to the model)
        self.cancelled = threading.Event()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = 0

    def cancel(self) -> None:
        """Stop generating for this request (its rows leave the batch at the next step)."""
        self.cancelled.set()

    def events(self, timeout: float | None = None, poll: float = 0.1, gone=None) -> Iterator:
        """Yield events until every row finished (or an :class:`ErrorEvent`).

        ``gone()`` is polled every ``poll`` seconds while waiting: when it returns True (the client went
        away) the ticket is cancelled and iteration stops. ``timeout`` bounds the total wait (then cancel).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._finished < self.n_rows:
            try:
                event = self._events.get(timeout=poll)
            except queue.Empty:
                if (gone is not None and gone()) or (deadline is not None and time.monotonic() > deadline):
                    self.cancel()
                    return
                continue
            if isinstance(event, FinishEvent):
                self._finished += 1
            yield event
            if isinstance(event, ErrorEvent):
                return

    def _put(self, event) -> None:
        self._events.put(event)


@dataclass
class _Row:
    """One sequence being decoded: its request, options, tokens, text and sampling state."""

    ticket: Ticket
    index: int  # row number within its request
    params: SamplingParams
    top_logprobs: int | None  # None: no log-probabilities
    generator: torch.Generator | None
    processors: list
    counts: torch.Tensor | None  # (1, V) token counts (penalties only)
    stop_ids: set[int]
    window: int = 0  # tokens of this row in the cache
    new_ids: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of text already reported
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )


@dataclass
class _Pending:
    ticket: Ticket
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per row (n rows per prompt, prompt-major)
    top_logprobs: int | None


@dataclass
class BatcherStats:
    """Counters since start: requests and rows served, steps, the widest step, rows cancelled, compactions."""

    requests: int = 0
    rows: int = 0
    steps: int = 0
    max_rows_in_step: int = 0
    cancelled_rows: int = 0
    compactions: int = 0


class Batcher:
    """Continuous batching over one decoder-only model (module docstring). Thread-safe :meth:`submit`."""

    def __init__(
        self, model: torch.nn.Module, tokenizer, *, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE
    ):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length: int = model.config.context_length
        self.vocab_size: int = model.config.vocab_size
        self.eot_id: int | None = getattr(tokenizer, "eot_id", None)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._token_bytes = [tokenizer.decode_bytes([i]) for i in range(tokenizer.vocab_size)]
        self._waiting: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, max_len) bool
        self._logits: torch.Tensor | None = None  # (B, V) float32: each row's next-token logits
        self._thread = threading.Thread(target=self._loop, name="scratchlm-batcher", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ------------------------------------------------------------------------------------------------------
    # public API

    def submit(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        n: int = 1,
        top_logprobs: int | None = None,
    ) -> Ticket:
        """Queue ``n`` completions of each prompt (token ids); rows are numbered prompt-major.

        With a ``seed``, row i gets the generator seed ``(seed + i) mod 2**64``: reproducible, and the n
        samples of one prompt differ. Raises :class:`GenerationError` for a request that can never run
        (empty prompt, prompt + max_new_tokens over the context, more rows than ``max_batch``) and
        :class:`QueueFullError` when ``max_queue`` requests are already waiting.
        """
        prompts = [list(p) for p in prompts]
        rows = len(prompts) * n
        if not prompts or n < 1:
            raise GenerationError("a request needs at least one prompt and n >= 1")
        if rows > self.max_batch:
            raise GenerationError(
                f"{len(prompts)} prompt(s) x n={n} = {rows} completions exceed this server's batch of "
                f"{self.max_batch}; ask for fewer"
            )
        for p in prompts:
            if not p:
                raise GenerationError("a prompt has no tokens")
            if len(p) + params.max_new_tokens > self.context_length:
                raise GenerationError(
                    f"prompt of {len(p)} tokens + max_tokens {params.max_new_tokens} = "
                    f"{len(p) + params.max_new_tokens} exceeds the model's context_length "
                    f"{self.context_length}; shorten the prompt or lower max_tokens"
                )
        outside = [t for t in params.stop_token_ids or [] if not 0 <= t < self.vocab_size]
        if outside:
            raise GenerationError(
                f"stop token id {outside[0]} is not in the vocabulary (0..{self.vocab_size - 1})"
            )
        per_row = []
        for i in range(rows):
            seed = None if params.seed is None else (params.seed + i) % SEED_LIMIT
            per_row.append(dataclasses.replace(params, seed=seed))
        ticket = Ticket(rows, [len(p) for p in prompts])
        with self._cond:
            if self._closed:
                raise ShuttingDownError(SHUTTING_DOWN)
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(
                _Pending(ticket, [p for p in prompts for _ in range(n)], per_row, top_logprobs)
            )
            self._cond.notify()
        return ticket

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        """Rows being decoded now."""
        return len(self._rows)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop the scheduler thread and wait for it (at most ``timeout`` seconds); True once it has ended.

        The step in progress completes (a forward cannot be interrupted), then every request still waiting
        or decoding gets an :class:`ErrorEvent` with ``shutting_down`` set, so no client waits forever. The
        thread must end before the interpreter does: a daemon thread still inside a torch operator at exit
        aborts the process ("terminate called without an active exception"), so batchers not closed by
        their owner are closed by an ``atexit`` hook.
        """
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        _LIVE.discard(self)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------------------------------------------
    # the scheduler loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._rows:
                    self._cond.wait(timeout=1.0)
                if self._closed:
                    tickets = [p.ticket for p in self._waiting] + [r.ticket for r in self._rows]
                    for ticket in {id(t): t for t in tickets}.values():
                        ticket._put(ErrorEvent(SHUTTING_DOWN, client_error=False, shutting_down=True))
                    self._waiting.clear()
                    self._rows, self._cache, self._mask, self._logits = [], None, None, None
                    return
            try:
                self._step()
            except Exception as e:  # a bug or a diverged model: fail the live requests, keep serving
                traceback.print_exc()
                client = isinstance(e, GenerationError)
                message = str(e).splitlines()[0] if client else "internal server error (see the server log)"
                for ticket in {id(r.ticket): r.ticket for r in self._rows}.values():
                    ticket._put(ErrorEvent(message, client_error=client))
                self._rows, self._cache, self._mask, self._logits = [], None, None, None

    @torch.inference_mode()
    def _step(self) -> None:
        self._admit()
        self._retire(cancelled_only=True)
        if not self._rows:
            return
        self.stats.steps += 1
        self.stats.max_rows_in_step = max(self.stats.max_rows_in_step, len(self._rows))
        tokens = []
        for b, r in enumerate(self._rows):
            try:
                tokens.append(self._sample_row(b, r))
            except GenerationError as e:  # this row's logits are not finite: fail its request only
                r.ticket._put(ErrorEvent(str(e).splitlines()[0], client_error=True))
                r.ticket.cancel()
                tokens.append(0)
        keep = self._retire(cancelled_only=False)
        if not self._rows:
            return
        self._decode(torch.tensor([tokens[b] for b in keep], dtype=torch.long, device=self.device)[:, None])

    def _admit(self) -> None:
        """Move waiting requests into the batch while their rows fit (oldest first)."""
        admitted: list[_Pending] = []
        room = self.max_batch - len(self._rows)
        with self._cond:
            while self._waiting:
                pending = self._waiting[0]
                if pending.ticket.cancelled.is_set():
                    self._waiting.popleft()
                    self.stats.cancelled_rows += pending.ticket.n_rows
                    continue
                if pending.ticket.n_rows > room:
                    break
                room -= pending.ticket.n_rows
                admitted.append(self._waiting.popleft())
        if not admitted:
            return
        groups = []  # (request, prompt ids, its row indices): the n rows of one prompt share a prefill
        for pending in admitted:
            self.stats.requests += 1
            self.stats.rows += pending.ticket.n_rows
            start = 0
            while start < len(pending.prompts):
                end = start + 1
                while end < len(pending.prompts) and pending.prompts[end] is pending.prompts[start]:
                    end += 1
                groups.append((pending, pending.prompts[start], range(start, end)))
                start = end
        self._add_rows(groups)

    @torch.inference_mode()
    def _prefill(self, seqs: list[list[int]]):
        """One left-padded forward of ``seqs``: (cache, last logits (G, V) float32, key mask (G, L) bool)."""
        G, L = len(seqs), max(len(q) for q in seqs)
        idx = torch.zeros(G, L, dtype=torch.long)
        mask = torch.zeros(G, L, dtype=torch.bool)
        for g, q in enumerate(seqs):
            idx[g, L - len(q) :] = torch.tensor(q, dtype=torch.long)
            mask[g, L - len(q) :] = True
        idx, mask = idx.to(self.device), mask.to(self.device)
        cache = self.model.make_cache(G, max_len=L)
        if bool(mask.all()):
            logits, _ = self.model(idx, cache=cache)
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (G, L): first real token at 0
            logits, _ = self.model(idx, cache=cache, positions=positions, attention_mask=mask)
        return cache, logits[:, -1].float(), mask

    def _add_rows(self, groups: list[tuple[_Pending, list[int], range]]) -> None:
        """Prefill every group's prompt together and append one batch row per row index (docstring, 1)."""
        fresh, logits, fresh_mask = self._prefill([ids for _, ids, _ in groups])
        expand = torch.tensor(
            [g for g, (_, _, rows) in enumerate(groups) for _ in rows], dtype=torch.long, device=self.device
        )
        n, L = len(expand), fresh_mask.shape[1]
        B, ctx = len(self._rows), self.context_length
        length = self._cache.length if B else 0
        new_len = max(length, L)
        shift = new_len - length  # old rows move right when a new prompt is longer

        def merge(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
            """(B, ..., ctx, ...) old rows shifted right + (n, ..., L, ...) new rows, right-aligned at new_len."""
            out = torch.zeros(
                (B + n, *new.shape[1:-2], ctx, *new.shape[-1:]), dtype=new.dtype, device=new.device
            )
            if B:
                out[:B, ..., shift : shift + length, :] = old[..., :length, :]
            out[B:, ..., new_len - L : new_len, :] = new.index_select(0, expand)
            return out

        if not B:  # an empty (0-row) cache whose tensors the merge replaces
            self._cache, self._mask = self.model.make_cache(0, max_len=ctx), None
        cache = self._cache
        cache.k = [merge(old, new) for old, new in zip(cache.k, fresh.k)]
        cache.v = [merge(old, new) for old, new in zip(cache.v, fresh.v)]
        cache.length = new_len
        self._mask = merge(self._mask[..., None] if B else None, fresh_mask[..., None])[..., 0]
        logits = logits.index_select(0, expand)
        self._logits = torch.cat([self._logits, logits]) if B else logits
        for pending, ids, indices in groups:
            self._new_rows(pending, ids, indices)

    def _new_rows(self, pending: _Pending, ids: list[int], indices: range) -> None:
        """The decoding state of the rows ``indices`` of ``pending`` (prompt ``ids``)."""
        L = len(ids)
        for i in indices:
            params = pending.params[i]
            counts = None
            if params.uses_counts:
                counts = torch.zeros(1, self.vocab_size, device=self.device)
                counts[0].index_add_(
                    0, torch.tensor(ids, device=self.device), torch.ones(L, device=self.device)
                )
            stop_ids = params.stop_token_ids if params.stop_token_ids is not None else [self.eot_id]
            self._rows.append(
                _Row(
                    ticket=pending.ticket,
                    index=i,
                    params=params,
                    top_logprobs=pending.top_logprobs,
                    generator=None if params.greedy else make_generator(params.seed, self.device),
                    processors=build_processors(params),
                    counts=counts,
                    stop_ids={t for t in stop_ids if t is not None},
                    window=L,
                )
            )

    def _sample_row(self, b: int, r: _Row) -> int:
        """Draw row b's next token and report it; marks the row finished when it ends. Returns the token."""
        raw = self._logits[b : b + 1]  # (1, V)
        token = int(sample(raw, r.counts, r.params, r.generator, r.processors)[0])
        logprob = top = None
        if r.top_logprobs is not None:
            lp = torch.log_softmax(raw[0], dim=-1)
            logprob = float(lp[token])
            if r.top_logprobs > 0:
                values, ids = lp.topk(min(r.top_logprobs, self.vocab_size))
                top = list(zip(ids.tolist(), values.tolist()))
        if r.counts is not None:
            r.counts[0, token] += 1
        if token in r.stop_ids:  # not part of the output: no TokenEvent for it
            self._finish(r, "stop", None, logprob, top)
            return token
        r.new_ids.append(token)
        old_len = len(r.text)
        r.text += r.decoder.decode(self._token_bytes[token] if token < len(self._token_bytes) else b"")
        stops = r.params.stop
        if stops:
            longest = max(len(s) for s in stops)
            cut = find_stop(r.text, stops, start=old_len - longest + 1)
            if cut is not None:
                r.text = r.text[:cut]
                self._finish(r, "stop", token, logprob, top, flush=False)
                return token
        if len(r.new_ids) >= r.params.max_new_tokens:
            self._finish(r, "length", token, logprob, top)
            return token
        safe = len(r.text) - stop_prefix_len(r.text, stops)
        delta = r.text[r.shown : safe] if safe > r.shown else ""
        r.shown = max(r.shown, safe)
        r.ticket._put(TokenEvent(r.index, delta, token, logprob, top))
        return token

    def _finish(self, r: _Row, reason: str, token: int | None, logprob, top, flush: bool = True) -> None:
        if flush:
            r.text += r.decoder.decode(b"", final=True)
        if token is not None:
            r.ticket._put(TokenEvent(r.index, "", token, logprob, top))
        r.ticket._put(FinishEvent(r.index, reason, r.text[r.shown :], r.text, len(r.new_ids)))
        r.shown = len(r.text)
        r.index = -1 - r.index  # finished marker (negative), the event above carries the real index

    def _retire(self, cancelled_only: bool) -> list[int]:
        """Drop finished rows (and rows of cancelled requests) from the batch; return the kept indices."""
        keep = []
        for b, r in enumerate(self._rows):
            if r.ticket.cancelled.is_set():
                self.stats.cancelled_rows += 1
            elif cancelled_only or r.index >= 0:
                keep.append(b)
        if len(keep) == len(self._rows):
            return keep
        self._rows = [self._rows[b] for b in keep]
        if not keep:
            self._cache, self._mask, self._logits = None, None, None
            return keep
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.reorder(index)
        self._mask = self._mask.index_select(0, index)
        self._logits = self._logits.index_select(0, index)
        return keep

    def _decode(self, idx: torch.Tensor) -> None:
        """One forward of the (B, 1) new tokens at each row's own position (module docstring, 4)."""
        cache = self._cache
        if cache.length >= cache.max_len:
            self._compact()
        length = cache.length
        self._mask[:, length] = True
        positions = torch.tensor([[r.window] for r in self._rows], dtype=torch.long, device=self.device)
        if bool(self._mask[:, :length].all()):  # no padding anywhere: the plain causal path
            logits, _ = self.model(idx, cache=cache, positions=positions)
        else:
            logits, _ = self.model(
                idx, cache=cache, positions=positions, attention_mask=self._mask[:, : length + 1]
            )
        for r in self._rows:
            r.window += 1
        self._logits = logits[:, -1].float()

    def _compact(self) -> None:
        """Drop the leading columns that are padding in every row (the cache is full)."""
        cache = self._cache
        drop = cache.length - max(r.window for r in self._rows)
        if drop <= 0:
            raise RuntimeError("batch cache full although every row fits its window (a scheduler bug)")
        cache.k = [torch.nn.functional.pad(k[:, :, drop:], (0, 0, 0, drop)) for k in cache.k]
        cache.v = [torch.nn.functional.pad(v[:, :, drop:], (0, 0, 0, drop)) for v in cache.v]
        cache.length -= drop
        self.stats.compactions += 1
        self._mask = torch.nn.functional.pad(self._mask[:, drop:], (0, drop), value=False)


_LIVE: weakref.WeakSet[Batcher] = weakref.WeakSet()  # batchers not closed yet


@atexit.register
def _close_live_batchers() -> None:
    """At interpreter exit (before daemon threads are stopped): close every batcher still running."""
    for batcher in list(_LIVE):
        batcher.close(timeout=10.0)
