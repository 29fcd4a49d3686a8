"""``model.attention=auto``: the fastest of SDPA, SDPA with cuDNN first, and our Triton kernel, timed here.

Which backend wins depends on the GPU, the head size, the sequence length and the library versions (on an
H200, SDPA's cuDNN backend beat our kernel at D = 128 and our kernel beat SDPA's flash backend; see
benchmarks/gpu.sh), so the choice is measured, not guessed: before the model is built, one attention call
forward and backward at the run's (batch, heads, context, head size, dtype) is timed for each candidate,
and the fastest is used for the whole run (printed once). ``sdpa`` lets SDPA pick its kernel in its own
order (flash before cuDNN); ``sdpa_cudnn`` asks for cuDNN's first (see ``layers.sdpa_backends``);
``flash_triton`` is a candidate only where it can serve the training path (CUDA, Triton, a supported head
size, no attention dropout). On a CPU, ``auto`` is ``sdpa``.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.model.layers import sdpa_backends


def _time_ms(fn, reps: int = 10) -> float:
    """Mean time of ``reps`` calls of ``fn`` after 3 warm-up calls (the first compiles or tunes), in ms."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def attention_timings(cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """{backend: ms for one causal attention forward+backward at the model's shape}, CUDA only."""
    from scratchlm.model.kernels.flash_attention import SUPPORTED_HEAD_DIMS, flash_attention, flash_available

    H, D = cfg.n_head, cfg.d_model // cfg.n_head
    Hkv, T = cfg.n_kv_head or H, cfg.context_length
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch_size, H, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
    k, v = (
        torch.randn(batch_size, Hkv, T, D, device=device, dtype=dtype, generator=g).requires_grad_()
        for _ in "kv"
    )
    do = torch.randn_like(q)

    def sdpa(backend: str):
        with sdpa_backends(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)

    candidates = {"sdpa": lambda: sdpa("sdpa"), "sdpa_cudnn": lambda: sdpa("sdpa_cudnn")}
    if flash_available(device)[0] and D in SUPPORTED_HEAD_DIMS and cfg.dropout == 0:
        candidates["flash_triton"] = lambda: flash_attention(q, k, v, causal=True)
    timings = {}
    for name, fn in candidates.items():
        try:
            timings[name] = _time_ms(lambda fn=fn: fn().backward(do))
        except Exception as e:  # a backend that fails at this shape is left out; plain sdpa must work
            if name == "sdpa":
                raise
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"model.attention=auto: {name} left out ({type(e).__name__}: {reason})")
        finally:
            q.grad = k.grad = v.grad = None
    return timings


def resolve_attention(
    cfg: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype
) -> ModelConfig:
    """``cfg`` with ``attention=auto`` replaced by the faster backend (unchanged for any other value)."""
    if cfg.attention != "auto":
        return cfg
    if device.type != "cuda":
        return dataclasses.replace(cfg, attention="sdpa")
    timings = attention_timings(cfg, batch_size, device, dtype)
    best = min(timings, key=timings.get)
    shown = ", ".join(f"{n} {ms:.2f} ms" for n, ms in timings.items())
    print(f"model.attention=auto: {best} (one layer's attention forward+backward: {shown})")
    return dataclasses.replace(cfg, attention=best)
