"""One optimizer step, and the batches of the next step prepared while the device runs this one.

    train_step:  k micro-batches (forward, loss / k, backward) -> clip (pre-clip norm) -> optimizer step
    Prefetcher:  the k micro-batches of step s+1 are read (and copied to the GPU, pinned, non_blocking)
                 while step s runs; the position it saves in checkpoints is that of the batches consumed

Host synchronisation: the step waits for the device once, to read the mean loss and the gradient norm
together (a non-finite one skips the update, so this cannot wait longer), after every kernel of the
forward, backward and clipping has been queued and after the next step's batches were prepared.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from scratchlm.device import autocast
from scratchlm.train import distributed as dist
from scratchlm.train.batches import Batch, batch_loss


def train_step(
    forward_model: torch.nn.Module,
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batches: list[Batch],
    *,
    grad_clip: float,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
    before_sync: Callable[[], Any] | None = None,
    cuda_graphs: bool = False,
) -> tuple[float, float]:
    """One optimizer step over the micro-batches; returns (mean loss, global grad norm before clipping).

    ``forward_model`` may be the compiled, DDP or FSDP wrapper of ``model``; the loss is the mean over
    micro-batches and ranks. A non-finite loss or gradient norm skips the update (gradients are zeroed) and
    is returned as such for the caller to act on. ``before_sync`` (e.g. ``Prefetcher.fill``) runs once the
    device has all of the step's work queued, just before the step waits for it. ``cuda_graphs``: the model
    was compiled in a mode that replays CUDA graphs, whose outputs live in memory the next replay reuses;
    each micro-batch starts a new graph step (``torch.compiler.cudagraph_mark_step_begin``) and its loss is
    copied into ``total`` before the next one runs.
    """
    k = len(batches)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with dist.gradient_sync(forward_model, enabled=i == k - 1):  # reduce over ranks once per step
            with autocast(device, dtype):
                loss = batch_loss(forward_model, batch)
            scaled = loss / k
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().float()
    mean_loss = dist.mean_over_ranks(total / k)  # the same on every rank: they skip a NaN together
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    norm = dist.clip_grad_norm(list(model.parameters()), max_norm)
    if before_sync is not None:
        before_sync()
    loss_value, norm_value = torch.stack([mean_loss, norm.to(mean_loss)]).tolist()  # the one wait
    if math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler is not None):
        for opt in optimizers:  # with a scaler, an inf norm is an fp16 overflow: scaler.step skips it
            scaler.step(opt) if scaler is not None else opt.step()
        if scaler is not None:
            scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return loss_value, norm_value


# torch.compile modes that capture and replay CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class Prefetcher:
    """Hands out the micro-batches of one step at a time, reading the next step's ahead on ``fill()``.

    ``state_dict()`` is the loader's position after the batches handed out so far (not after the ones read
    ahead), so a checkpoint resumes at the first batch no step has used, exactly as without prefetching.
    """

    def __init__(self, loader: Any, per_step: int):
        self.loader, self.per_step = loader, per_step
        self._ahead: tuple[list[Batch], dict] | None = None  # (next step's batches, position after them)
        self._position: dict | None = None  # position after the last step handed out

    def fill(self) -> None:
        """Read the next step's batches now, if not read yet (the loader copies them to the device)."""
        if self._ahead is None:
            batches = [self.loader.next_batch() for _ in range(self.per_step)]
            self._ahead = (batches, self.loader.state_dict())

    def next_step(self) -> list[Batch]:
        """The micro-batches of the next step (read now if ``fill`` was not called)."""
        self.fill()
        batches, self._position = self._ahead
        self._ahead = None
        return batches

    def state_dict(self) -> dict:
        return self._position if self._position is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._ahead, self._position = None, None
