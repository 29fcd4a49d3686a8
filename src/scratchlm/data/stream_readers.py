"""Record readers with resumable positions: the bottom layer of the streaming data path (data/stream.py).

A reader walks one text source (see ``corpus.py``) record by record and gives every record a *position*: a
small JSON dict from which :func:`records` restarts so that this record comes first. Positions are cheap to
seek to wherever the format allows it:

=====================  ============================================  =====================================
source                 position                                      resume cost
=====================  ============================================  =====================================
text files             ``{"file": i}``                               none
jsonl (plain)          ``{"file": i, "offset": byte offset}``        a seek
jsonl.gz               ``{"file": i, "offset": uncompressed byte}``  decompresses up to the offset
parquet                ``{"file": i, "row": r}``                     reads the row group holding row r
HF dataset (stream)    ``{"n": records of this rank}``               reads and drops n records
several sources        ``{"part": p, "base": k0, "inner": ...}``     that of the part
=====================  ============================================  =====================================

Every position also carries ``"k"``: the record's index in its stream. Ranks (torchrun): local files are
read by every rank and record ``k`` belongs to rank ``k % world_size`` (only the rank's own records are
parsed); an HF dataset is split with ``datasets.distributed.split_dataset_by_node`` (whole shards per rank
when the shards divide evenly, else every world_size-th record), so ``k`` counts the rank's own records.
Either way the ranks read disjoint records that together cover the source.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scratchlm.corpus import (
    BINARY_SNIFF_BYTES,
    ConcatSource,
    FileSource,
    HFSource,
    JsonlSource,
    ParquetSource,
    _field,
    check_not_binary,
    reading,
)
from scratchlm.errors import DataError

Position = dict[str, Any]
Record = tuple[Position, int, str]  # (position, index in this rank's stream, text)


def records(
    source: Any, start: Position | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[Record]:
    """This rank's records of ``source`` from ``start`` (None = the beginning): (position, index, text).

    ``index`` counts this rank's records from 0 (the i-th own record has index i), whatever the format.
    """
    if isinstance(source, HFSource):
        yield from _hf_records(source, start, rank, world_size)
        return
    for pos, k, read in _all_records(source, start):
        if k % world_size == rank:
            yield pos, k // world_size, read()


def _all_records(source: Any, start: Position | None) -> Iterator[tuple[Position, int, Any]]:
    """Every record (all ranks) as (position, k, read): ``read()`` parses it (skipped records are not parsed)."""
    if isinstance(source, ConcatSource):
        yield from _concat_records(source, start)
    elif isinstance(source, JsonlSource):
        yield from _jsonl_records(source, start)
    elif isinstance(source, ParquetSource):
        yield from _parquet_records(source, start)
    elif isinstance(source, FileSource):
        yield from _file_records(source, start)
    elif isinstance(source, HFSource):
        raise DataError(
            "an HF dataset inside several sources cannot be streamed; stream it as its own source"
        )
    else:
        raise DataError(
            f"cannot stream a {type(source).__name__}; give files, globs, *.jsonl, *.parquet or hf:"
        )


def _file_records(source: FileSource, start: Position | None) -> Iterator[tuple[Position, int, Any]]:
    check_binary = type(source).__name__ == "TextFileSource"
    for i in range((start or {}).get("file", 0), len(source.paths)):
        p = source.paths[i]

        def read(p: Path = p) -> str:
            with reading(p):
                data = p.read_bytes()
            if check_binary:
                check_not_binary(p, data[:BINARY_SNIFF_BYTES])
            return data.decode("utf-8", errors="replace")

        yield {"file": i, "k": i}, i, read


def _jsonl_records(source: JsonlSource, start: Position | None) -> Iterator[tuple[Position, int, Any]]:
    """Non-blank lines; positions are byte offsets of the (decompressed) file, so a plain file resumes by seek."""
    start = start or {}
    k = start.get("k", 0)
    for i in range(start.get("file", 0), len(source.paths)):
        p = source.paths[i]
        offset = start.get("offset", 0) if i == start.get("file", 0) else 0
        with reading(p), gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb") as f:
            f.seek(offset)  # gzip: an offset in the decompressed data (it decompresses up to there)
            while line := f.readline():
                here, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                yield {"file": i, "offset": here, "k": k}, k, _json_reader(line, source.text_field, p, k)
                k += 1


def _json_reader(line: bytes, text_field: str, path: Path, k: int):
    def read() -> str:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: record {k}: not valid JSON ({e.msg}); each line must be one object"
            ) from None
        return _field(record, text_field, f"{path} record {k}")

    return read


def _parquet_records(source: ParquetSource, start: Position | None) -> Iterator[tuple[Position, int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'scratchlm[parquet]'") from None
    start = start or {}
    k = start.get("k", 0)
    for i in range(start.get("file", 0), len(source.paths)):
        p = source.paths[i]
        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"'{p}' is not a readable parquet file ({type(e).__name__}: {e})") from None
        if source.text_field not in pf.schema_arrow.names:
            names = ", ".join(pf.schema_arrow.names)
            raise DataError(
                f"'{p}' has no column '{source.text_field}' (columns: {names}); pass --text-field NAME"
            )
        row = start.get("row", 0) if i == start.get("file", 0) else 0
        first = 0  # first row of the current row group
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first + n <= row:
                first += n
                continue
            values = pf.read_row_group(g, columns=[source.text_field]).column(0).to_pylist()
            for r in range(max(row - first, 0), n):
                value = values[r]
                if value is not None and not isinstance(value, str):
                    kind = type(value).__name__
                    raise DataError(f"'{p}' column '{source.text_field}' holds {kind}, not text")
                yield {"file": i, "row": first + r, "k": k}, k, (lambda v=value: v or "")
                k += 1
            first += n


def _concat_records(source: ConcatSource, start: Position | None) -> Iterator[tuple[Position, int, Any]]:
    start = start or {}
    base = start.get("base", 0)  # records in the parts before this one
    for p in range(start.get("part", 0), len(source.parts)):
        inner = start.get("inner") if p == start.get("part", 0) else None
        last = None
        for pos, local_k, read in _all_records(source.parts[p], inner):
            last = local_k
            yield {"part": p, "base": base, "inner": pos, "k": base + local_k}, base + local_k, read
        if last is not None:
            base += last + 1


def _hf_records(source: HFSource, start: Position | None, rank: int, world_size: int) -> Iterator[Record]:
    from scratchlm.data.hub import open_streaming

    ds = open_streaming(source.name, source.split, source.config, source.data_files, source.revision)
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    n = (start or {}).get("n", 0)
    for k, record in enumerate(ds):  # (ds.skip(n) after split_dataset_by_node skips in the unsplit stream)
        if k >= n:
            yield (
                {"n": k, "k": k},
                k,
                _field(record, source.text_field, f"HF dataset '{source.name}' record {k}"),
            )
