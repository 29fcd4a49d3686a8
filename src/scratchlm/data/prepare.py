"""prepare: text source -> token shards + meta.json, encoded in parallel worker processes.

The flow (memory stays flat whatever the corpus size)::

    source.documents() --(main process: group into ~1 MB tasks)--> pool of W workers: encode_batch + EOT
         --(results in submission order, at most 2W tasks in flight)--> ShardWriter(train) / ShardWriter(val)
         --> rename the .partial files, write meta.json last

Train/validation split, by document and deterministic:

* ``val_source`` given: every document of ``source`` is train, every document of ``val_source`` is val;
* else ``hash_fraction(document text) < val_fraction`` -> val (sha256 of the content: identical documents
  land in the same split, and the split does not depend on document order or worker count);
* a source with a single document (one big text file) is cut by position instead, as nanoGPT does: the
  last ``val_fraction`` of its characters (from a line start) is val.

Idempotent: when ``out_dir/meta.json`` records the same tokenizer, sources and split settings and its shards
are intact, the directory is reused; any difference is a DataError (never a silent reuse or overwrite).
Workers get the tokenizer by path (saved once to a temp file, re-loaded with ``load_tokenizer``), so nothing
that does not pickle (compiled regexes, tiktoken encodings) crosses the process boundary; the ``spawn`` start
method is used so that workers are safe whatever threads the parent runs.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from scratchlm.console import is_terminal
from scratchlm.corpus import hash_fraction
from scratchlm.data import shards
from scratchlm.errors import DataError
from scratchlm.tokenizer.pretokenize import available_cores

SHARD_TOKENS = 100_000_000  # ~200 MB uint16 files: few files, and a shard maps in one call
TASK_CHARS = 1 << 20  # characters per worker task: large enough to amortise IPC, small enough to stay flat

# A task is (texts, where): where is "train", "val" or "hash" (split each document by its content hash).
Task = tuple[list[str], str]


def prepare(
    source: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    val_source: Any = None,
    val_fraction: float = 0.1,
    num_workers: int | None = None,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
    task_chars: int = TASK_CHARS,
) -> dict[str, Any]:
    """Encode ``source`` (and ``val_source``) with ``tokenizer`` into shards under ``out_dir``; return meta.

    Each document becomes ``tokenizer.encode_batch([doc])[0] + [eot_id]``; empty (whitespace-only) documents
    are skipped and counted in ``meta["skipped_empty_documents"]``. ``num_workers``: None = all cores,
    <= 1 = encode in this process. Side effects: creates ``out_dir``, writes ``{train,val}_NNNNNN.{bin,idx}``
    and ``meta.json`` (last, atomically); on any error the partial files are removed.
    Raises DataError for a mismatching existing directory, a non-empty ``out_dir`` that is not a shard
    directory (only an interrupted prepare's own files are ever deleted), an empty source or an empty split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    settings = _settings(source, tokenizer, val_source, val_fraction, shard_tokens)
    created = _missing_dirs(out)  # removed again if this prepare fails: nothing half-written stays
    # one prepare per directory at a time: a second process (a parallel sweep sharing the shard cache)
    # waits here, then finds meta.json and reuses the shards instead of deleting the first one's files
    with _exclusive(out):
        if (out / shards.META).is_file():
            return _reuse(out, settings, progress)
        _check_out_dir(out)  # before anything is created or deleted
        out.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(out)

        dtype = shards.token_dtype(tokenizer.vocab_size)
        writers = {s: shards.ShardWriter(out, s, dtype, shard_tokens) for s in shards.SPLITS}
        total_bytes = _num_bytes(source, val_source)
        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc=f"prepare {out.name}",
            disable=not (progress and is_terminal()),  # a bar for a person at a terminal only
            file=sys.stderr,
            smoothing=0.1,
        )
        t0, rule = time.perf_counter(), [""]
        counts = {"bytes": 0, "empty": 0, "train_bytes": 0, "val_bytes": 0}
        try:
            with _Encoder(tokenizer, num_workers, val_fraction) as encoder:
                tasks = _tasks(source, val_source, val_fraction, task_chars, rule)
                for result in encoder.run(tasks):
                    for split in shards.SPLITS:
                        tokens, lengths = result[split]
                        if len(lengths):
                            writers[split].write(tokens, lengths)
                    for key in counts:
                        counts[key] += result[key]
                    bar.update(result["bytes"])
            bar.close()
            split_meta = {s: _split_summary(writers[s].finish()) for s in shards.SPLITS}
            for s in shards.SPLITS:
                split_meta[s]["bytes"] = counts[f"{s}_bytes"]
            _check_splits(split_meta, counts["empty"], source, rule[0], val_fraction)
            meta = {
                "format": shards.FORMAT,
                "version": shards.VERSION,
                **settings,
                "dtype": dtype.name,
                "split_rule": rule[0],
                "splits": split_meta,
                "skipped_empty_documents": counts["empty"],
                "text_bytes": counts["bytes"],
                "seconds": round(time.perf_counter() - t0, 3),
            }
            files = [
                f for s in shards.SPLITS for sh in split_meta[s]["shards"] for f in (sh["file"], sh["index"])
            ]
            if hasattr(
                tokenizer, "save"
            ):  # a copy beside the shards, so `scratchlm data info` can decode them
                tokenizer.save(out / shards.partial_name(shards.TOKENIZER))
                files.append(shards.TOKENIZER)
            shards.commit(out, files, meta)
        except BaseException:
            bar.close()
            for w in writers.values():
                w.finish()
            _remove_leftovers(out, quiet=True)
            for d in created:  # deepest first; only directories this call made, and only if still empty
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        if progress:
            mb = counts["bytes"] / 1e6
            print(
                f"prepared {out}: {split_meta['train']['tokens']:,} train / {split_meta['val']['tokens']:,} val "
                f"tokens from {mb:.1f} MB in {meta['seconds']:.1f}s ({mb / max(meta['seconds'], 1e-9):.1f} MB/s)",
                file=sys.stderr,
            )
        return meta


