"""Config validation: every value checked once, after defaults, preset, YAML and overrides are merged.

    load_config(...) -> Config(...) -> validate(cfg)   # ConfigError naming the key, the value and the fix

Choices (``_CHOICES``), ranges (``>= 1 or None``), finiteness, divisibility (``d_model % n_head``) and the
combinations that cannot work together (``model.impl=reference`` with the fused chunked loss, LoRA with
checkpoint averaging, ...). Split from config.py, which defines the dataclasses and how values are read.
"""

from __future__ import annotations

import math
import typing
from typing import Any

from scratchlm.config import _SECTION_TYPES, MAX_STREAM_WORKERS, SECTIONS, Config, _closest, _hints
from scratchlm.errors import ConfigError
from scratchlm.naming import check_run_name

_CHOICES = {
    "model.arch": ("gpt", "seq2seq"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "model.pos": ("learned", "sinusoidal", "rope", "none"),
    "model.rope_style": ("half", "interleaved"),
    "model.mlp": ("gelu_tanh", "gelu", "swiglu", "relu2", "relu"),
    "model.attention": ("sdpa", "sdpa_cudnn", "manual", "flash_triton", "auto"),
    "model.impl": ("fast", "reference"),
    "tokenizer.kind": ("bpe", "char", "gpt2"),
    "tokenizer.pattern": ("gpt2", "gpt4"),
    "data.loader": ("random", "sequential"),
    "data.format": ("text", "chat"),
    "train.dtype": ("auto", "float32", "bfloat16", "float16"),
    "train.optimizer": ("adamw", "muon", "adamw_reference", "muon_reference"),
    "train.schedule": ("cosine", "wsd", "constant", "noam"),
    "eval.metric": ("loss", "bleu"),
    "train.schedule_clock": ("steps", "time"),
    "train.compile_mode": ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"),
    "train.resume": ("auto", "never"),
    "train.parallel": ("ddp", "fsdp", "zero1"),
}


def _at_least(value: int | None, low: int) -> bool:
    """None (the field's "off" / default) or ``value >= low``."""
    return value is None or value >= low


def validate(cfg: Config) -> None:
    """Check values (choices, ranges, divisibility) once, with errors that name the key."""
    for key, choices in _CHOICES.items():
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        if value not in choices:
            hint = _closest(str(value), list(choices))  # the list is in the message already: only a guess
            raise ConfigError(
                f"{key}={value!r} is not one of {', '.join(choices)}{hint if 'did you mean' in hint else ''}"
            )
    # non-finite floats first: inf passes every `> 0` below, and nan is better named as such than as a range
    for sec in SECTIONS:
        for name, tp in _hints(_SECTION_TYPES[sec]).items():
            value = getattr(getattr(cfg, sec), name)
            if (
                (tp is float or float in typing.get_args(tp))
                and value is not None
                and not math.isfinite(value)
            ):
                raise ConfigError(f"{sec}.{name} must be a finite number, got {value}")
    m, t, e = cfg.model, cfg.train, cfg.eval
    positive = {
        "model.n_layer": m.n_layer,
        "model.n_head": m.n_head,
        "model.d_model": m.d_model,
        "model.context_length": m.context_length,
        "train.batch_size": t.batch_size,
        "train.max_steps": t.max_steps,
        "eval.interval": cfg.eval.interval,
        "train.log_interval": t.log_interval,
        "train.ckpt_interval": t.ckpt_interval,
        "tokenizer.vocab_size": cfg.tokenizer.vocab_size,
        "eval.batches": cfg.eval.batches,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_head={m.n_head}")
    n_kv = m.n_kv_head or m.n_head
    if n_kv <= 0 or m.n_head % n_kv:
        raise ConfigError(f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head}")
    if m.pos == "rope" and (m.d_model // m.n_head) % 2:
        raise ConfigError(
            f"model.pos=rope needs an even head size, got d_model/n_head={m.d_model // m.n_head}"
        )
    # (key, value, valid range as the message says it, whether the value is in it), checked in order
    ranges: list[tuple[str, Any, str, bool]] = [
        ("model.vocab_size", m.vocab_size, ">= 0 (0 = from the tokenizer)", m.vocab_size >= 0),
        ("model.n_encoder_layer", m.n_encoder_layer, ">= 1 or None", _at_least(m.n_encoder_layer, 1)),
        ("model.n_kv_head", m.n_kv_head, ">= 1 or None (= n_head)", _at_least(m.n_kv_head, 1)),
        ("model.d_ff", m.d_ff, ">= 1 or None (default width)", _at_least(m.d_ff, 1)),
        ("model.multiple_of", m.multiple_of, ">= 1", m.multiple_of >= 1),
        ("model.norm_eps", m.norm_eps, "> 0", m.norm_eps > 0),
        ("model.rope_theta", m.rope_theta, "> 0", m.rope_theta > 0),
        ("model.init_std", m.init_std, "> 0", m.init_std > 0),
        ("model.dropout", m.dropout, "in [0, 1)", 0.0 <= m.dropout < 1.0),
        ("model.label_smoothing", m.label_smoothing, "in [0, 1)", 0.0 <= m.label_smoothing < 1.0),
        ("data.val_fraction", cfg.data.val_fraction, "in [0, 1)", 0.0 <= cfg.data.val_fraction < 1.0),
        ("data.max_pair_len", cfg.data.max_pair_len, "positive", cfg.data.max_pair_len > 0),
        (
            "data.stream_workers",
            cfg.data.stream_workers,
            f"in [0, {MAX_STREAM_WORKERS}]",
            0 <= cfg.data.stream_workers <= MAX_STREAM_WORKERS,
        ),
        (
            "data.max_tokens",
            cfg.data.max_tokens,
            ">= 1 or None (no budget)",
            _at_least(cfg.data.max_tokens, 1),
        ),
        ("train.lr", t.lr, "> 0", t.lr > 0),
        ("train.min_lr", t.min_lr, f"in [0, train.lr={t.lr}]", 0 <= t.min_lr <= t.lr),
        ("train.muon_lr", t.muon_lr, "> 0", t.muon_lr > 0),
        ("train.muon_momentum", t.muon_momentum, "in [0, 1)", 0.0 <= t.muon_momentum < 1.0),
        ("train.weight_decay", t.weight_decay, ">= 0", t.weight_decay >= 0),
        ("train.beta1", t.beta1, "in [0, 1)", 0.0 <= t.beta1 < 1.0),
        ("train.beta2", t.beta2, "in [0, 1)", 0.0 <= t.beta2 < 1.0),
        ("train.eps", t.eps, "> 0", t.eps > 0),
        ("train.grad_clip", t.grad_clip, ">= 0 (0 = off)", t.grad_clip >= 0),
        ("train.warmup_steps", t.warmup_steps, ">= 0", t.warmup_steps >= 0),
        ("train.keep_last", t.keep_last, ">= 1", t.keep_last >= 1),
        ("train.max_nan_skips", t.max_nan_skips, ">= 0", t.max_nan_skips >= 0),
        ("train.loss_chunk_rows", t.loss_chunk_rows, ">= 0 (0 = off)", t.loss_chunk_rows >= 0),
        (
            "train.early_stopping_patience",
            t.early_stopping_patience,
            ">= 1 or None (off)",
            _at_least(t.early_stopping_patience, 1),
        ),
        ("eval.num_samples", e.num_samples, ">= 0 (0 = off)", e.num_samples >= 0),
        ("eval.sample_interval", e.sample_interval, ">= 0 (0 = at the end only)", e.sample_interval >= 0),
        ("train.threads", t.threads, ">= -1 (0 = torch's default, -1 = auto)", t.threads >= -1),
        ("eval.sample_tokens", e.sample_tokens, ">= 0", e.sample_tokens >= 0),
        ("eval.temperature", e.temperature, ">= 0 (0 = greedy)", e.temperature >= 0),
        ("eval.top_k", e.top_k, ">= 1 or None (off)", _at_least(e.top_k, 1)),
        ("eval.bleu_sentences", e.bleu_sentences, ">= 0 (0 = off)", e.bleu_sentences >= 0),
        ("train.average_last", t.average_last, ">= 0 (0 = off)", t.average_last >= 0),
        ("train.lora.rank", t.lora.rank, ">= 0 (0 = off)", t.lora.rank >= 0),
        ("train.lora.alpha", t.lora.alpha, "> 0", t.lora.alpha > 0 and math.isfinite(t.lora.alpha)),
        ("train.lora.dropout", t.lora.dropout, "in [0, 1)", 0.0 <= t.lora.dropout < 1.0),
        (
            "data.batch_tokens",
            cfg.data.batch_tokens,
            ">= 1 or None (rows)",
            _at_least(cfg.data.batch_tokens, 1),
        ),
    ]
    for key, value, valid, ok in ranges:
        if not ok:
            raise ConfigError(f"{key} must be {valid}, got {value}")
    if not 0 <= t.seed < 2**32:  # numpy's seed range; checked here, before any tokenizer or shard is built
        raise ConfigError(f"train.seed must be in [0, 2**32 - 1], got {t.seed}")
    check_run_name(t.name, "train.name")  # one rule for run and sweep names (naming.py)
    if t.tokens_per_step is not None:
        micro = t.batch_size * m.context_length
        if t.tokens_per_step <= 0 or t.tokens_per_step % micro:
            raise ConfigError(
                f"train.tokens_per_step={t.tokens_per_step} must be a positive multiple of "
                f"batch_size*context_length={micro}"
            )
    if t.lora.rank and not t.lora.targets:
        raise ConfigError("train.lora.targets is empty; name the layers to adapt, e.g. *.attn.c_q,*.attn.c_v")
    if t.lora.rank and t.average_last:  # an average of adapters B A is not the adapter of the average
        raise ConfigError("train.average_last does not apply to LoRA runs (train.lora.rank > 0); set it to 0")
    if (cfg.data.mixture or cfg.data.fallback) and not cfg.data.stream:
        key = "data.mixture" if cfg.data.mixture else "data.fallback"
        raise ConfigError(f"{key} needs data.stream=true (mixtures and fallbacks are streamed)")
    if m.arch == "seq2seq" and (cfg.data.stream or cfg.data.max_tokens):
        key = "data.stream" if cfg.data.stream else "data.max_tokens"
        raise ConfigError(f"{key} is for decoder LMs (model.arch=gpt); seq2seq reads parallel files")
    if not 0.0 < t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    if m.impl == "reference" and t.loss_chunk_rows:
        raise ConfigError(
            "train.loss_chunk_rows (the fused chunked loss) has no hand-written twin for model.impl=reference; "
            "set train.loss_chunk_rows=0"
        )
    if t.compile_mode != "default" and not t.compile:
        raise ConfigError(f"train.compile_mode={t.compile_mode} needs train.compile=true")
    if t.max_time is not None and t.max_time <= 0:
        raise ConfigError(f"train.max_time must be positive seconds or None, got {t.max_time}")
    if t.schedule_clock == "time" and t.max_time is None:
        raise ConfigError(
            "train.schedule_clock=time needs train.max_time (seconds); or use schedule_clock=steps"
        )
    if e.metric == "bleu" and (m.arch != "seq2seq" or e.bleu_sentences <= 0):
        raise ConfigError("eval.metric=bleu needs model.arch=seq2seq and eval.bleu_sentences > 0 (e.g. 500)")
    if t.average_last > t.keep_last:
        raise ConfigError(
            f"train.average_last={t.average_last} averages more checkpoints than train.keep_last="
            f"{t.keep_last} keeps; raise train.keep_last to at least {t.average_last}"
        )
    if t.schedule == "noam" and t.warmup_steps <= 0:
        raise ConfigError("train.schedule=noam needs train.warmup_steps >= 1 (its peak is at warmup)")
    if cfg.data.format == "chat" and not (t.init_from or cfg.tokenizer.path):
        raise ConfigError(
            "data.format=chat fine-tunes a pretrained model: set train.init_from=SOURCE (or tokenizer.path=FILE)"
        )
    specials = cfg.tokenizer.special_tokens
    if len(set(specials)) != len(specials):
        raise ConfigError(f"tokenizer.special_tokens lists a token twice: {specials}")
