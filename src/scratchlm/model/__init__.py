"""Models: the decoder-only GPT (GPT-2 and Llama styles) and the encoder-decoder Transformer.

from scratchlm.model import build_model
model = build_model(cfg.model)          # GPT or Seq2Seq, by cfg.arch
"""

from __future__ import annotations

import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised GPT (cfg.arch == "gpt") or Seq2Seq (cfg.arch == "seq2seq"), on the CPU in fp32.

    cfg.impl == "reference": the same model (same weights for the same seed) computed by the hand-written
    pieces of scratchlm.reference.
    """
    model = _build(cfg)
    if cfg.impl == "reference":
        from scratchlm.reference import use_reference

        use_reference(model)
    return model


def _build(cfg: ModelConfig) -> nn.Module:
    if cfg.vocab_size <= 0:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size}: set it (or let the pipeline take it from the tokenizer)"
        )
    if cfg.arch == "seq2seq":
        from scratchlm.model.seq2seq import Seq2Seq

        return Seq2Seq(cfg)
    if cfg.arch != "gpt":
        raise ConfigError(f"model.arch={cfg.arch!r} is not one of gpt, seq2seq")
    from scratchlm.model.gpt import GPT

    return GPT(cfg)


__all__ = ["build_model"]
