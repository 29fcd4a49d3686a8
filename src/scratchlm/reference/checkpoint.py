"""Save and load a training checkpoint as a course writes it: one file, tensors and plain Python only.

    save_checkpoint(model, optimizer, iteration, out)   -> out holds {"model", "optimizer", "iteration"}
    load_checkpoint(src, model, optimizer) -> iteration  (model and optimizer restored in place)

The file is written with ``torch.save`` but holds only state dicts (tensors, numbers, strings, lists and
dicts) and is read back with ``torch.load(weights_only=True)``, which refuses any other object: loading a
checkpoint never runs code from it (a plain pickle would). The fast trainer's checkpoints
(:mod:`scratchlm.train.checkpoint`) are directories with safetensors weights, RNG and data-loader state,
written atomically; this is the one-screen version of the same idea.
"""

from __future__ import annotations

import os
from typing import IO

import torch
import torch.nn as nn


def save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, out: str | os.PathLike | IO[bytes]
) -> None:
    """Write the model's and optimizer's state dicts and the iteration number to ``out`` (a path or file)."""
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": int(iteration)}, out
    )


def load_checkpoint(
    src: str | os.PathLike | IO[bytes], model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Restore ``model`` (strictly: same parameter names and shapes) and ``optimizer`` from ``src``; returns
    the saved iteration. Raises ``ValueError`` naming the file when it is not such a checkpoint."""
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a truncated or foreign file
        raise ValueError(f"{src}: not a tensors-only checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "iteration"} <= ckpt.keys():
        raise ValueError(f"{src}: not a checkpoint of save_checkpoint (needs model, optimizer, iteration)")
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return int(ckpt["iteration"])