# ----------------------------------------------------------------------------------------------------------
# settings, reuse, leftovers


def _settings(source: Any, tokenizer: Any, val_source: Any, val_fraction: float, shard_tokens: int) -> dict:
    """What must match for an existing directory to be reused (goes into meta.json)."""
    for attr in ("eot_id", "vocab_size", "fingerprint", "encode_batch"):
        if not hasattr(tokenizer, attr):
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no '{attr}'; use scratchlm.tokenizer")
    return {
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": int(tokenizer.vocab_size),
            "eot_id": int(tokenizer.eot_id),
            "kind": type(tokenizer).__name__,
        },
        "source": {"fingerprint": source.fingerprint, "description": source.description},
        "val_source": None
        if val_source is None
        else {"fingerprint": val_source.fingerprint, "description": val_source.description},
        "val_fraction": None if val_source is not None else val_fraction,
        "shard_tokens": shard_tokens,
    }


def _reuse(out: Path, settings: dict, progress: bool) -> dict[str, Any]:
    meta = shards.read_meta(out)
    checks = [
        ("tokenizer", meta["tokenizer"]["fingerprint"], settings["tokenizer"]["fingerprint"]),
        ("source", meta["source"]["fingerprint"], settings["source"]["fingerprint"]),
        (
            "validation source",
            (meta["val_source"] or {}).get("fingerprint"),
            (settings["val_source"] or {}).get("fingerprint"),
        ),
        ("val_fraction", meta["val_fraction"], settings["val_fraction"]),
        ("shard size", meta["shard_tokens"], settings["shard_tokens"]),
    ]
    for what, old, new in checks:
        if old != new:
            was = meta["source"]["description"] if what == "source" else old
            raise DataError(
                f"'{out}' holds shards prepared with another {what} ({was}); "
                f"use another --out directory or delete '{out}'"
            )
    dtype = np.dtype(meta["dtype"])
    for split in shards.SPLITS:
        for sh in meta["splits"][split]["shards"]:
            shards.open_shard(out, sh, dtype)  # raises DataError when missing or truncated
    if progress:
        print(f"{out} is up to date (same tokenizer, source and split); reusing it", file=sys.stderr)
    return meta


