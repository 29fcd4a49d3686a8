"""The producer side of the streaming data path: records -> encoded chunks, in a worker process or inline.

Kept apart from ``data/stream.py`` (which imports torch) so that a spawned worker imports only the readers,
the tokenizer and numpy: it starts in well under a second.

A producer for worker ``j`` of ``W`` walks the rank's records (``stream_readers.records``), keeps records
``i`` with ``i % W == j``, encodes them in chunks of about :data:`CHUNK_CHARS` characters
(``tokenizer.encode_batch`` + the end-of-text token) and repeats the source epoch after epoch. A chunk is a
list of items ``(position, index, epoch, ids)``; each epoch ends with ``("end", epoch)`` and an error is sent
as ``("error", one line)``.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scratchlm.data.stream_readers import Position, records
from scratchlm.errors import DataError, ScratchLMError

CHUNK_CHARS = 1 << 16  # characters per worker message: amortises IPC, keeps the first batch quick
QUEUE_CHUNKS = 8  # chunks in flight per worker (~0.5 MB of text): what bounds the memory
POLL_S = 0.5  # how often a blocked worker or reader checks that the other side is alive

Item = tuple[Position, int, int, np.ndarray]  # (position, record index, epoch, ids + [eot]) of one record


def tokenizer_spec(tokenizer: Any, tmp: Path) -> tuple:
    """How a worker gets the tokenizer: a saved file when it can save itself, else the (picklable) object."""
    if hasattr(tokenizer, "save"):
        path = tmp / "tokenizer.json"
        if not path.exists():
            tokenizer.save(path)
        return ("path", str(path))
    return ("object", tokenizer)


def load_tokenizer_spec(spec: tuple) -> Any:
    if spec[0] == "path":
        from scratchlm.tokenizer import load_tokenizer

        tok = load_tokenizer(spec[1])
    else:
        tok = spec[1]
    if hasattr(tok, "num_threads"):
        tok.num_threads = 1  # parallelism here is one process per worker
    return tok


def produce(
    source: Any, tokenizer: Any, start: dict[str, Any], rank: int, world_size: int, worker: int, workers: int
) -> Iterator[list]:
    """Chunks (lists) of :data:`Item` for records ``i`` with ``i % workers == worker``, epoch after epoch.

    ``start = {"epoch", "pos", "idx"}`` (``pos`` None = the beginning). Each epoch ends with an item
    ``("end", epoch)``; whitespace-only records become empty arrays (the index sequence stays complete).
    """
    eot = int(tokenizer.eot_id)
    epoch, pos = int(start["epoch"]), start.get("pos")
    while True:
        chunk, texts, size = [], [], 0
        for p, idx, text in records(source, pos, rank, world_size):
            if idx % workers != worker:
                continue
            chunk.append((p, idx, epoch))
            texts.append(text)
            size += len(text)
            if size >= CHUNK_CHARS:
                yield _encode(tokenizer, chunk, texts, eot)
                chunk, texts, size = [], [], 0
        if chunk:
            yield _encode(tokenizer, chunk, texts, eot)
        yield [("end", epoch)]
        epoch, pos = epoch + 1, None


def _encode(tokenizer: Any, chunk: list, texts: list[str], eot: int) -> list[Item]:
    keep = [i for i, t in enumerate(texts) if t.strip()]
    ids = tokenizer.encode_batch([texts[i] for i in keep]) if keep else []
    arrays = [np.empty(0, dtype=np.uint32)] * len(texts)
    for i, toks in zip(keep, ids):
        a = np.empty(len(toks) + 1, dtype=np.uint32)
        a[:-1], a[-1] = toks, eot
        arrays[i] = a
    return [(p, idx, epoch, a) for (p, idx, epoch), a in zip(chunk, arrays)]


def _worker_main(args: tuple, out: Any, stop: Any, parent: int) -> None:
    """Worker process: put produced chunks on ``out`` until stopped, the parent dies, or an error (sent)."""
    source, tok_spec, start, rank, world_size, worker, workers = args
    try:
        tokenizer = load_tokenizer_spec(tok_spec)
        for chunk in produce(source, tokenizer, start, rank, world_size, worker, workers):
            if not _send(out, chunk, stop, parent):
                return
    except ScratchLMError as e:
        _send(out, [("error", str(e))], stop, parent)
    except Exception as e:  # a bug or an unexpected library error: still one line for the user
        first = str(e).splitlines()[0] if str(e) else ""
        where = getattr(source, "description", type(source).__name__)
        _send(out, [("error", f"data source '{where}': {type(e).__name__}: {first}")], stop, parent)


def _send(out: Any, chunk: list, stop: Any, parent: int) -> bool:
    """Put ``chunk`` on the bounded queue, waiting while it is full; False once stopped or orphaned."""
    while not (stop.is_set() or os.getppid() != parent):
        try:
            out.put(chunk, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    out.cancel_join_thread()  # exit at once, without flushing chunks nobody will read
    return False


class InlineProducer:
    """The producer run in this process (``data.stream_workers=0``)."""

    def __init__(self, gen: Iterator[list]):
        self.gen = gen

    def get(self) -> list:
        return next(self.gen)

    def close(self) -> None:
        self.gen.close()


class ProcessProducer:
    """The producer in a spawned worker process, behind a bounded queue."""

    def __init__(self, ctx: Any, args: tuple):
        self.queue, self.stop = ctx.Queue(QUEUE_CHUNKS), ctx.Event()
        self.proc = ctx.Process(
            target=_worker_main, args=(args, self.queue, self.stop, os.getpid()), daemon=True
        )
        try:
            self.proc.start()
        except BaseException:  # (out of processes or memory): release the queue's semaphores now
            self.queue.cancel_join_thread()
            self.queue.close()
            raise

    def get(self) -> list:
        while True:
            try:
                return self.queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self.proc.is_alive() and self.queue.empty():
                    raise DataError(
                        f"a streaming worker process died (exit code {self.proc.exitcode}); "
                        f"see the messages above, or use data.stream_workers=0 to read in this process"
                    ) from None

    def close(self) -> None:
        """Stop the worker now (it shares nothing but this queue, which is dropped with it)."""
        self.stop.set()
        self.proc.terminate()
        self.proc.join()
        self.queue.cancel_join_thread()
        self.queue.close()
