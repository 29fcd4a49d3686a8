"""Memory savers applied to a model from outside (torchtitan style): activation checkpointing and the
output layer's loss in row chunks. Neither changes parameter names, so checkpoints stay interchangeable.

Activation checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory cost"): each block
keeps only its input for the backward and recomputes its activations there, trading one more forward
of the blocks (~1/3 more compute) for activation memory that no longer grows with the number of layers
times the block's internals; the larger batches it admits often win that back. torch.utils.checkpoint with
``use_reentrant=False`` restores the RNG state for the recomputation, so dropout masks and gradients are
the same as without it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from scratchlm.config import TrainConfig
from scratchlm.errors import ConfigError


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