def _check_out_dir(out: Path) -> None:
    """DataError unless ``out`` (no meta.json) is missing, empty, or holds only leftovers of a prepare.

    A non-empty directory that is not a shard directory (a run directory, a tokenizer's directory, ...)
    is refused rather than cleaned: ``prepare`` deletes leftovers, and nothing else may ever be deleted.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"'{out}' is a file, not a directory; prepare into a new or empty directory (--out)")
    if not out.is_dir():
        return
    leftovers = set(_leftovers(out))
    foreign = sorted(p.name for p in out.iterdir() if p not in leftovers)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DataError(
            f"'{out}' is not empty and is not a shard directory (it holds {shown}); "
            f"prepare into a new or empty directory (--out)"
        )


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` while preparing it: a hidden ``.NAME.lock`` file beside it, locked
    with ``fcntl.flock`` (released by the OS if the process dies; the file stays, empty). Where ``fcntl``
    does not exist (Windows) there is no lock: do not prepare one directory from two processes there."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _leftovers(out: Path) -> list[Path]:
    """The files an interrupted prepare wrote in ``out``, by their exact names.

    Shard files (final or ``.partial``), ``.tokenizer.json.partial``, ``.meta.json.partial``, and
    ``tokenizer.json`` only when final shard files show that ``shards.commit`` had begun renaming.
    """
    files = [p for p in out.iterdir() if p.is_file() and not p.is_symlink()]
    committed = any(shards.is_shard_file(p.name, partial=False) for p in files)
    temp = {shards.partial_name(shards.TOKENIZER), shards.partial_name(shards.META)}
    return [
        p
        for p in files
        if shards.is_shard_file(p.name) or p.name in temp or (committed and p.name == shards.TOKENIZER)
    ]


def _remove_leftovers(out: Path, quiet: bool = False) -> None:
    """Delete the files of an interrupted prepare (no meta.json, so nothing here was complete)."""
    leftovers = _leftovers(out)
    if leftovers and not quiet:
        print(f"removing {len(leftovers)} file(s) of an interrupted prepare in {out}", file=sys.stderr)
    for p in leftovers:
        p.unlink(missing_ok=True)


def _num_bytes(*sources: Any) -> int | None:
    sizes = [getattr(s, "num_bytes", None) for s in sources if s is not None]
    return None if any(s is None for s in sizes) else sum(sizes)


def _split_summary(shard_list: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tokens": sum(s["tokens"] for s in shard_list),
        "documents": sum(s["documents"] for s in shard_list),
        "shards": shard_list,
    }


def _check_splits(split_meta: dict, empty: int, source: Any, rule: str, val_fraction: float) -> None:
    train, val = split_meta["train"]["documents"], split_meta["val"]["documents"]
    if train + val == 0:
        extra = f" ({empty} empty document(s) skipped)" if empty else ""
        raise DataError(
            f"source '{source.description}' has no non-empty documents{extra}; check the path or field"
        )
    if train == 0:
        raise DataError(
            f"the train split is empty ({val} document(s) all went to validation); "
            f"lower val_fraction or add documents"
        )
    if val == 0 and rule in ("hash", "val_source"):
        raise DataError(
            f"the validation split is empty (val_fraction={val_fraction} of {train} document(s)); "
            f"raise --val-fraction, give --val-source, or use --val-fraction 0 for no validation"
        )


# ----------------------------------------------------------------------------------------------------------
# documents -> tasks (main process)


def _tasks(
    source: Any, val_source: Any, val_fraction: float, task_chars: int, rule: list[str]
) -> Iterator[Task]:
    """Group documents into tasks of about ``task_chars`` characters; ``rule[0]`` records the split rule."""
    if val_source is not None:
        rule[0] = "val_source"
        yield from _group(source.documents(), "train", task_chars)
        yield from _group(val_source.documents(), "val", task_chars)
        return
    if val_fraction == 0:
        rule[0] = "none"
        yield from _group(source.documents(), "train", task_chars)
        return
    docs = iter(source.documents())
    head = [d for _, d in zip(range(2), docs)]
    if len(head) == 1:  # one big document: split by position (see the module docstring)
        rule[0] = "position"
        text = head[0]
        cut = int(len(text) * (1.0 - val_fraction))
        line_start = text.rfind("\n", 0, cut) + 1
        cut = line_start if line_start > 0 else cut
        yield [text[:cut]], "train"
        yield [text[cut:]], "val"
        return
    rule[0] = "hash"
    yield from _group(_chain(head, docs), "hash", task_chars)


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest


def _group(docs: Iterator[str], where: str, task_chars: int) -> Iterator[Task]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= task_chars:
            yield batch, where
            batch, size = [], 0
    if batch:
        yield batch, where


# ----------------------------------------------------------------------------------------------------------
# encoding (worker processes or in-process)

_worker_tokenizer: Any = None


def _load_worker_tokenizer(spec: tuple[str, Any]) -> None:
    """Pool initializer: ("path", file, (vocab_size, eot_id)) re-loads it; ("object", tok) uses it as is."""
    global _worker_tokenizer
    kind, value = spec[0], spec[1]
    if kind == "path":
        from scratchlm.tokenizer import load_tokenizer

        _worker_tokenizer = load_tokenizer(value)
        # a cheap sanity check (the full fingerprint costs ~1 s per worker on GPT-2's vocabulary)
        if (_worker_tokenizer.vocab_size, _worker_tokenizer.eot_id) != spec[2]:
            raise RuntimeError(f"tokenizer re-loaded from {value} differs from the one saved (save/load bug)")
    else:
        _worker_tokenizer = value
    if hasattr(_worker_tokenizer, "num_threads"):
        _worker_tokenizer.num_threads = 1  # parallelism here is one process per core


def encode_documents(tokenizer: Any, texts: list[str], where: str, val_fraction: float) -> dict[str, Any]:
    """Encode one task: {"train": (tokens, lengths), "val": (tokens, lengths), "bytes": n, "empty": n,
    "train_bytes": n, "val_bytes": n} (bytes: UTF-8 text bytes of all / of each split's kept documents).

    tokens (N,) uint32 is the concatenation of ``ids + [eot]`` per kept document, lengths (D,) int64 their
    sizes. Whitespace-only documents are dropped (counted in "empty").
    """
    kept = [t for t in texts if t.strip()]
    ids_list = tokenizer.encode_batch(kept) if kept else []
    eot, vocab = int(tokenizer.eot_id), int(tokenizer.vocab_size)
    if where == "hash":
        to_val = [hash_fraction(t) < val_fraction for t in kept]
    else:
        to_val = [where == "val"] * len(kept)
    out: dict[str, Any] = {
        "bytes": sum(len(t.encode("utf-8", errors="replace")) for t in texts),
        "empty": len(texts) - len(kept),
    }
    for split, want in (("train", False), ("val", True)):
        chosen = [ids for ids, v in zip(ids_list, to_val) if v == want]
        # the split's text size, for bits per byte (evaluate.eval_record): loss * tokens / bytes / ln 2
        out[f"{split}_bytes"] = sum(
            len(t.encode("utf-8", errors="replace")) for t, v in zip(kept, to_val) if v == want
        )
        lengths = np.array([len(ids) + 1 for ids in chosen], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
        pos = 0
        for ids in chosen:
            tokens[pos : pos + len(ids)] = ids
            tokens[pos + len(ids)] = eot
            pos += len(ids) + 1
        if len(tokens) and int(tokens.max()) >= vocab:
            raise DataError(
                f"tokenizer produced id {int(tokens.max())} >= vocab_size {vocab}; the tokenizer is broken"
            )
        out[split] = (tokens, lengths)
    return out


def _encode_task(task: Task, val_fraction: float) -> dict[str, Any]:
    return encode_documents(_worker_tokenizer, task[0], task[1], val_fraction)


class _Encoder:
    """Runs tasks in order, in-process (1 worker) or on a spawn pool with at most 2W tasks in flight."""

    def __init__(self, tokenizer: Any, num_workers: int | None, val_fraction: float):
        self.tokenizer, self.val_fraction = tokenizer, val_fraction
        self.num_workers = num_workers if num_workers is not None else available_cores()
        self.pool, self.tmp = None, None

    def __enter__(self) -> _Encoder:
        if self.num_workers > 1:
            self.pool = mp.get_context("spawn").Pool(
                self.num_workers, initializer=_load_worker_tokenizer, initargs=(self._spec(),)
            )
        return self

    def _spec(self) -> tuple:
        """How workers get the tokenizer: by file when it can save itself, else the (picklable) object."""
        if hasattr(self.tokenizer, "save"):
            try:
                import scratchlm.tokenizer  # noqa: F401  (load_tokenizer must exist for the workers)
            except ImportError:
                return ("object", self.tokenizer)
            self.tmp = tempfile.TemporaryDirectory(prefix="scratchlm-tok-")
            path = Path(self.tmp.name) / "tokenizer.json"
            self.tokenizer.save(path)
            return ("path", str(path), (self.tokenizer.vocab_size, self.tokenizer.eot_id))
        return ("object", self.tokenizer)

    def run(self, tasks: Iterator[Task]) -> Iterator[dict[str, Any]]:
        if self.pool is None:  # one worker = one core: no tokenizer threads either
            threads = getattr(self.tokenizer, "num_threads", None)
            if hasattr(self.tokenizer, "num_threads"):
                self.tokenizer.num_threads = 1
            try:
                for task in tasks:
                    yield encode_documents(self.tokenizer, task[0], task[1], self.val_fraction)
            finally:
                if hasattr(self.tokenizer, "num_threads"):
                    self.tokenizer.num_threads = threads
            return
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(self.pool.apply_async(_encode_task, (task, self.val_fraction)))
            if len(pending) >= 2 * self.num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            if exc[0] is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
        if self.tmp is not None:
            self.tmp.cleanup()


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing
