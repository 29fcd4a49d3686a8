"""Pre-flight size check of a model config: before a single weight is allocated, from any config.

Every command that builds a model from a file someone else may have written (a run's ``config.yaml`` for
``generate`` / ``eval`` / ``export`` / ``chat`` / ``serve`` / ``explain``, a Hugging Face ``config.json`` for
``finetune`` and ``import_hf``, the training config for ``train``) calls :func:`check_model_fits` first:

1. the widths are bounded: a tensor larger than :data:`MAX_TENSOR_ELEMENTS` (``vocab_size x d_model``,
   ``d_ff x d_model``, ``context_length x d_model``) is refused before torch computes a shape that
   overflows (``n_embd=1e9`` gave a storage-overflow traceback);
2. the model is built on the ``meta`` device (shapes only, no storage) to count its parameters exactly;
3. ``parameters x bytes per parameter`` (4 for fp32 weights; training adds gradients and optimizer state:
   ``train/dryrun.check_memory``) is compared with the device's memory (RAM for the CPU).

A config that fails is one line, ``ConfigError``, naming the file and the size; ``d_model: 100000000`` in a
run's config.yaml was an allocator traceback in ``generate``.
"""

from __future__ import annotations

import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError

# 2**40 elements = 4 TiB of fp32 in one tensor: above any model a single device holds, far below the int64
# overflow of torch's size arithmetic
MAX_TENSOR_ELEMENTS = 2**40
MAX_LAYERS = 100_000


def _widest_tensor(cfg: ModelConfig) -> int:
    """Elements of the largest weight matrix the config asks for (computed with Python ints: no overflow)."""
    d = cfg.d_model
    widths = (cfg.vocab_size, cfg.context_length, cfg.d_ff or 4 * d, d)
    return max(int(w) for w in widths) * int(d)


def _count(n: int) -> str:
    """``1,234,567``, or ``about 10^300`` for a number too long to read (or to convert to float)."""
    return f"{n:,}" if abs(n) < 10**15 else f"about 10^{len(str(abs(n))) - 1}"


def meta_model(cfg: ModelConfig, where: str) -> torch.nn.Module:
    """The model of ``cfg`` on the ``meta`` device (no memory); ConfigError naming ``where`` if it cannot be."""
    from scratchlm.model import build_model

    widest = _widest_tensor(cfg)
    if widest > MAX_TENSOR_ELEMENTS or cfg.n_layer > MAX_LAYERS:
        raise ConfigError(
            f"{where}: the model is far too large (a weight matrix of {_count(widest)} elements, "
            f"{_count(cfg.n_layer)} layers: d_model={_count(cfg.d_model)}, vocab_size={_count(cfg.vocab_size)}); "
            "check model.d_model, model.vocab_size, model.n_layer"
        )
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except (RuntimeError, ValueError, OverflowError, TypeError, ZeroDivisionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: no model can be built from this config ({first})") from None


def check_model_fits(
    cfg: ModelConfig,
    where: str,
    device: torch.device | str | None = None,
    bytes_per_param: int = 4,
) -> int:
    """ConfigError when ``cfg``'s weights (``bytes_per_param`` each) exceed the memory of ``device`` (None or
    cpu: the machine's RAM). Returns the number of parameters. Costs milliseconds (a meta-device build)."""
    from scratchlm.train.dryrun import device_memory

    model = meta_model(cfg, where)
    n = sum(p.numel() for p in model.parameters())
    device = torch.device(device or "cpu")
    total = device_memory(device)
    need = n * bytes_per_param
    if total is not None and need > total:
        raise ConfigError(
            f"{where}: the model has {n:,} parameters, {need / 2**30:,.1f} GiB of weights, more than the "
            f"{total / 2**30:,.1f} GiB of {device.type} memory here; check model.d_model, model.n_layer, "
            "model.vocab_size (or load it on a larger device)"
        )
    return n
