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


def param_counts(model: nn.Module) -> dict[str, int | bool]:
    """Parameters by kind, each shared tensor counted once: ``{"total", "embedding", "non_embedding", "tied"}``.

    ``embedding`` is every lookup table (``nn.Embedding``: token and learned position embeddings),
    ``non_embedding = total - embedding`` (Kaplan et al. 2020's N), and ``tied`` says whether a token
    embedding is also the output head's weight (GPT-2's ``lm_head.weight is wte.weight``). With tied weights
    the table is counted once, under embedding. (``model.num_params(non_embedding=True)``, the N of the 6N
    FLOPs rule, keeps a tied table: it is the head's matmul.)
    """
    params = {id(p): p.numel() for p in model.parameters()}
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    total = sum(params.values())
    embedding = sum(params[i] for i in tables if i in params)
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "tied": bool(tables & heads),
    }


def describe_params(model: nn.Module) -> str:
    """``"49,440 (11,264 embedding, tied to the output head; 38,176 non-embedding)"``: the parameter count
    with its labels right for tied weights (the dry run, the start-up summary)."""
    c = param_counts(model)
    tied = ", tied to the output head" if c["tied"] else ""
    return f"{c['total']:,} ({c['embedding']:,} embedding{tied}; {c['non_embedding']:,} non-embedding)"


__all__ = ["build_model", "describe_params", "param_counts"]
