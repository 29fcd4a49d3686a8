"""Text sources: where documents come from.

A *source* yields documents (``str``) in a fixed order and has a stable ``fingerprint`` (it changes when
the data changes, so cached tokenizers and shards are never silently reused for other data) and a
one-line ``description``.

The built-in corpus is the Python standard library source of the running interpreter: it exists on every
machine that runs ScratchLM, so the main job works offline. Tests (``test``/``tests``/``idle_test``
directories and ``test_*.py`` files) and ``site-packages`` are excluded; files are taken in sorted
relative-path order; each file is one document; the train/validation split is by file, decided by a hash
of the relative path (stable when files are added or removed elsewhere).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import DataError

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library (``.../lib/python3.X``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def hash_fraction(key: str) -> float:
    """A deterministic number in [0, 1) from ``key`` (used for stable train/validation splits)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


@dataclass
class FileSource:
    """Whole files as documents, in the given order. ``root`` only shortens names in the fingerprint."""

    paths: list[Path]
    description: str = ""
    root: Path | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def documents(self) -> Iterator[str]:
        """Each file decoded as UTF-8 (undecodable bytes become U+FFFD)."""
        for p in self.paths:
            yield p.read_bytes().decode("utf-8", errors="replace")

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    @property
    def fingerprint(self) -> str:
        """sha256 over (relative path, size, mtime) of every file: cheap, and changes when any file does."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for p in self.paths:
                st = p.stat()
                name = str(p.relative_to(self.root)) if self.root else str(p.resolve())
                h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


@dataclass
class BuiltinCorpus:
    """The Python standard library source, split into train and validation by file."""

    root: Path
    train: FileSource
    val: FileSource

    def info(self) -> dict[str, object]:
        """Sizes and counts for ``scratchlm corpus info``."""
        return {
            "root": str(self.root),
            "files": len(self.train.paths) + len(self.val.paths),
            "bytes": self.train.num_bytes + self.val.num_bytes,
            "train_files": len(self.train.paths),
            "train_bytes": self.train.num_bytes,
            "val_files": len(self.val.paths),
            "val_bytes": self.val.num_bytes,
            "fingerprint": self.fingerprint,
        }

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.train.fingerprint}:{self.val.fingerprint}".encode()).hexdigest()[:16]


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library except tests and site-packages, in sorted order."""
    root = root or stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise DataError(
            f"no Python source found under {root}; pass data.source=PATH to train on your own text"
        )
    return files


def builtin_corpus(val_fraction: float = 0.1, root: Path | None = None) -> BuiltinCorpus:
    """The built-in corpus: stdlib files with ``hash_fraction(relative path) < val_fraction`` go to validation."""
    root = root or stdlib_root()
    train, val = [], []
    for p in stdlib_files(root):
        (val if hash_fraction(p.relative_to(root).as_posix()) < val_fraction else train).append(p)
    desc = f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library ({root})"
    return BuiltinCorpus(
        root=root,
        train=FileSource(train, f"{desc}, train split", root),
        val=FileSource(val, f"{desc}, validation split", root),
    )


# ----------------------------------------------------------------------------------------------------------
# Bring-your-own sources: text files, jsonl, parquet, HF datasets. ``resolve_source`` turns CLI/config specs
# into one of these. Each yields documents lazily (a 1 GB source never sits in memory) and fingerprints
# cheaply: local files by (path, size, mtime), HF datasets by (name, config, split, field).

BINARY_SNIFF_BYTES = 8192


@dataclass
class TextFileSource(FileSource):
    """Whole text files as documents (like :class:`FileSource`), refusing files that look binary."""

    def documents(self) -> Iterator[str]:
        """Each file decoded as UTF-8 (bad bytes become U+FFFD); a NUL byte means binary -> DataError."""
        for p in self.paths:
            with reading(p):
                data = p.read_bytes()
            check_not_binary(p, data[:BINARY_SNIFF_BYTES])
            yield data.decode("utf-8", errors="replace")


def check_not_binary(path: Path, head: bytes) -> None:
    """DataError when the first bytes of a file meant as text hold a NUL byte (a binary or compressed file)."""
    if b"\0" in head:
        hint = " (a gzip file must end in .jsonl.gz or .json.gz)" if head[:2] == b"\x1f\x8b" else ""
        raise DataError(
            f"'{path}' looks like a binary file (NUL bytes){hint}; give text files, .jsonl or .parquet"
        )


