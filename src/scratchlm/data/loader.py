"""TokenLoader: batches of (x, y) windows from memory-mapped shards, resumable and rank-aware.

A *window* is ``T + 1`` consecutive tokens of one shard starting at a *start*; ``x = w[:-1]``,
``y = w[1:]``, both (B, T) int64. Which starts exist depends on the mode:

* ``mode="random"`` (nanoGPT): any offset; each batch draws B starts uniformly.
* ``mode="sequential"``: offsets ``0, T, 2T, ...`` of each shard, read in order, so an epoch reads every
  token once (the last ``< T`` tokens of a shard are skipped; ``remainder_batches`` scores them and the
  windows after the last full batch, for ``scratchlm eval``); then the next epoch starts over.
* ``doc_aligned=True``: starts are document starts (from the ``.idx`` files), plus ``T``-strided
  continuation points inside documents longer than ``T`` so that no text is lost. A row that starts in a
  short document runs on into the next ones (packing); it never starts mid-document otherwise.

Resume is exact and the state is a few integers: batch ``step`` of rank ``r`` is a pure function of
``(seed, rank, world_size, step)`` (random: ``numpy.random.default_rng([seed, rank, step])``; sequential: the
global batch index ``step * world_size + rank``). DDP: in sequential mode rank r takes every world_size-th
batch (disjoint, and together they cover every window of each full round); in random mode rank r draws
from its own contiguous 1/world_size of the starts.

Memory stays flat whatever the corpus size: shards are ``np.memmap``-ed per batch and dropped again, so the
pages read do not pile up in the resident set (nanoGPT does the same), and only document starts (8 bytes
per document, doc_aligned mode) are held in RAM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.data import shards
from scratchlm.errors import DataError

STATE_VERSION = 1


class TokenLoader:
    """(x, y) batches from a prepared directory; see the module docstring for modes and resume.

    ``vocab_size`` (optional): the model's embedding rows; DataError up front when the shards were prepared
    with a larger vocabulary (their ids would not fit the embedding).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        batch_size: int = 8,
        context_length: int = 256,
        *,
        mode: str = "random",
        doc_aligned: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        vocab_size: int | None = None,
    ):
        if mode not in ("random", "sequential"):
            raise DataError(f"loader mode must be random or sequential, got {mode!r}")
        if split not in shards.SPLITS:
            raise DataError(f"split must be one of {', '.join(shards.SPLITS)}, got {split!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if batch_size <= 0 or context_length <= 0:
            raise DataError(
                f"batch_size and context_length must be positive, got {batch_size}, {context_length}"
            )
        self.data_dir = Path(data_dir)
        self.meta = shards.read_meta(self.data_dir)  # also checks that every shard file has its size
        if vocab_size is not None:
            shards.check_vocab(self.meta, vocab_size, self.data_dir)
        self.split, self.mode, self.doc_aligned = split, mode, doc_aligned
        self.B, self.T = batch_size, context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.dtype = np.dtype(self.meta["dtype"])
        self.id_limit = int(self.meta["tokenizer"]["vocab_size"])  # every id of a batch is checked below it
        info = self.meta["splits"][split]
        self.shards = [s for s in info["shards"] if s["tokens"] > 0]
        self.num_tokens = int(info["tokens"])
        if self.num_tokens == 0:
            raise DataError(
                f"'{self.data_dir}' has no {split} tokens; prepare it with a validation split "
                f"(--val-fraction > 0 or --val-source)"
            )
        for s in self.shards:
            shards.open_shard(self.data_dir, s, self.dtype)  # size check now, not at batch 1000
        self._build_starts()
        self.num_starts = int(self._cum[-1]) if self._starts is None else len(self._starts)
        need = self.B * self.world_size if mode == "sequential" else self.world_size
        if self.num_starts < need:
            raise DataError(
                f"the {split} split of '{self.data_dir}' ({self.num_tokens:,} tokens) is too small "
                f"for batch_size={batch_size} x context_length={context_length} x "
                f"world_size={world_size}; use a smaller batch/context or more data"
            )
        self.step = 0  # batches returned by this rank so far

    def _build_starts(self) -> None:
        """Window starts: implicit per-shard counts (``_cum``, ``_stride``) or explicit arrays (doc_aligned)."""
        T = self.T
        sizes = np.array([s["tokens"] for s in self.shards], dtype=np.int64)
        self._starts = self._shard_of = None
        if not self.doc_aligned:
            self._stride = 1 if self.mode == "random" else T
            counts = np.maximum(sizes - T - 1, -1) // self._stride + 1  # starts with T+1 tokens left
            self._cum = np.concatenate(([0], np.cumsum(counts)))
            return
        starts, owner = [], []
        for i, (s, n) in enumerate(zip(self.shards, sizes)):
            doc = shards.read_doc_starts(self.data_dir, s)
            length = np.diff(np.append(doc, n))
            per_doc = np.maximum((length - 2) // T + 1, 1)  # continuation points inside long documents
            first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
            st = np.repeat(doc, per_doc) + T * (np.arange(per_doc.sum()) - first)
            st = st[st + T + 1 <= n]
            starts.append(st)
            owner.append(np.full(len(st), i, dtype=np.int32))
        self._starts, self._shard_of = np.concatenate(starts), np.concatenate(owner)
        self._cum = np.array([0, len(self._starts)])

    # ------------------------------------------------------------------------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank reads per epoch (sequential: a full pass; random: tokens / tokens per batch)."""
        if self.mode == "sequential":
            return self.num_starts // (self.B * self.world_size)
        return max(1, self.num_tokens // (self.B * self.T * self.world_size))

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def batch_starts(self, step: int) -> list[tuple[int, int]]:
        """The B (shard index, token offset) window starts of this rank's batch number ``step``."""
        if self.mode == "sequential":
            g = (step % self.batches_per_epoch) * self.world_size + self.rank
            k = g * self.B + np.arange(self.B)
        else:
            lo = self.rank * self.num_starts // self.world_size
            hi = (self.rank + 1) * self.num_starts // self.world_size
            k = np.random.default_rng([self.seed, self.rank, step]).integers(lo, hi, size=self.B)
        if self._starts is not None:
            return list(zip(self._shard_of[k].tolist(), self._starts[k].tolist()))
        shard = np.searchsorted(self._cum, k, side="right") - 1
        offset = (k - self._cum[shard]) * self._stride
        return list(zip(shard.tolist(), offset.tolist()))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64 on ``device``, y[i, t] = x[i, t + 1] (the next token). Advances the state."""
        starts = self.batch_starts(self.step)
        self.step += 1
        w = self._read_windows(starts, self.T)
        return self._to_device(w[:, :-1].contiguous(), w[:, 1:].contiguous())

    def remainder_windows(self) -> list[tuple[int, int, int, int]]:
        """The windows that score what one pass of full batches leaves out (sequential mode, one rank).

        One pass (:attr:`batches_per_epoch` batches) scores the targets of ``B * batches_per_epoch``
        T-strided windows. Left out are the windows after the last full batch (fewer than B) and, in each
        shard, its last targets (fewer than T). Returned as ``(shard, start, length, skip)``: x =
        ``tokens[start : start + length]``, y = the tokens one further, of which the first ``skip`` were
        scored already. A shard's last targets come in a window that ends at the shard's end, so they get
        the context a full window gives (a shard shorter than ``T + 1`` tokens is one shorter window). With
        the full batches, every target of the split (every token but the first of each shard) is scored once.
        """
        if self.mode != "sequential" or self.doc_aligned or self.world_size != 1:
            raise DataError("remainder_windows needs a sequential, not doc-aligned loader on one rank")
        T = self.T
        left = np.arange(self.batches_per_epoch * self.B, self.num_starts)
        shard = np.searchsorted(self._cum, left, side="right") - 1
        out = [(i, off, T, 0) for i, off in zip(shard.tolist(), ((left - self._cum[shard]) * T).tolist())]
        for i, s in enumerate(self.shards):
            n = int(s["tokens"])
            scored = int(self._cum[i + 1] - self._cum[i]) * T  # targets 1 .. scored are in full windows
            if n - 1 > scored:
                start = max(0, n - 1 - T)
                out.append((i, start, n - 1 - start, scored - start))  # targets start+1 .. n-1
        return out

    def remainder_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`remainder_windows` as (x, y) batches of at most B windows of one length, each (rows,
        length); the targets scored already are -100 (``ignore_index`` of cross_entropy)."""
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for i, start, length, skip in self.remainder_windows():
            by_length.setdefault(length, []).append((i, start, skip))
        for length, windows in by_length.items():
            for j in range(0, len(windows), self.B):
                group = windows[j : j + self.B]
                w = self._read_windows([(i, start) for i, start, _ in group], length)
                x, y = w[:, :-1].contiguous(), w[:, 1:].clone()
                for row, (_, _, skip) in enumerate(group):
                    y[row, :skip] = -100
                yield self._to_device(x, y)

    def _read_windows(self, starts: list[tuple[int, int]], length: int) -> torch.Tensor:
        """(len(starts), length + 1) int64: ``length + 1`` tokens of shard ``i`` from ``offset``, per start;
        every id checked against the vocabulary. Shards are opened for this call only (flat resident set)."""
        buf = np.empty((len(starts), length + 1), dtype=np.int64)
        maps: dict[int, np.memmap] = {}
        for row, (i, off) in enumerate(starts):
            if i not in maps:
                maps[i] = np.memmap(self.data_dir / self.shards[i]["file"], dtype=self.dtype, mode="r")
            window = maps[i][off : off + length + 1]
            shards.check_ids(window, self.id_limit, f"shard '{self.data_dir / self.shards[i]['file']}'")
            buf[row] = window
        del maps
        return torch.from_numpy(buf)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":
            return (
                x.pin_memory().to(self.device, non_blocking=True),
                y.pin_memory().to(self.device, non_blocking=True),
            )
        return x.to(self.device), y.to(self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ------------------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "mode": self.mode,
            "doc_aligned": self.doc_aligned,
            "batch_size": self.B,
            "context_length": self.T,
            "seed": self.seed,
            "world_size": self.world_size,
            "tokenizer": self.meta["tokenizer"]["fingerprint"],
            "source": self.meta["source"]["fingerprint"],
            "tokens": self.num_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: the loader's settings plus ``step`` (batches read by this rank)."""
        return {"version": STATE_VERSION, **self._identity(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off; DataError if it came from other data or settings."""
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state version {state.get('version')} is not {STATE_VERSION}; cannot resume"
            )
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise DataError(
                    f"cannot resume the data loader: {key} was {state.get(key)!r}, now {value!r}; "
                    f"resume with the same data and settings (or start a new run)"
                )
        self.step = int(state["step"])
