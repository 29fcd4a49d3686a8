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
TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4"}  # meta.json "dtype" -> the little-endian numpy dtype


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def partial_name(name: str) -> str:
    return f".{name}.partial"


def is_shard_file(name: str, partial: bool = True) -> bool:
    """``SPLIT_NNNNNN.bin`` / ``.idx`` (and, when ``partial``, their ``.NAME.partial`` temp files).

    Only these names are shard files: ``meta.json`` and ``tokenizer.json`` are not (a run directory holds a
    ``tokenizer.json`` too, and it must never be taken for a leftover of an interrupted prepare).
    """
    if partial and name.startswith(".") and name.endswith(".partial"):
        name = name[1:].removesuffix(".partial")
    stem, _, ext = name.partition(".")
    split, _, num = stem.partition("_")
    return split in SPLITS and len(num) >= 6 and num.isascii() and num.isdigit() and ext in ("bin", "idx")


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
    from scratchlm import fileio

    fileio.write_text(path, json.dumps(obj, indent=2) + "\n")


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared directory, checked for format, version and structure, with its shard files.

    Every shard and document index it lists must exist with the size it records (a ``stat`` per file: the
    data is not read). Raises DataError (one line: the file and the problem) when the directory is not a
    prepared one, meta.json is corrupt or foreign, or a shard file is missing or truncated.
    """
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
    again = f"prepare the data again (delete '{d}' and re-run `scratchlm data prepare`)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # empty, truncated, not JSON
        raise DataError(f"{path} is corrupt ({e.msg} at line {e.lineno}); {again}") from None
    except UnicodeDecodeError as e:  # bit-flipped or binary
        raise DataError(f"{path} is corrupt (not UTF-8: {e.reason}); {again}") from None
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, brackets nested 100k deep
        raise DataError(f"{path} is corrupt ({type(e).__name__}); {again}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} is corrupt (a JSON {type(meta).__name__}, not an object); {again}")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(
            f"{path} is not a {FORMAT} v{VERSION} file (found {meta.get('format')} "
            f"v{meta.get('version')}); prepare the data again into a new directory"
        )
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{path} is corrupt ({problem}); {again}")
    check_files(d, meta)
    return meta


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the structure of a v1 meta.json (the fields readers use), or None."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    def bad_record(x: Any, keys: tuple[str, ...]) -> bool:
        return not isinstance(x, dict) or any(k not in x for k in keys)

    tok = meta.get("tokenizer")
    if bad_record(tok, ("fingerprint", "vocab_size", "eot_id", "kind")):
        return "'tokenizer' must be an object with fingerprint, vocab_size, eot_id and kind"
    if not (is_int(tok["vocab_size"]) and is_int(tok["eot_id"]) and tok["eot_id"] < tok["vocab_size"]):
        return f"tokenizer vocab_size {tok['vocab_size']!r} / eot_id {tok['eot_id']!r} are not valid ids"
    if meta.get("dtype") not in TOKEN_DTYPES:
        return f"dtype {meta.get('dtype')!r} is not one of {', '.join(TOKEN_DTYPES)}"
    if tok["vocab_size"] > np.iinfo(TOKEN_DTYPES[meta["dtype"]]).max + 1:
        return f"dtype {meta['dtype']} cannot hold the ids of vocab_size {tok['vocab_size']}"
    if bad_record(meta.get("source"), ("fingerprint", "description")):
        return "'source' must be an object with fingerprint and description"
    val_source = meta.get("val_source")
    if val_source is not None and bad_record(val_source, ("fingerprint", "description")):
        return "'val_source' must be null or an object with fingerprint and description"
    for key in ("val_fraction", "split_rule", "shard_tokens"):
        if key not in meta:
            return f"no '{key}'"
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(s not in splits for s in SPLITS):
        return f"'splits' must be an object with {' and '.join(SPLITS)}"
    for split in SPLITS:
        info = splits[split]
        if bad_record(info, ("tokens", "documents", "shards")) or not isinstance(info["shards"], list):
            return f"splits.{split} must be an object with tokens, documents and a list of shards"
        for i, sh in enumerate(info["shards"]):
            where = f"splits.{split}.shards[{i}]"
            if bad_record(sh, ("file", "index", "tokens", "documents")):
                return f"{where} must be an object with file, index, tokens and documents"
            names = (sh["file"], ".bin"), (sh["index"], ".idx")
            if not all(
                isinstance(n, str) and n.endswith(e) and is_shard_file(n, partial=False) for n, e in names
            ):
                return f"{where} names {sh['file']!r} / {sh['index']!r}, not a shard and its index"
            # prepare never writes an empty shard, and every document holds at least its end-of-text token
            if not (is_int(sh["tokens"]) and is_int(sh["documents"]) and 0 < sh["documents"] <= sh["tokens"]):
                return f"{where} has tokens {sh['tokens']!r} / documents {sh['documents']!r}"
        for key in ("tokens", "documents"):
            total = sum(sh[key] for sh in info["shards"])
            if info[key] != total:
                return f"splits.{split}.{key} is {info[key]!r}, but its shards hold {total}"
    return None


def check_files(data_dir: Path, meta: dict[str, Any]) -> None:
    """DataError unless every shard and document index of ``meta`` exists with the size it records."""
    dtype = np.dtype(TOKEN_DTYPES[meta["dtype"]])
    for split in SPLITS:
        for sh in meta["splits"][split]["shards"]:
            for name, expected in (
                (sh["file"], sh["tokens"] * dtype.itemsize),
                (sh["index"], sh["documents"] * INDEX_DTYPE.itemsize),
            ):
                path = data_dir / name
                size = path.stat().st_size if path.is_file() else None
                if size != expected:
                    found = "missing" if size is None else f"{size} bytes"
                    raise DataError(
                        f"shard file '{path}' is {found}, meta.json says {expected} bytes; "
                        f"prepare the data again (delete '{data_dir}' and re-run `scratchlm data prepare`)"
                    )


def check_vocab(meta: dict[str, Any], vocab_size: int, data_dir: str | os.PathLike) -> None:
    """DataError unless the shards' token ids (all < meta's tokenizer vocab_size) fit ``vocab_size``.

    ``vocab_size`` is the number of rows of the model's embedding (it may be padded above the tokenizer's,
    e.g. 50304 for GPT-2's 50257); an id at or above it would be an IndexError deep inside the model.
    """
    tok = meta["tokenizer"]
    if tok["vocab_size"] > vocab_size:
        raise DataError(
            f"'{data_dir}' was prepared with a tokenizer of vocab_size {tok['vocab_size']} ({tok['kind']} "
            f"{tok['fingerprint']}), but the model's vocab_size is {vocab_size}; prepare the data with the "
            f"model's tokenizer or set model.vocab_size >= {tok['vocab_size']}"
        )


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
    starts = np.fromfile(path, dtype=INDEX_DTYPE)
    # prepare writes 0 first, then strictly increasing offsets inside the shard (a document holds >= 1 token)
    if len(starts) and (starts[0] != 0 or starts[-1] >= shard["tokens"] or np.any(starts[1:] <= starts[:-1])):
        raise DataError(
            f"document index '{path}' is corrupt (offsets must rise from 0 to below the shard's "
            f"{shard['tokens']} tokens); prepare the data again"
        )
    return starts.astype(np.int64)


def check_ids(window: np.ndarray, vocab_size: int, where: str) -> None:
    """DataError unless every token id in ``window`` is below ``vocab_size`` (one max per batch: cheap).

    The ids of a shard come from its tokenizer, so an id at or above meta.json's vocab_size means the .bin
    file was damaged or written by something else; the model would fail with an IndexError (CPU) or a
    device-side assert (CUDA) far from the cause.
    """
    if window.size and int(window.max()) >= vocab_size:
        bad = int(window.max())
        raise DataError(
            f"{where} holds token id {bad}, beyond the tokenizer's vocab_size {vocab_size} (a damaged or "
            "foreign shard); prepare the data again"
        )
