"""The on-disk shard format: raw token files, document indexes and ``meta.json``.

A prepared directory holds, per split (``train``, ``val``)::

    train_000000.bin   raw little-endian token ids (uint16 if vocab_size <= 65536, else uint32);
                       every document is followed by the end-of-text token, and a shard ends at a document end
    train_000000.idx   raw little-endian uint64: the start offset (in tokens) of each document in the shard
    tokenizer.json     the tokenizer (when it can save itself), so the shards can be decoded
    meta.json          written last: format version, tokenizer fingerprint, dtype, counts, shard list, source

Every file is first written as ``.NAME.partial`` and renamed when the whole directory is done, ``meta.json``
last, so an interrupted ``prepare`` never leaves a directory that looks complete: without ``meta.json``
nothing in it is trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from scratchlm.errors import DataError

FORMAT = "scratchlm-shards"
VERSION = 1
META = "meta.json"
TOKENIZER = "tokenizer.json"  # copy of the tokenizer (when it can save itself)
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype("<u8")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def partial_name(name: str) -> str:
    return f".{name}.partial"


def is_shard_file(name: str) -> bool:
    """Files this format owns (final or partial), used to spot leftovers of an interrupted prepare."""
    base = name[1:].removesuffix(".partial") if name.startswith(".") and name.endswith(".partial") else name
    stem, _, ext = base.partition(".")
    split, _, num = stem.partition("_")
    return (split in SPLITS and num.isdigit() and ext in ("bin", "idx")) or base in (META, TOKENIZER)


class ShardWriter:
    """Appends encoded documents of one split to ``.SPLIT_NNNNNN.{bin,idx}.partial`` files.

    A new shard starts once the current one holds ``shard_tokens`` tokens (checked at document ends, so
    documents never straddle shards). Memory stays flat: tokens go straight to the file.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._bin = self._idx = None

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self.shards.append({"file": name, "index": name[:-4] + ".idx", "tokens": 0, "documents": 0})
        self._bin = open(self.out_dir / partial_name(name), "wb")  # noqa: SIM115 (closed in _close)
        self._idx = open(self.out_dir / partial_name(name[:-4] + ".idx"), "wb")  # noqa: SIM115

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` (N,) is their concatenation (EOT included), ``lengths`` (D,) sums to N."""
        pos, offset = 0, 0  # next document, and its first token in ``tokens``
        while pos < len(lengths):
            if self._bin is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._close()
                self._open()
            shard = self.shards[-1]
            # take documents while the shard has room (at least one, so a huge document gets its own shard)
            ends = np.cumsum(lengths[pos:])
            n = max(1, int(np.searchsorted(ends, self.shard_tokens - shard["tokens"], side="right")))
            size = int(ends[n - 1])
            starts = shard["tokens"] + np.concatenate(([0], ends[: n - 1]))
            self._idx.write(starts.astype(INDEX_DTYPE).tobytes())
            self._bin.write(tokens[offset : offset + size].astype(self.dtype, copy=False).tobytes())
            shard["tokens"] += size
            shard["documents"] += n
            pos, offset = pos + n, offset + size

    def _close(self) -> None:
        if self._bin is not None:
            self._bin.close()
            self._idx.close()
            self._bin = self._idx = None

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


def commit(out_dir: Path, files: list[str], meta: dict[str, Any]) -> None:
    """Rename every ``.NAME.partial`` to ``NAME``, then write meta.json atomically (last)."""
    for name in files:
        os.replace(out_dir / partial_name(name), out_dir / name)
    write_json_atomic(out_dir / META, meta)


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(partial_name(path.name))
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared directory, checked for format and version; DataError when absent or foreign."""
    d = Path(data_dir)
    path = d / META
    if not path.is_file():
        hint = (
            " (an interrupted prepare? run it again)"
            if d.is_dir() and any(is_shard_file(p.name) for p in d.iterdir())
            else ""
        )
        raise DataError(
            f"'{d}' is not a prepared data directory (no meta.json){hint}; "
            f"run `scratchlm data prepare SOURCE --tokenizer PATH --out {d}`"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is corrupt ({e.msg}); delete '{d}' and prepare it again") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{path} is not a {FORMAT} v{VERSION} file (found {meta.get('format')} "
            f"v{meta.get('version')}); prepare the data again into a new directory"
        )
    return meta


def open_shard(data_dir: Path, shard: dict[str, Any], dtype: np.dtype) -> np.memmap:
    """Memory-map one shard read-only, checking its size against meta.json."""
    path = data_dir / shard["file"]
    expected = shard["tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        size = path.stat().st_size if path.is_file() else "missing"
        raise DataError(f"shard '{path}' is {size} bytes, meta.json says {expected}; prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],))


def read_doc_starts(data_dir: Path, shard: dict[str, Any]) -> np.ndarray:
    """(documents,) int64 start offsets of the documents in one shard."""
    path = data_dir / shard["index"]
    if not path.is_file() or path.stat().st_size != shard["documents"] * INDEX_DTYPE.itemsize:
        raise DataError(f"document index '{path}' is missing or truncated; prepare the data again")
    return np.fromfile(path, dtype=INDEX_DTYPE).astype(np.int64)
