"""Memory savers applied to a model from outside (torchtitan style): activation checkpointing and the
output layer's loss in row chunks (neither changes parameter names, so checkpoints stay interchangeable);
and ``train.auto_micro_batch``, which splits a step that does not fit into the largest micro-batches that do.

Activation checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory cost"): each block
keeps only its input for the backward and recomputes its activations there, trading one more forward
of the blocks (~1/3 more compute) for activation memory that no longer grows with the number of layers
times the block's internals; the larger batches it admits often win that back. torch.utils.checkpoint with
``use_reentrant=False`` restores the RNG state for the recomputation, so dropout masks and gradients are
the same as without it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from scratchlm.config import Config, TrainConfig
from scratchlm.errors import ConfigError
from scratchlm.train import distributed as dist


def checkpointed_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks of a GPT (``blocks``) or an encoder-decoder (``encoder``, ``decoder``)."""
    blocks: list[nn.Module] = []
    for name in ("blocks", "encoder", "decoder"):
        stack = getattr(model, name, None)
        if isinstance(stack, nn.ModuleList):
            blocks.extend(stack)
    return blocks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Make every block recompute its activations in the backward; returns how many blocks.

    The block's ``forward`` is wrapped on the instance: its parameters, names and state dict do not change.
    Without gradients (evaluation, generation) the block runs as before.
    """
    blocks = checkpointed_blocks(model)
    for block in blocks:
        forward = block.forward

        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = run
    return len(blocks)


def apply_memory_options(model: nn.Module, tc: TrainConfig) -> None:
    """``train.activation_checkpointing`` and ``train.loss_chunk_rows`` on a freshly built model."""
    if tc.activation_checkpointing:
        apply_activation_checkpointing(model)
    if tc.loss_chunk_rows:
        if not hasattr(model, "loss_chunk_rows"):
            raise ConfigError(
                "train.loss_chunk_rows works with model.arch=gpt only; set train.loss_chunk_rows=0"
            )
        model.loss_chunk_rows = tc.loss_chunk_rows


# ----------------------------------------------------------------------------------------------------------
# train.auto_micro_batch: the largest micro-batch that fits


def step_fits(cfg: Config, rows: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one training step (forward, backward, optimizer with its state) on ``rows`` x context tokens
    fits in the device's memory, tried on a throwaway model (eager: a compiled step needs no more)."""
    from scratchlm.model import build_model
    from scratchlm.train.optim import build_optimizers
    from scratchlm.train.step import train_step

    m = cfg.model
    model = opts = None
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model = build_model(m).to(device)
            apply_memory_options(model, cfg.train)
            opts = build_optimizers(model, cfg.train)
            ids = torch.randint(0, m.vocab_size, (rows, m.context_length + 1), device=device)
            batch = (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
            train_step(model, model, opts, [batch], grad_clip=1.0, device=device, dtype=dtype)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del model, opts
        if device.type == "cuda":
            torch.cuda.empty_cache()


def fit_micro_batch(cfg: Config, device: torch.device, dtype: torch.dtype, world_size: int = 1) -> Config:
    """``cfg`` with the largest micro-batch that fits: a divisor of the rows each rank trains on per step.

    The rows per step and rank, R = tokens_per_step / (context * world_size) (or batch_size), stay what
    they were: when R rows do not fit at once, ``batch_size`` becomes the largest divisor of R whose step
    fits (tried from R down) and ``tokens_per_step`` keeps the step's size, so gradient accumulation makes the
    step the same as one on R rows. CUDA only (elsewhere ``cfg`` is returned as it is); a ConfigError when not
    even one row fits.
    """
    tc, T = cfg.train, cfg.model.context_length
    if device.type != "cuda" or cfg.model.arch != "gpt":
        print(f"train.auto_micro_batch: applies to GPT models on CUDA only; batch_size stays {tc.batch_size}")
        return cfg
    rows = tc.tokens_per_step // (T * world_size) if tc.tokens_per_step else tc.batch_size
    b = next((d for d in range(rows, 0, -1) if rows % d == 0 and step_fits(cfg, d, device, dtype)), 0)
    if world_size > 1:  # every rank must split the same way: the smallest choice (also a divisor of rows)
        b = min(dist.all_gather_objects(b))
    if b > 0:
        print(f"train.auto_micro_batch: micro-batches of {b} rows, {rows // b} per step and rank")
        new = dataclasses.replace(tc, batch_size=b, tokens_per_step=rows * T * world_size)
        return dataclasses.replace(cfg, train=new)
    raise ConfigError(
        f"train.auto_micro_batch: not even one row of {T} tokens fits in {device}'s memory; lower "
        "model.context_length or the model size, or set train.activation_checkpointing=true"
    )