def check_text_files(source: FileSource) -> None:
    """The binary check of :class:`TextFileSource` on every file, reading only each file's first bytes."""
    if isinstance(source, TextFileSource):
        for p in source.paths:
            with open(p, "rb") as f:
                check_not_binary(p, f.read(BINARY_SNIFF_BYTES))


@dataclass
class JsonlSource:
    """One document per line of JSON-lines files (``.jsonl``, ``.json``, gzipped ``.jsonl.gz``): the string in
    ``text_field`` of each object."""

    paths: list[Path]
    text_field: str = "text"

    def documents(self) -> Iterator[str]:
        for p in self.paths:
            with reading(p), open_text(p) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        msg = f"{p}:{lineno}: not valid JSON ({e.msg}); each line must be one object"
                        raise DataError(msg) from None
                    yield _field(record, self.text_field, f"{p}:{lineno}")

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    @property
    def fingerprint(self) -> str:
        return _files_fingerprint(self.paths, f"jsonl:{self.text_field}")

    @property
    def description(self) -> str:
        return f"{_describe_paths(self.paths)} (jsonl, field '{self.text_field}')"


@dataclass
class ParquetSource:
    """One document per row of parquet files: column ``text_field``, read in batches (needs pyarrow)."""

    paths: list[Path]
    text_field: str = "text"

    def documents(self) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading .parquet needs pyarrow: pip install 'scratchlm[parquet]'") from None
        for p in self.paths:
            try:
                pf = pq.ParquetFile(p)
            except Exception as e:  # pyarrow raises several types for corrupt files
                raise DataError(f"'{p}' is not a readable parquet file ({type(e).__name__}: {e})") from None
            names = pf.schema_arrow.names
            if self.text_field not in names:
                raise DataError(
                    f"'{p}' has no column '{self.text_field}' (columns: {', '.join(names)}); "
                    f"pass --text-field NAME"
                )
            for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
                for value in batch.column(0).to_pylist():
                    if value is not None and not isinstance(value, str):
                        kind = type(value).__name__
                        raise DataError(f"'{p}' column '{self.text_field}' holds {kind}, not text")
                    yield value or ""

    @property
    def num_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    @property
    def fingerprint(self) -> str:
        return _files_fingerprint(self.paths, f"parquet:{self.text_field}")

    @property
    def description(self) -> str:
        return f"{_describe_paths(self.paths)} (parquet, column '{self.text_field}')"


@dataclass
class HFSource:
    """A Hugging Face dataset read with ``streaming=True`` (nothing is downloaded up front).

    ``name`` is a hub id (``roneneldan/TinyStories``) or a builder (``json``, ``text``, ``parquet``) used with
    ``data_files``; the latter is how this path is tested offline. Hub datasets are fingerprinted by name,
    config, split and field: pin ``revision`` to notice upstream changes.
    """

    name: str
    split: str = "train"
    config: str | None = None
    text_field: str = "text"
    data_files: list[str] | None = None
    revision: str | None = None

    def documents(self) -> Iterator[str]:
        from scratchlm.data.hub import open_streaming  # one line in ~1 s when the Hub is unreachable

        ds = open_streaming(self.name, self.split, self.config, self.data_files, self.revision)
        for i, record in enumerate(ds):
            yield _field(record, self.text_field, f"HF dataset '{self.name}' record {i}")

    @property
    def fingerprint(self) -> str:
        key = f"hf:{self.name}:{self.config}:{self.split}:{self.text_field}:{self.revision}"
        if self.data_files:
            key += ":" + _files_fingerprint([Path(f) for f in self.data_files], "")
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @property
    def description(self) -> str:
        cfg = f" ({self.config})" if self.config else ""
        return f"HF dataset {self.name}{cfg} split '{self.split}', field '{self.text_field}'"


