"""Checkpoints that survive crashes: atomic directories, a LATEST pointer, keep-last-K, best/.

Layout (see ARCHITECTURE.md)::

    run_dir/checkpoints/step_00001000/{model.safetensors, optimizer.pt, state.json}
    run_dir/checkpoints/LATEST          name of the newest complete checkpoint ("step_00001000")
    run_dir/best/                       the best-by-validation checkpoint (hard links or copies)

Why it cannot be half-written: a checkpoint is written into ``checkpoints/.tmp-step_...``, every file is
fsynced, ``state.json`` (written last) records each file's size and sha256, and only then is the directory
renamed to ``step_XXXXXXXX`` and ``LATEST`` replaced with ``os.replace`` (atomic on POSIX). A crash or a
failed write (disk full) at any point leaves the previous checkpoint and ``LATEST`` untouched.

Why it cannot be silently wrong: :func:`find_checkpoint` verifies sizes and hashes; a truncated or corrupt
file is reported by name (a warning) and the previous complete checkpoint is used. If checkpoints exist but
none is complete, it raises :class:`CheckpointError` rather than letting the trainer start from scratch.

Nothing is unpickled: weights are safetensors, optimizer state is read with ``torch.load(weights_only=True)``,
everything else is JSON.

Writing in the background (:class:`BackgroundWriter`, ``train.background_checkpoints``): the trainer copies
the weights and optimizer state (:func:`snapshot`, a copy in host memory) and a helper thread serialises,
hashes, fsyncs and renames them while training goes on. It writes what a synchronous save writes (tested:
the weights file byte for byte, the optimizer state tensor for tensor), one write runs at a time, and a
failed write is raised at the next save or at the end. Only one-process runs do this; ranks of a distributed run write
synchronously (rank 0 writes and every rank learns the result at once).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from scratchlm import fileio
from scratchlm.errors import CheckpointError, FileWriteError

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
BEST = "best"
FILES = ("model.safetensors", "optimizer.pt")


# ----------------------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module | dict[str, torch.Tensor],
    optimizer_state: Any,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``checkpoints/step_{step:08d}`` atomically, point LATEST at it and prune to ``keep_last``.

    ``model`` is the unwrapped module (never a compiled or DDP wrapper) or its full state dict (e.g.
    gathered from FSDP shards; tied names sharing one tensor); ``optimizer_state`` holds tensors and plain
    Python only; ``state`` must be JSON-serialisable. Returns the checkpoint directory.
    Raises :class:`CheckpointError` if the write fails; the previous checkpoint and LATEST are then intact.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    final = root / name
    writing = tmp  # the file being written, named in the error of a failed write
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        writing = final / "model.safetensors"
        save_weights(model if isinstance(model, dict) else model.state_dict(), tmp / "model.safetensors")
        writing = final / "optimizer.pt"
        torch.save(optimizer_state, tmp / "optimizer.pt")
        files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in FILES}
        writing = final / "state.json"
        _write_json(tmp / "state.json", {**state, "step": step, "files": files})
        for f in (*FILES, "state.json"):
            writing = final / f
            _fsync(tmp / f)
        writing = final
        _fsync(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, then drop the old one
            old = root / f".old-{name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync(root)
        writing = root / LATEST
        fileio.write_text(root / LATEST, name + "\n")
    except Exception as e:  # OSError, or safetensors' SafetensorError around one (disk full)
        if not fileio.is_write_failure(e) and not isinstance(e, FileWriteError):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint file {writing}: {fileio.failure_cause(e)}; the previous checkpoint "
            f"named in {root / LATEST} is intact: free disk space and resume"
        ) from e
    _prune(root, keep_last, keep=name)
    return final


def snapshot(tree: Any) -> Any:
    """A host-memory copy of ``tree`` (dicts, lists and tuples of tensors and plain values) that later in-place
    updates of the originals cannot reach (a GPU run keeps no second copy on the device). Every tensor is
    copied once per storage view, so tensors that were the same view (tied weights under two names) stay
    one tensor and :func:`save_weights` still stores them once."""
    clones: dict[tuple, torch.Tensor] = {}

    def copy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.shape, x.stride(), x.dtype)
            if key not in clones:
                clones[key] = x.detach().to("cpu", copy=True)
            return clones[key]
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(copy(v) for v in x)
        return x  # numbers, strings, None: immutable

    return copy(tree)


class BackgroundWriter:
    """Runs one checkpoint write at a time on a helper thread, so that training goes on meanwhile.

    ``submit(write)`` first waits for the write before it (one in flight, so snapshots never pile up in
    memory) and raises that write's error, if any; ``wait()`` does the same and returns the last path.
    The callable must only touch its own snapshot (:func:`snapshot`), never live tensors.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Path | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], Path]) -> None:
        self.wait()

        def run() -> None:
            try:
                self._result = write()
            except BaseException as e:  # raised in the training thread by the next wait()
                self._error = e

        # not a daemon: an interpreter that exits still lets a started write finish (or it stays a .tmp dir)
        self._thread = threading.Thread(target=run, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> Path | None:
        """Block until the write in flight is done; raise its error, else return its checkpoint path."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._result


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of ``weights``, as ``safetensors.torch.save_model`` writes it.

    A tensor under several names (tied weights) is stored once, under the first name in sorted order, and
    each dropped name is recorded in the metadata as ``{dropped: kept}`` (:func:`load_model_state` restores it).
    """
    weights, metadata = dict(weights), {}
    kept: dict[tuple, str] = {}
    for name in sorted(weights):
        t = weights[name]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in kept:
            metadata[name] = kept[key]
            del weights[name]
        else:
            kept.setdefault(key, name)
    save_file(weights, str(path), metadata=metadata or None)


def save_best(run_dir: Path, ckpt_dir: Path) -> Path:
    """Make ``run_dir/best`` a copy of ``ckpt_dir`` (hard links where possible: files are never rewritten).

    Raises :class:`CheckpointError` if that fails (e.g. a full disk); the previous ``best/`` is then intact.
    """
    run_dir = Path(run_dir)
    best, tmp, old = run_dir / BEST, run_dir / f".{BEST}.tmp", run_dir / f".{BEST}.old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in (*FILES, "state.json"):
            try:
                os.link(ckpt_dir / f, tmp / f)
            except OSError:
                shutil.copy2(ckpt_dir / f, tmp / f)
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            best.rename(old)
        try:
            tmp.rename(best)
        except OSError:
            if old.exists() and not best.exists():
                old.rename(best)  # put the previous best back
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not update {best} from {ckpt_dir} ({e}); the previous best checkpoint is intact"
        ) from e
    shutil.rmtree(old, ignore_errors=True)
    return best


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never ``keep``) and stale temporary dirs."""
    steps = sorted(_step_dirs(root), key=lambda p: p.name)
    for p in steps[:-keep_last] if keep_last > 0 else steps:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# finding and loading


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """The newest complete checkpoint (``latest``) or ``run_dir/best`` (``best``; falls back to latest).

    Falls back past corrupt or truncated checkpoints with a warning naming the bad file. Raises
    :class:`CheckpointError` when the run has no checkpoint, or has some but none is complete.
    """
    run_dir = Path(run_dir)
    if which not in ("latest", "best"):
        raise CheckpointError(f"which={which!r} must be 'latest' or 'best'")
    best_errors = []
    if which == "best":
        for cand in (run_dir / BEST, run_dir / f".{BEST}.old"):
            if cand.is_dir():
                try:
                    verify_checkpoint(cand)
                    return cand
                except CheckpointError as e:
                    best_errors.append(str(e))
    try:
        found = latest_checkpoint(run_dir)
    except CheckpointError as e:
        raise CheckpointError("; ".join([*best_errors, str(e)])) from None
    for error in best_errors:
        warnings.warn(f"{error}; using the latest checkpoint instead", stacklevel=2)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {run_dir / CHECKPOINTS}; train the run first (scratchlm train)"
        )
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Like :func:`find_checkpoint` (``latest``) but returns None when the run has no checkpoint at all."""
    root = Path(run_dir) / CHECKPOINTS
    candidates = sorted(_step_dirs(root), key=lambda p: p.name, reverse=True)
    pointer = root / LATEST
    if pointer.exists():
        name = _read_head(pointer).strip()
        target = root / name
        if target in candidates:  # only a step_NNNNNNNN directory itself (not 'step_1/..', not a path out)
            candidates.remove(target)
            candidates.insert(0, target)
        else:
            warnings.warn(
                f"{pointer} is corrupt or truncated (names {name!r}, which is not a checkpoint); "
                "falling back to the newest complete checkpoint",
                stacklevel=3,
            )
    errors = []
    for cand in candidates:
        try:
            verify_checkpoint(cand)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        for error in errors:  # said only when an older checkpoint is used instead (else the error says it)
            warnings.warn(f"{error}; falling back to the previous checkpoint", stacklevel=3)
        return cand
    if errors:
        raise CheckpointError(
            f"no complete checkpoint in {root}: {'; '.join(errors)} (the files are left as they are; "
            "start a new run with another train.name to train again)"
        )
    return None


