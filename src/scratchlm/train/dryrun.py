"""``scratchlm train --dry-run``: what a run will cost, measured on two steps, without writing anything.

Reported: parameter count, an estimate of the training memory, tokens and FLOPs per optimizer step, and
the expected wall time of ``max_steps`` from the mean of two real optimizer steps on random tokens, timed
after warm-up steps (optimizer state allocation, kernel selection, ``torch.compile``): warm-up goes on while
a step is more than 20% faster than the one before, up to ``_MAX_WARMUP_STEPS``. Nothing touches the disk: no run dir, no shards, no
tokenizer training; the data sources are checked to exist, and the vocabulary is the one the tokenizer will
really have (see :func:`_vocab_size`).

Memory estimate (bytes), with N parameters, L layers, micro-batch B x T, width C, vocabulary V::

    weights 4N + gradients 4N + optimizer state (AdamW: 8 per parameter, Muon: 4 per matrix parameter)
    + activations ~ L * B * T * C * 34 (16-bit; x2 in fp32)   (Korthikanti et al. 2022, with fused
      attention, i.e. without the B*heads*T^2 score matrices)
    + logits B * T * V * 12 (fp32 logits, their float copy for the loss, and the gradient)

It is an estimate (allocator overheads and temporaries vary by +-30%); the measured step is exact.
"""

from __future__ import annotations

import os
import time

import torch

from scratchlm.config import Config
from scratchlm.device import resolve_device, resolve_dtype
from scratchlm.errors import ConfigError
from scratchlm.model import build_model, describe_params
from scratchlm.train.batches import micro_steps
from scratchlm.train.memory import apply_memory_options
from scratchlm.train.metrics import peak_flops
from scratchlm.train.optim import build_optimizers, param_groups, set_lr
from scratchlm.train.step import train_step

# measure with fewer rows when one micro-batch would take more than this many FLOPs (CPU: ~seconds)
_MEASURE_FLOPS_BUDGET = {"cpu": 3e11, "mps": 3e12, "cuda": 1e30}
_MAX_WARMUP_STEPS = 4


def _vocab_size(cfg: Config) -> tuple[int, str]:
    """The vocabulary the run's model will really have, and a note saying where it comes from.

    Also checks that the data sources exist (a DataError naming the missing path): ``model.vocab_size``;
    else the tokenizer file of ``tokenizer.path``; a char tokenizer counts the characters of the training
    text (reads it, writes nothing); a BPE tokenizer already trained on these sources is read from the
    cache; else ``tokenizer.vocab_size``, which BPE training reaches exactly.
    """
    from scratchlm.data.sources import SEQ2SEQ_SPECIALS, cached_tokenizer_path, training_sources
    from scratchlm.tokenizer import CharTokenizer, load_tokenizer

    tk = cfg.tokenizer
    sources = None
    if cfg.model.arch == "seq2seq":
        from scratchlm.data.pairs import load_pairs

        for spec in [*cfg.data.source[:1], *cfg.data.val_source[:1]]:
            load_pairs(spec, cfg.data.src_lang, cfg.data.tgt_lang)  # DataError when missing or misaligned
    else:
        sources = training_sources(cfg)  # DataError naming a missing path
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, ""
    if tk.path:
        return load_tokenizer(tk.path).vocab_size, f" (from {tk.path})"
    if tk.kind == "gpt2":
        return 50257, " (GPT-2 tokenizer)"
    specials = list(tk.special_tokens)
    if cfg.model.arch == "seq2seq":
        specials += [s for s in SEQ2SEQ_SPECIALS if s not in specials]
    if tk.kind == "char" and sources is not None:
        n = CharTokenizer.train(sources.train.documents(), special_tokens=specials).vocab_size
        return n, " (char tokenizer: the characters of the training text + special tokens)"
    cached = cached_tokenizer_path(cfg, sources) if sources is not None else None
    if cached is not None and cached.is_file():
        return load_tokenizer(cached).vocab_size, " (the cached tokenizer of these sources)"
    return tk.vocab_size, " (tokenizer.vocab_size)"