@dataclass
class ConcatSource:
    """Several sources one after another (what ``scratchlm data prepare a.txt b.jsonl`` builds)."""

    parts: list[Any]

    def documents(self) -> Iterator[str]:
        for part in self.parts:
            yield from part.documents()

    @property
    def num_bytes(self) -> int | None:
        sizes = [getattr(p, "num_bytes", None) for p in self.parts]
        return None if any(s is None for s in sizes) else sum(sizes)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(":".join(p.fingerprint for p in self.parts).encode()).hexdigest()[:16]

    @property
    def description(self) -> str:
        return " + ".join(p.description for p in self.parts)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Errors while reading ``path`` as one DataError naming it: a truncated or corrupt .gz (EOFError,
    BadGzipFile, zlib.error), a file that vanished or cannot be read (OSError). Used by every reader of
    a source (tokenizer training, prepare, streaming), so they all say the same thing."""
    try:
        yield
    except DataError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(
            f"'{path}' is truncated or corrupt ({type(e).__name__}: {e}); re-download or re-compress it"
        ) from None
    except OSError as e:
        raise DataError(f"'{path}' could not be read ({e.strerror or e}); check the file") from None


def open_text(path: Path):
    """A text file object over ``path`` (UTF-8, bad bytes -> U+FFFD), decompressed when it ends in ``.gz``."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _field(record: Any, name: str, where: str) -> str:
    if not isinstance(record, dict) or name not in record:
        fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(
            f"{where}: no field '{name}' (has: {fields}); pass --text-field NAME (data.text_field)"
        )
    value = record[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' is {type(value).__name__}, not text; pick a text field")
    return value


def _files_fingerprint(paths: list[Path], salt: str) -> str:
    h = hashlib.sha256(salt.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _describe_paths(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"


def _expand(spec: str) -> list[Path]:
    """A file, a directory (every file below it, sorted, hidden files skipped) or a glob -> sorted files."""
    p = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        root = Path(p.anchor) if p.is_absolute() else Path()
        pattern = str(p.relative_to(root)) if p.is_absolute() else spec
        files = sorted(f for f in root.glob(pattern) if f.is_file())
        if not files:
            raise DataError(f"data source glob '{spec}' matches no files; check the pattern")
        return files
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise DataError(f"data source directory '{spec}' holds no files")
        return files
    if p.is_file():
        return [p]
    raise DataError(
        f"data source '{spec}' not found (give files, directories, globs, *.jsonl, *.parquet, "
        f"hf:NAME[:split[:config]] or builtin)"
    )


def _parse_hf(spec: str, text_field: str) -> HFSource:
    parts = spec[3:].split(":")
    if not parts[0]:
        raise DataError(
            f"bad HF source '{spec}': write hf:NAME[:split[:config]] (e.g. hf:roneneldan/TinyStories)"
        )
    return HFSource(
        name=parts[0],
        split=parts[1] if len(parts) > 1 and parts[1] else "train",
        config=parts[2] if len(parts) > 2 and parts[2] else None,
        text_field=text_field,
    )


def resolve_source(specs: list[str] | str, text_field: str = "text", val_fraction: float = 0.1):
    """CLI / config specs -> one source with ``documents()``, ``fingerprint`` and ``description``.

    ``[]`` or ``["builtin"]``: the built-in corpus' train split. ``hf:NAME[:split[:config]]``: a streamed HF
    dataset. Otherwise files, directories and globs; files are grouped by kind (``.jsonl``/``.json``,
    ``.parquet``, anything else is a text file = one document). Several specs are concatenated in order.
    Raises DataError naming the spec for missing paths or empty globs.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs or specs == ["builtin"]:
        return builtin_corpus(val_fraction).train
    parts: list[Any] = []
    for spec in specs:
        if spec == "builtin":
            parts.append(builtin_corpus(val_fraction).train)
        elif spec.startswith("hf:"):
            parts.append(_parse_hf(spec, text_field))
        else:
            for kind, group in _group_by_kind(_expand(spec)):
                if kind == "jsonl":
                    parts.append(JsonlSource(group, text_field))
                elif kind == "parquet":
                    parts.append(ParquetSource(group, text_field))
                else:
                    parts.append(TextFileSource(group, _describe_paths(group) + " (text files)"))
    return parts[0] if len(parts) == 1 else ConcatSource(parts)


def _group_by_kind(files: list[Path]) -> list[tuple[str, list[Path]]]:
    """Consecutive runs of files of the same kind (keeps the order, makes one source per run)."""
    groups: list[tuple[str, list[Path]]] = []
    for f in files:
        name = f.name.lower()
        jsonl = name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))
        kind = "jsonl" if jsonl else "parquet" if name.endswith(".parquet") else "text"
        if groups and groups[-1][0] == kind:
            groups[-1][1].append(f)
        else:
            groups.append((kind, [f]))
    return groups
