"""Batch sampling as a course writes it: random windows of a token array (nanoGPT's and CS336's get_batch)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch


def get_batch(
    dataset: npt.NDArray,
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    rng: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B random windows of T + 1 consecutive tokens: x = w[:-1], y = w[1:] (y is x shifted by one).

    dataset: 1-D integer array of n token ids (a ``np.memmap`` of a shard works: only the windows are read).
    Starts are drawn uniformly from 0 .. n - T - 1 (every start that leaves T + 1 tokens), with ``rng``
    (default: a fresh ``np.random.default_rng()``) -> x, y (B, T) int64 on ``device``.

    With ``rng = np.random.default_rng([seed, 0, step])`` this is batch ``step`` of the fast
    :class:`scratchlm.data.loader.TokenLoader` (random mode, one shard, one process): tests/reference.
    """
    n = len(dataset)
    if dataset.ndim != 1 or n < context_length + 1:
        raise ValueError(
            f"get_batch: need a 1-D array of at least context_length + 1 = {context_length + 1} tokens, "
            f"got shape {dataset.shape}"
        )
    rng = np.random.default_rng() if rng is None else rng
    starts = rng.integers(0, n - context_length, size=batch_size)  # (B,), high end excluded
    windows = np.stack([np.asarray(dataset[s : s + context_length + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(windows)  # (B, T + 1)
    return w[:, :-1].to(device), w[:, 1:].to(device)