def estimate_memory(cfg: Config, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
    """Bytes of weights, gradients, optimizer state and activations (see the module docstring)."""
    m = cfg.model
    n = sum(p.numel() for p in model.parameters())
    groups = param_groups(model, cfg.train.optimizer)
    n_muon = sum(p.numel() for p in groups["muon"])
    B, T = cfg.train.batch_size, m.context_length
    layers = m.n_layer + (m.n_encoder_layer or m.n_layer if m.arch == "seq2seq" else 0)
    act_bytes = 34 * (2 if dtype == torch.float32 else 1)
    return {
        "weights": 4 * n,
        "gradients": 4 * n,
        "optimizer": 8 * (n - n_muon) + 4 * n_muon,
        "activations": layers * B * T * m.d_model * act_bytes + B * T * m.vocab_size * 12,
    }


def device_memory(device: torch.device) -> int | None:
    """Total bytes of the device's memory (RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    return None


def check_memory(cfg: Config, device: torch.device, dtype: torch.dtype, world_size: int = 1) -> None:
    """ConfigError when the weights, gradients and optimizer state alone exceed the device's memory.

    The model is built on the ``meta`` device (shapes, no storage), so a far too large config is refused
    in milliseconds instead of failing deep in the allocator. Activations are left out: the check refuses
    only what cannot fit at any batch size. Sharded strategies (FSDP, ZeRO) divide by ``world_size``.
    """
    from scratchlm.model.size import meta_model

    model = meta_model(cfg.model, "the model config")  # far too large / overflowing shapes: one line
    total = device_memory(device)
    if total is None:
        return
    mem = estimate_memory(cfg, model, dtype)
    need = (mem["weights"] + mem["gradients"] + mem["optimizer"]) / world_size
    if need > total:
        raise ConfigError(
            f"the model's weights, gradients and optimizer state need {need / 2**30:,.1f} GiB, more than "
            f"the {total / 2**30:,.1f} GiB of {device.type} memory here; make the model smaller "
            "(model.d_model, model.n_layer, model.vocab_size)"
        )


def _random_batch(cfg: Config, rows: int, device: torch.device, gen: torch.Generator):
    V, T = cfg.model.vocab_size, cfg.model.context_length
    x = torch.randint(0, V, (rows, T + 1), generator=gen).to(device)
    if cfg.model.arch == "seq2seq":
        return {
            "src": x[:, :T],
            "src_mask": torch.ones(rows, T, dtype=torch.bool, device=device),
            "tgt_in": x[:, :T],
            "targets": x[:, 1:],
        }
    return x[:, :T], x[:, 1:]


def dry_run(cfg: Config) -> str:
    """A plain-text report (see the module docstring); writes nothing."""
    vocab, vocab_note = _vocab_size(cfg)
    cfg = cfg.__class__(
        **{**cfg.__dict__, "model": cfg.model.__class__(**{**cfg.model.__dict__, "vocab_size": vocab})}
    )
    tc, m = cfg.train, cfg.model
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    check_memory(cfg, device, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = build_model(m).to(device)
        apply_memory_options(model, tc)  # the step timed is the step trained
        model.train()
        accum = micro_steps(cfg)
        tokens_per_step = accum * tc.batch_size * m.context_length
        flops_per_token = model.flops_per_token()
        mem = estimate_memory(cfg, model, dtype)

        # time two real optimizer steps (the first one warms up); scale down the rows on slow devices
        rows = tc.batch_size
        budget = _MEASURE_FLOPS_BUDGET.get(device.type, 1e30)
        while rows > 1 and flops_per_token * rows * m.context_length > budget:
            rows //= 2
        optimizers = build_optimizers(model, tc)
        forward_model = torch.compile(model) if tc.compile else model
        gen = torch.Generator().manual_seed(tc.seed)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

        def timed_step(step: int) -> float:
            set_lr(optimizers, step, tc)
            batches = [_random_batch(cfg, rows, device, gen) for _ in range(accum)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(
                forward_model,
                model,
                optimizers,
                batches,
                grad_clip=tc.grad_clip,
                device=device,
                dtype=dtype,
                scaler=scaler,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        # warm up (optimizer state allocation, kernel selection, compilation) until a step is no longer
        # much faster than the one before, then time two steps and take their mean
        warmup = [timed_step(0)]
        while len(warmup) < _MAX_WARMUP_STEPS and (len(warmup) < 2 or warmup[-1] < 0.8 * warmup[-2]):
            warmup.append(timed_step(len(warmup)))
        times = [timed_step(len(warmup) + i) for i in range(2)]
    step_time = sum(times) / len(times) * tc.batch_size / rows
    tokens_per_s = tokens_per_step / step_time
    peak = peak_flops(device, dtype)
    mfu = (
        f"{100 * flops_per_token * tokens_per_s / peak:.1f}%"
        if peak
        else "n/a (no known peak for this device)"
    )
    total = tc.max_steps * step_time
    capped = (
        f" (train.max_time caps it at {_duration(tc.max_time)})"
        if tc.max_time and tc.max_time < total
        else ""
    )
    scaled = f"; measured on {rows} of {tc.batch_size} rows and scaled" if rows != tc.batch_size else ""
    gb = lambda b: f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.1f} MB"
    kind = "autocast" if dtype != torch.float32 else ""
    lines = [
        "# dry run (nothing written)",
        f"model:           {type(model).__name__}, {m.n_layer} layers, d_model {m.d_model}, vocab {vocab:,}{vocab_note}",
        f"parameters:      {describe_params(model)}",
        f"device / dtype:  {device} / {str(dtype).removeprefix('torch.')} {kind}".rstrip(),
        f"tokens per step: {tokens_per_step:,} (batch {tc.batch_size} x context {m.context_length} x "
        f"{accum} micro-batch{'es' if accum > 1 else ''})",
        f"FLOPs per step:  {flops_per_token * tokens_per_step:.3g} ({flops_per_token:.3g} per token: 6N + attention)",
        "memory (est.):   "
        + " + ".join(f"{k} {gb(v)}" for k, v in mem.items())
        + f" = {gb(sum(mem.values()))}",
        f"measured step:   {step_time:.3f} s (mean of two steps on random tokens after {len(warmup)} warm-up "
        f"step{'s' if len(warmup) > 1 else ''}{scaled}; first step {warmup[0]:.3f} s)",
        f"throughput:      {tokens_per_s:,.0f} tokens/s, MFU {mfu}",
        f"expected time:   {tc.max_steps:,} steps x {step_time:.3f} s = {_duration(total)}{capped}, plus evaluation",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