def verify_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Check that state.json parses and every file has its recorded size and sha256; returns the state."""
    state = read_state(ckpt_dir)
    for f, info in state.get("files", {}).items():
        path = ckpt_dir / f
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is truncated ({path.stat().st_size} of {info['bytes']} bytes)"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt (sha256 mismatch)")
    return state


def read_state(ckpt_dir: Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt (not valid JSON)") from None
    if not isinstance(state, dict) or "step" not in state or "files" not in state:
        raise CheckpointError(f"checkpoint file {path} is incomplete (no step/files)")
    return state


def load_model_state(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint, with tied names restored (ready for ``model.load_state_dict``).

    ``safetensors.torch.save_model`` stores a tied tensor once and records the dropped name in the file's
    metadata (``{dropped: kept}``); we alias it back so a strict ``load_state_dict`` works.
    """
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        sd = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"checkpoint file {path} cannot be read ({e})") from None
    for dropped, kept in metadata.items():
        if dropped not in sd and kept in sd:
            sd[dropped] = sd[kept]
    return sd


def load_optimizer_file(ckpt_dir: Path) -> Any:
    path = Path(ckpt_dir) / "optimizer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused it: a pickle of objects, not tensors
        raise CheckpointError(
            f"checkpoint file {path} holds pickled objects, not tensors; it was not loaded (never unpickle "
            "a file you did not write): restore it from the run that made it"
        ) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({str(e).splitlines()[0]})") from None


# ----------------------------------------------------------------------------------------------------------
# RNG states and versions (JSON-able, for state.json)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as JSON-able values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in states["cuda"]])


def library_versions() -> dict[str, str]:
    import scratchlm

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scratchlm": getattr(scratchlm, "__version__", "?"),
    }


# ----------------------------------------------------------------------------------------------------------
# file helpers


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]


def _read_head(path: Path, limit: int = 256) -> str:
    """The first ``limit`` bytes of a small text file as text ('' when it is not a readable file)."""
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:  # a directory, no permission: treated as a corrupt pointer
        return ""


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk. A file's error raises (ENOSPC or EIO here means its bytes
    may not be on disk, so the checkpoint must not replace the previous one); a directory's EINVAL or
    ENOTSUP, from file systems that cannot fsync directories, is ignored."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.write("\n")
