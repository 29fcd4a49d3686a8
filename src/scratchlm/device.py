"""Device and precision choice, shared by training, evaluation and generation.

``auto`` picks CUDA when present, else MPS where it works, else CPU. Mixed precision is bf16 autocast where
the hardware multiplies bf16 matrices natively (Ampere and newer GPUs; CPUs with AVX512-BF16, AMX or ARM BF16);
on CUDA GPUs without bf16 it is fp16 (the trainer adds a GradScaler); elsewhere float32. A CPU without bf16
instructions emulates every bf16 matmul: measured on an AVX2 AMD EPYC, the cpu-small model trained at 245
tokens/s under bf16 autocast against 5,400 in float32.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from scratchlm.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto", option: str = "train.device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` -> a torch.device that exists on this machine.

    ``option`` is what the user set (a config key or a flag), for the error message."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}={name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name!r} but CUDA is not available here; use {option}=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}={name!r} but MPS is not available here; use {option}=cpu or auto")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast is worth using on ``device`` (CUDA: Ampere and newer; CPU: bf16 instructions)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16_matmul()


# /proc/cpuinfo flags of native bf16 matrix arithmetic: x86 AVX512-BF16 and AMX, ARM's BF16 extension
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (read from /proc/cpuinfo; False where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_in_cpuinfo(f.read())
    except OSError:  # not Linux: no way to ask without a benchmark, and float32 is never the slow choice
        return False


def bf16_in_cpuinfo(text: str) -> bool:
    """True when the ``flags`` (x86) or ``Features`` (ARM) lines of a /proc/cpuinfo text name a bf16 flag."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and _BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 where the hardware has it, fp16 on older CUDA GPUs, else fp32; explicit names are
    checked (bf16 on a CPU without bf16 instructions is kept, as asked, with a warning that it is slow)."""
    if name == "auto":
        if bf16_supported(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"train.dtype={name!r} is not one of auto, {', '.join(_DTYPES)}")
    dtype = _DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_matmul():
        _warn_once(
            "train.dtype=bfloat16 on a CPU without bf16 instructions: every matmul is emulated and runs "
            "~20x slower than float32; use train.dtype=auto or float32"
        )
    elif dtype == torch.bfloat16 and not bf16_supported(device):
        _warn_once(f"bfloat16 is not supported on {device}; falling back to float32")
        return torch.float32
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16, a no-op for fp32. Weights stay fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)
