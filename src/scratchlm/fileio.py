"""Reading and writing the project's files safely: one atomic writer, one UTF-8 reader.

Every file ScratchLM writes (config.yaml, tokenizer.json, metrics, checkpoint pointers, shards' meta.json,
HF and GGUF exports, plots, reports) goes through :func:`atomic_path` (or the two one-liners on top of it):

1. the content is written to a temporary file in the *same directory* (``.NAME.tmp-PID``), so the final
   rename never crosses file systems;
2. the temporary file is flushed and ``fsync``-ed: its bytes are on disk before it gets the real name;
3. ``os.replace`` gives it the real name, atomically on POSIX: a reader sees the old file or the new one,
   never half of one.

When any step fails with an ``OSError`` (``ENOSPC`` disk full, ``EDQUOT``, ``EROFS``, ``EIO``...) or a
writer library reports one in its own exception type (safetensors' ``SafetensorError``), the temporary file
is removed, the previous file is left as it was, and :class:`~scratchlm.errors.FileWriteError` says in one
line which file could not be written and why. The CLI prints it as ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from scratchlm.errors import DataError, FileWriteError

_HINTS = {
    errno.ENOSPC: "free some disk space and run the command again",
    errno.EDQUOT: "free some space under your disk quota and run the command again",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.EACCES: "you may not write there; check the directory's permissions or write somewhere else",
    errno.EPERM: "you may not write there; check the directory's permissions or write somewhere else",
}


def failure_cause(exc: BaseException) -> str:
    """A failed write's cause in a few words: ``No space left on device`` (or the library's own line)."""
    if isinstance(exc, FileWriteError) and exc.__cause__ is not None:
        return failure_cause(exc.__cause__)
    if isinstance(exc, OSError) and exc.errno is not None:
        return os.strerror(exc.errno)
    text = str(exc).splitlines()[0] if str(exc) else "write failed"  # e.g. SafetensorError(IoError(...))
    return f"{type(exc).__name__}: {text}"


def write_error(path: str | os.PathLike, exc: BaseException) -> FileWriteError:
    """The one-line error for a failed write of ``path``: the file, the cause and what to do."""
    errno_ = exc.errno if isinstance(exc, OSError) else None
    hint = _HINTS.get(errno_, "check the free disk space and the path, then run the command again")
    free = _free_bytes(Path(path).parent)
    where = f" ({free / 2**20:,.0f} MiB free there)" if free is not None else ""
    return FileWriteError(
        f"could not write {path}: {failure_cause(exc)}{where}; {hint}; the previous file is unchanged"
    )


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def is_write_failure(exc: BaseException) -> bool:
    """OSError, or a writer library's own error for an I/O failure: safetensors' SafetensorError, and the
    RuntimeError of torch.save's zip writer (``PytorchStreamWriter failed writing file ...``)."""
    if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
        return True
    return isinstance(exc, RuntimeError) and "PytorchStreamWriter failed" in str(exc)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s bytes to disk (raises OSError, e.g. ENOSPC on file systems that report it late)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends, fsync it and rename it to ``path``.

    For writers that take a file name (``safetensors.save_file``, ``torch.save``, ``fig.savefig``, a GGUF
    writer)::

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))

    On a write failure (OSError or SafetensorError) the temporary file is removed, ``path`` keeps its old
    content (or stays absent) and :class:`FileWriteError` names ``path`` and the cause. Other exceptions
    (bugs, Ctrl-C) also remove the temporary file and propagate unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_write_failure(e):
            raise write_error(path, e) from e
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def read_utf8(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file; a file that is not UTF-8 is a DataError naming it and the byte offset.

    (Python's own UnicodeDecodeError names neither the file nor the fix.)
    """
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); "
            "convert it to UTF-8 (e.g. `iconv -t UTF-8`)"
        ) from None
