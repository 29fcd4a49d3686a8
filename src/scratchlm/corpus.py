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

import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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
        raise DataError(f"no Python source found under {root}; pass data.source=PATH to train on your own text")
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
