"""StreamLoader: batches tokenized on the fly from streamed sources, with mixtures, fallback and exact resume.

The sharded path (data/prepare.py + data/loader.py) encodes the whole corpus before training; a streamed
source is read and encoded while the model trains, so a 1 GB jsonl or a hub dataset that never fits on disk
starts training in seconds::

    reader (data/stream_readers.py) -> W worker processes: encode_batch + EOT, chunks of ~64K characters
        --(bounded queues: memory stays flat)--> main process: records in order -> per-source token buffer
        --(rows of T+1 tokens, stride T: packing as the sharded path)--> mixture draw per row -> (x, y)

* **Packing.** Each source is the concatenation of its documents, each followed by the end-of-text token
  (whitespace-only documents are skipped), exactly as ``prepare`` writes a shard. Rows are windows
  ``stream[p : p + T + 1]`` with ``p = 0, T, 2T, ...``: ``x = w[:-1]``, ``y = w[1:]`` (B, T) int64, the
  windows of the sequential sharded loader. At the end of a source the next epoch starts over (no tokens are
  dropped at the seam).
* **Workers.** Record ``i`` of a source is encoded by worker ``i % W`` (each worker reads the source and
  parses only its own records); the main process takes records in index order, so the token stream does not
  depend on W (``data.stream_workers``; 0 = read and encode in the training process).
* **Mixture.** ``data.mixture = ["0.7:SPEC", "0.3:SPEC"]``: every row comes from one source, drawn with
  probability = its weight by a seeded generator (``numpy`` PCG64 from ``[seed, rank]``), so the token shares
  match the weights (standard deviation ``sqrt(w (1 - w) / rows)``: 0.6% at 7,800 rows of 128 tokens).
* **Fallback.** ``data.fallback = [SPEC, ...]``: when the source (or a part of the mixture) cannot be opened
  (missing files, an unreachable hub with no cached copy), the next one is used, with one line naming why.
* **Exact resume.** :meth:`StreamLoader.state_dict` is, per source, the position of the record the next row
  starts in (file / byte offset / row / record count, see stream_readers), the token offset in it and the
  epoch, plus the mixture generator's state and which fallback is in use. Restoring it restarts the readers
  at that record and re-encodes it: a resumed run reads exactly the tokens an unbroken run reads.
* **Ranks.** Each rank reads its own records (disjoint, see stream_readers) and has its own generator and
  state; the trainer saves every rank's state.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import sys
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.config import MAX_STREAM_WORKERS
from scratchlm.data.stream_worker import (
    InlineProducer,
    Item,
    ProcessProducer,
    load_tokenizer_spec,
    produce,
    tokenizer_spec,
)
from scratchlm.errors import ConfigError, DataError

STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# specs: mixture, fallback


@dataclass
class Candidate:
    """One way to get the training stream: parts ``(weight, source spec)`` (one part = a single source)."""

    label: str
    parts: list[tuple[float, list[str]]]


def parse_mixture(entries: list[str]) -> list[tuple[float, list[str]]]:
    """``["0.7:a.jsonl", "0.3:hf:allenai/c4:train:en"]`` -> ``[(0.7, ["a.jsonl"]), (0.3, [...])]``, normalised.

    ConfigError for a missing or non-positive weight.
    """
    parts = []
    for entry in entries:
        weight, sep, spec = entry.partition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not sep or not spec or not w > 0 or not np.isfinite(w):
            raise ConfigError(
                f"data.mixture entry '{entry}' must be WEIGHT:SOURCE with a positive weight "
                f"(e.g. data.mixture=0.7:hf:allenai/c4,0.3:code/*.jsonl)"
            )
        parts.append((w, [spec]))
    total = sum(w for w, _ in parts)
    return [(w / total, spec) for w, spec in parts]


def candidates(data_cfg: Any) -> list[Candidate]:
    """The streams to try in order: the mixture (or ``data.source``), then each ``data.fallback`` source."""
    if data_cfg.mixture:
        out = [Candidate("mixture " + ", ".join(data_cfg.mixture), parse_mixture(data_cfg.mixture))]
    else:
        src = list(data_cfg.source) or ["builtin"]
        out = [Candidate(" + ".join(src), [(1.0, src)])]
    return out + [Candidate(spec, [(1.0, [spec])]) for spec in data_cfg.fallback]


TOKENIZER_SAMPLE_CHARS = 20_000_000  # characters of the stream a tokenizer is trained on (when none is given)


class TokenizerSample:
    """The head of the stream as a text source, for training a tokenizer when ``tokenizer.path`` is unset.

    The first :data:`TOKENIZER_SAMPLE_CHARS` characters (each mixture part contributes its weight's share)
    of the first candidate that opens (``data.fallback`` applies). Fingerprint: every candidate's sources.
    """

    def __init__(self, data_cfg: Any, limit: int = TOKENIZER_SAMPLE_CHARS):
        self.cands, self.text_field, self.limit = candidates(data_cfg), data_cfg.text_field, limit
        self.description = f"the first {limit / 1e6:g}M characters of {self.cands[0].label}"

    @property
    def fingerprint(self) -> str:
        import hashlib

        from scratchlm.corpus import resolve_source

        keys = [str(self.limit)]
        for cand in self.cands:
            for w, spec in cand.parts:
                try:
                    keys.append(f"{w}:{resolve_source(spec, self.text_field).fingerprint}")
                except DataError:
                    keys.append(f"{w}:{spec}:missing")
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    def documents(self) -> Iterator[str]:
        from scratchlm.corpus import resolve_source

        for c, cand in enumerate(self.cands):
            try:
                its = [(w, iter(resolve_source(spec, self.text_field).documents())) for w, spec in cand.parts]
                heads = [(w, next(it, None), it) for w, it in its]  # opens every part (hub probe, files)
            except DataError as e:
                if c + 1 == len(self.cands):
                    raise
                print(
                    f"note: data source {cand.label} is unavailable ({e}); using the fallback "
                    f"{self.cands[c + 1].label}",
                    file=sys.stderr,
                )
                continue
            for w, head, it in heads:
                budget = int(w * self.limit)
                doc = head
                while doc is not None and budget > 0:
                    yield doc
                    budget -= len(doc)
                    doc = next(it, None)
            return


# ----------------------------------------------------------------------------------------------------------
# one source: records in order -> a token buffer -> rows


class SourceStream:
    """The packed token stream of one source for one rank; rows of ``T + 1`` tokens with stride ``T``."""

    def __init__(self, source: Any, tok_spec: tuple, rank: int, world_size: int, workers: int):
        self.source, self.tok_spec = source, tok_spec
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.producers: list[Any] = []
        self.fingerprint = source.fingerprint

    def launch(self, state: dict[str, Any] | None = None) -> None:
        """(Re)start the producers at ``state`` (None = the beginning); the caller then takes the first record."""
        self.close()
        state = state or {"epoch": 0, "pos": None, "idx": 0, "offset": 0}
        self.epoch, self.next_idx = int(state["epoch"]), int(state["idx"])
        self.offset = int(state["offset"])  # token offset of the next row in docs[0]
        self.docs: collections.deque[Item] = collections.deque()
        self.pending = [collections.deque() for _ in range(max(self.workers, 1))]
        self.epoch_tokens = 1 if self.next_idx else 0  # a resumed epoch had records before
        start = {"epoch": self.epoch, "pos": state["pos"], "idx": self.next_idx}
        n = max(self.workers, 1)
        if self.workers == 0:
            tok = self.tok_spec[1] if self.tok_spec[0] == "object" else load_tokenizer_spec(self.tok_spec)
            self.producers = [
                InlineProducer(produce(self.source, tok, start, self.rank, self.world_size, 0, 1))
            ]
        else:
            ctx = mp.get_context("spawn")
            for j in range(n):  # appended one by one: a failed start closes those already running
                args = (self.source, self.tok_spec, start, self.rank, self.world_size, j, n)
                self.producers.append(ProcessProducer(ctx, args))

    def _item(self, j: int) -> Any:
        if not self.pending[j]:
            try:
                chunk = self.producers[j].get()
            except DataError as e:  # the worker died: say which source it was reading
                raise DataError(f"data source '{self.source.description}': {e}") from None
            if chunk and chunk[0][0] == "error":
                raise DataError(chunk[0][1])
            self.pending[j].extend(chunk)
        return self.pending[j].popleft()

    def _next_doc(self) -> Item:
        """The next non-empty record of this rank, in index order (epochs wrap around)."""
        n = len(self.producers)
        while True:
            item = self._item(self.next_idx % n)
            if item[0] == "end":
                for j in range(n):  # every producer ends the epoch after its last record
                    if j != self.next_idx % n:
                        self._item(j)
                if self.epoch_tokens == 0:
                    raise DataError(
                        f"data source '{self.source.description}' has no non-empty records"
                        + (f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else "")
                        + "; check the path, the text field, or use fewer ranks"
                    )
                self.epoch, self.next_idx, self.epoch_tokens = self.epoch + 1, 0, 0
                continue
            self.next_idx += 1
            if len(item[3]):
                self.epoch_tokens += len(item[3])
                return item

    def row(self, T: int, out: np.ndarray) -> None:
        """Fill ``out`` (T + 1,) with the next window and advance the stream by T tokens."""
        filled, d, off = 0, 0, self.offset
        while filled < T + 1:
            if d == len(self.docs):
                self.docs.append(self._next_doc())
            ids = self.docs[d][3]
            n = min(len(ids) - off, T + 1 - filled)
            out[filled : filled + n] = ids[off : off + n]
            filled, d, off = filled + n, d + 1, 0
        self.offset += T
        while self.offset >= len(self.docs[0][3]):
            self.offset -= len(self.docs[0][3])
            self.docs.popleft()
            if not self.docs:
                self.docs.append(self._next_doc())

    def state(self) -> dict[str, Any]:
        """Where the next row starts: the record holding it (position, index, epoch) and the token offset."""
        pos, idx, epoch, _ = self.docs[0]
        return {"epoch": epoch, "pos": pos, "idx": idx, "offset": self.offset}

    def close(self) -> None:
        for p in self.producers:
            p.close()
        self.producers = []


# ----------------------------------------------------------------------------------------------------------


class StreamLoader:
    """(x, y) batches from streamed sources; the interface of :class:`~scratchlm.data.loader.TokenLoader`.

    ``cands``: the mixture or source, then the fallbacks (:func:`candidates`); the first that opens is used.
    ``workers``: processes per source (0 = in this process). ``vocab_size``: the model's embedding rows.
    """

    def __init__(
        self,
        cands: list[Candidate],
        tokenizer: Any,
        batch_size: int,
        context_length: int,
        *,
        text_field: str = "text",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 1,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
        verbose: bool = True,
    ):
        if batch_size <= 0 or context_length <= 0:
            raise DataError(
                f"batch_size and context_length must be positive, got {batch_size}, {context_length}"
            )
        if not 0 <= workers <= MAX_STREAM_WORKERS:
            raise ConfigError(
                f"data.stream_workers must be in [0, {MAX_STREAM_WORKERS}], got {workers}; one or two per "
                "source keep a GPU fed (each is a process with its own queue)"
            )
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise DataError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                f"{vocab_size} rows; leave model.vocab_size at 0 to take it from the tokenizer"
            )
        self.cands, self.text_field = cands, text_field
        self.B, self.T = batch_size, context_length
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.device, self.verbose = torch.device(device), verbose and rank == 0
        self.tokenizer_fingerprint = tokenizer.fingerprint
        self._tmp = tempfile.TemporaryDirectory(prefix="scratchlm-stream-")
        # workers re-load the tokenizer from a file; in this process it is used as it is
        self.tok_spec = tokenizer_spec(tokenizer, Path(self._tmp.name)) if workers else ("object", tokenizer)
        self.streams: list[SourceStream] = []
        self._finalizer = weakref.finalize(self, _close_all, self.streams, self._tmp)
        self.candidate = self._open_first()
        self.step = 0

    # -- opening -----------------------------------------------------------------------------------------

    def _open(self, c: int, states: list[dict] | None = None) -> None:
        """Open candidate ``c`` (at ``states``); DataError naming what failed, with nothing left running."""
        from scratchlm.corpus import resolve_source

        _close_all(self.streams)
        cand = self.cands[c]
        try:
            for i, (_, spec) in enumerate(cand.parts):
                s = SourceStream(
                    resolve_source(spec, self.text_field),
                    self.tok_spec,
                    self.rank,
                    self.world_size,
                    self.workers,
                )
                if states and states[i]["fingerprint"] != s.fingerprint:
                    raise DataError(
                        f"data source '{s.source.description}' changed since the checkpoint (fingerprint "
                        f"{states[i]['fingerprint']} -> {s.fingerprint}); resume with the same files"
                    )
                self.streams.append(s)
                s.launch(states[i] if states else None)
            for s in self.streams:  # all launched first: their workers start up in parallel
                s.docs.append(s._next_doc())  # opens the source: errors surface here (for the fallback)
        except BaseException:
            _close_all(self.streams)
            raise
        self.weights = np.array([w for w, _ in cand.parts], dtype=np.float64)
        self.cum = np.cumsum(self.weights)
        self.cum[-1] = 1.0  # a draw in [0, 1) always lands in a part
        self.rng = np.random.Generator(np.random.PCG64([self.seed, self.rank]))

    def _open_first(self) -> int:
        failures = []
        for c, cand in enumerate(self.cands):
            try:
                self._open(c)
            except DataError as e:
                failures.append(f"{cand.label}: {e}")
                if c + 1 < len(self.cands) and self.verbose:
                    print(
                        f"note: data source {cand.label} is unavailable ({e}); using the fallback "
                        f"{self.cands[c + 1].label}",
                        file=sys.stderr,
                    )
                continue
            return c
        if len(failures) == 1:
            raise DataError(failures[0].split(": ", 1)[1])
        raise DataError("no data source could be opened: " + "; ".join(failures))

    @property
    def description(self) -> str:
        return self.cands[self.candidate].label

    # -- batches -----------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64 on ``device``, y[i, t] = x[i, t + 1]. Row i comes from source ``draw[i]``."""
        buf = np.empty((self.B, self.T + 1), dtype=np.int64)
        parts = np.searchsorted(self.cum, self.rng.random(self.B), side="right")
        row = np.empty(self.T + 1, dtype=np.uint32)
        for i, p in enumerate(parts.tolist()):
            self.streams[p].row(self.T, row)
            buf[i] = row
        self.step += 1
        w = torch.from_numpy(buf)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(
                self.device, non_blocking=True
            )
        return x.to(self.device), y.to(self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- resume ------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "batch_size": self.B,
            "context_length": self.T,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "tokenizer": self.tokenizer_fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: settings, the source in use, each source's position, the generator."""
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "step": self.step,
            "candidate": self.cands[self.candidate].label,
            "sources": [{"fingerprint": s.fingerprint, **s.state()} for s in self.streams],
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off (readers restarted there); DataError for other data."""
        if state.get("version") != STATE_VERSION or state.get("kind") != "stream":
            raise DataError(
                "the checkpoint's data position is not a streaming one (the run trained on shards); "
                "resume with data.stream=false, or start a new run"
            )
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise DataError(
                    f"cannot resume the data stream: {key} was {state.get(key)!r}, now {value!r}; resume "
                    f"with the same data and settings (or start a new run)"
                )
        labels = [c.label for c in self.cands]
        if state["candidate"] not in labels:
            raise DataError(
                f"the run streamed {state['candidate']}, which is not among the sources now configured "
                f"({'; '.join(labels)}); resume with the same data.source/mixture/fallback"
            )
        c = labels.index(state["candidate"])
        saved = state["sources"]
        self._open(c, saved)  # restarts the readers at the saved records (errors if unavailable now)
        self.candidate = c
        self.rng.bit_generator.state = state["rng"]
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is garbage-collected)."""
        self._finalizer()


def _close_all(streams: list[SourceStream], tmp: Any = None) -> None:
    for s in streams:
        s.close()
    streams.clear()
    if tmp is not None:
        tmp.cleanup()


def stream_loaders(cfg: Any, tokenizer: Any, device: torch.device, rank: int = 0, world_size: int = 1):
    """(train StreamLoader, factory of a fresh validation StreamLoader or None) for ``data.stream=true``.

    Validation streams ``data.val_source`` from its start in this process (every evaluation sees the same
    tokens); without it there is no validation loss (a streamed source is not split).
    """
    dc, T = cfg.data, cfg.model.context_length
    common = dict(
        text_field=dc.text_field,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        device=device,
        vocab_size=cfg.model.vocab_size or None,
    )
    train = StreamLoader(
        candidates(dc), tokenizer, cfg.train.batch_size, T, workers=dc.stream_workers, **common
    )
    if not dc.val_source:
        if rank == 0:
            print("note: streaming with no data.val_source: no validation loss", file=sys.stderr)
        return train, None

    def val_loader() -> StreamLoader:
        val_cands = [Candidate(" + ".join(dc.val_source), [(1.0, list(dc.val_source))])]
        return StreamLoader(val_cands, tokenizer, cfg.train.batch_size, T, workers=0, verbose=False, **common)

    return train, val_loader
