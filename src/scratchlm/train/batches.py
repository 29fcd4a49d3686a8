"""Where batches come from and how a batch becomes a loss, for both model kinds.

- decoder LM (``model.arch=gpt``): :class:`~scratchlm.data.loader.TokenLoader` over the prepared shards;
  a batch is ``(x, y)``, both (B, T) long, and the loss is ``model(x, y)``.
- encoder-decoder (``model.arch=seq2seq``): :class:`~scratchlm.data.pairs.PairLoader` over the parallel
  files; a batch is a dict ``src, src_mask, tgt_in, targets`` and the loss is ``model(**batch)``.

Tokens counted for throughput and ``tokens seen`` are the predicted targets (``targets != -100``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Config
from scratchlm.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]


def batch_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the model on one batch (scalar)."""
    if isinstance(batch, dict):
        src, tgt_in, targets = batch["src"], batch["tgt_in"], batch["targets"]
        return model(src, tgt_in, targets, src_mask=batch.get("src_mask"))[1]
    x, y = batch
    return model(x, y)[1]


def batch_forward(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, T, V), mean loss, targets (B, T) with -100 = not predicted) of the model on one batch."""
    if isinstance(batch, dict):
        src, tgt_in, targets = batch["src"], batch["tgt_in"], batch["targets"]
        logits, loss = model(src, tgt_in, targets, src_mask=batch.get("src_mask"))
        return logits, loss, targets
    x, y = batch
    logits, loss = model(x, y)
    return logits, loss, y


def batch_tokens(batch: Batch) -> int:
    """Number of predicted tokens in a batch (padding and masked targets excluded)."""
    if isinstance(batch, dict):
        return int((batch["targets"] != -100).sum())
    n_targets = getattr(batch, "n_targets", None)  # chat batches count theirs on the CPU (data/chat.py)
    return batch[1].numel() if n_targets is None else n_targets


def make_loaders(
    cfg: Config,
    tokenizer: Any,
    data_dir: Path | None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Any, Callable[[], Any] | None]:
    """(train loader, factory of a fresh sequential validation loader or None when there is no val split).

    Every loader has ``next_batch()``, ``state_dict()`` and ``load_state_dict()``. Both read the share of
    ``rank``: in sequential order (``data.loader=sequential``, validation, seq2seq) its batch ``j`` is batch
    ``j * world_size + rank`` of the one-process order (within an epoch), so the ranks together read what
    one process would; random windows are drawn from the rank's own 1/world_size of the starts.
    """
    tc, dc = cfg.train, cfg.data
    if cfg.model.arch == "seq2seq":
        return _pair_loaders(cfg, tokenizer, device, rank, world_size)
    if dc.stream:
        from scratchlm.data.stream import stream_loaders

        return stream_loaders(cfg, tokenizer, device, rank, world_size)
    if cfg.data.format == "chat":  # conversations, loss on the assistant's tokens (data/chat.py)
        from scratchlm.data.chat import build_chat_loaders

        return build_chat_loaders(cfg, tokenizer, device, rank, world_size)
    if data_dir is None:
        raise ConfigError("model.arch=gpt needs prepared shards (data.data_dir); run scratchlm data prepare")
    from scratchlm.data.loader import TokenLoader

    T = cfg.model.context_length
    train = TokenLoader(
        data_dir,
        split="train",
        batch_size=tc.batch_size,
        context_length=T,
        mode=dc.loader,
        doc_aligned=dc.doc_aligned,
        seed=tc.seed,
        rank=rank,
        world_size=world_size,
        device=device,
        vocab_size=cfg.model.vocab_size or None,  # ids the embedding has no row for: a DataError up front
    )
    if not _has_val(data_dir):
        return train, None

    def val_loader():
        return TokenLoader(
            data_dir,
            split="val",
            batch_size=tc.batch_size,
            context_length=T,
            mode="sequential",
            doc_aligned=False,
            seed=tc.seed,
            rank=rank,
            world_size=world_size,
            device=device,
            vocab_size=cfg.model.vocab_size or None,
        )

    return train, val_loader


def micro_steps(cfg: Config, world_size: int = 1) -> int:
    """Micro-batches per optimizer step on each rank: tokens_per_step / (batch_size * context * world_size).

    1 if tokens_per_step is unset (one micro-batch per rank). ConfigError if they do not divide among ranks.
    """
    tc = cfg.train
    if tc.tokens_per_step is None:
        return 1
    micro = tc.batch_size * cfg.model.context_length
    total = tc.tokens_per_step // micro
    if total % world_size:
        raise ConfigError(
            f"train.tokens_per_step={tc.tokens_per_step} is {total} micro-batches of batch_size*"
            f"context_length={micro}, which do not divide among {world_size} ranks; use a multiple "
            f"of {micro * world_size}"
        )
    return total // world_size


def apply_token_budget(cfg: Config, world_size: int = 1, verbose: bool = True) -> Config:
    """``cfg`` with ``train.max_steps`` set by the token budget ``data.max_tokens`` (if set).

    A step trains ``tokens_per_step = batch_size * context_length * micro-batches * world_size`` tokens, so
    the run takes ``max_tokens // tokens_per_step`` steps (replacing ``train.max_steps``), having seen
    ``max_tokens`` tokens exactly when it divides (never more); the lr schedule runs over those steps.
    """
    budget = cfg.data.max_tokens
    if budget is None:
        return cfg
    per_step = cfg.train.batch_size * cfg.model.context_length * micro_steps(cfg, world_size) * world_size
    steps = budget // per_step
    if steps < 1:
        raise ConfigError(
            f"data.max_tokens={budget} is less than one step of {per_step} tokens "
            f"(batch_size * context_length * micro-batches * ranks); raise it or shrink the batch"
        )
    if verbose:
        exact = (
            "" if steps * per_step == budget else f" (the {budget - steps * per_step} left over are not read)"
        )
        print(f"token budget: data.max_tokens={budget:,} = {steps:,} steps of {per_step:,} tokens{exact}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))


def shard_meta(data_dir: Path | None) -> dict[str, Any] | None:
    """The shard directory's meta.json (token and byte counts for bits per byte), or None without shards."""
    if data_dir is None:
        return None
    from scratchlm.data.shards import read_meta

    return read_meta(data_dir)


def _has_val(data_dir: Path) -> bool:
    from scratchlm.data.shards import read_meta

    return read_meta(data_dir)["splits"]["val"]["tokens"] > 1


def _pair_loaders(cfg: Config, tokenizer: Any, device: torch.device, rank: int, world_size: int):
    from scratchlm.data.pairs import build_pair_loaders

    return build_pair_loaders(
        cfg.data,
        tokenizer,
        cfg.train.batch_size,
        cfg.model.context_length,
        cfg.train.seed,
        device,
        rank=rank,
        world_size=world_size,
        pad_to=8 if cfg.train.compile else 1,  # few shapes for a compiled model, least padding otherwise
    )
