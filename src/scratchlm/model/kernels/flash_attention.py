"""FlashAttention-2 in Triton as a differentiable PyTorch op: ``flash_attention(q, k, v, causal=True)``.

The kernels are in ``flash_kernels.py`` and the algorithm is derived, in plain PyTorch with the same tiles,
in ``flash_reference.py``. This module chooses tile configurations, launches the four kernels and registers
them as two ``torch.library`` custom ops (``scratchlm::flash_attn_fwd`` -> O and the fp32 log-sum-exp,
``scratchlm::flash_attn_bwd`` -> dQ, dK, dV) with fake (shape-only) implementations and an autograd
formula: ``torch.compile`` treats them as opaque calls (it neither traces nor re-compiles the Triton kernels)
and the saved tensors are q, k, v, O and the LSE only.

Tiles on a GPU, from ``$SCRATCHLM_FLASH_TILES`` (read at every launch; any other value is an error):

- ``auto`` (the default): the shipped table of autotuned tiles for this GPU (``flash_tiles.py``); where the
  table has no entry for the GPU or head size, autotune as below.
- ``autotune``: autotune each kernel over its candidate list below, once per (head size, causal, group,
  power-of-two length bucket, precision, dtype).
- ``fixed``: the first candidate of each list that fits the GPU (shared memory, threads): one compile per
  kernel and specialisation, no timing runs. The GPU tests and ``benchmarks/attention.py --quick`` use it.

Under the CPU interpreter one fixed small configuration is used.

Triton is optional: this module imports it lazily, and ``flash_available(device)`` says whether the kernels
can run on a device (CUDA, compute capability >= 8.0, Triton installed). Models call ``flash_attention`` only
when it can; the tests run the kernels on the CPU with ``TRITON_INTERPRET=1`` set before the kernels are
defined (tests/model/kernels/conftest.py).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings
from types import ModuleType

import torch

from scratchlm.errors import ConfigError
from scratchlm.model.kernels import flash_tiles
from scratchlm.model.kernels.flash_reference import flash_attention_reference

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One fixed configuration for the CPU interpreter (small tiles: the interpreter runs each program in numpy).
# flash_reference.py uses the same tiles. Forward and dQ: (BLOCK_M, BLOCK_N); dK/dV: (BLOCK_M, BLOCK_N).
INTERPRETER_TILES = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16), "preprocess": 32}

# H100 candidates (fwd and dQ need BLOCK_M % BLOCK_N == 0, dK/dV needs BLOCK_N % BLOCK_M == 0).
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Configurations that do not fit in shared memory are skipped.
# The first entry of each list is what SCRATCHLM_FLASH_TILES=fixed tries first, the later ones in order are
# its fallbacks: the first ones compile without register spills on sm_90 at D = 64 and 128 (the 4-warp
# variants after them spill at D = 128; `python benchmarks/flash_registers.py` compiles them all offline and
# lists registers and spills). The last entry is small enough (~96 KB of shared memory) to fit any GPU of
# compute capability >= 8.0 even for fp32 inputs at D = 128, where by our estimate the larger ones can
# exceed an H100's 227 KB; without it such a case has no config.
FWD_CONFIGS = [
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (128, 128, 8, 3),
    (128, 128, 8, 2),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 32, 4, 2),
]
DKDV_CONFIGS = [
    (32, 128, 8, 3),
    (32, 128, 4, 3),
    (64, 128, 8, 3),
    (64, 128, 8, 2),
    (32, 64, 8, 3),
    (32, 64, 4, 4),
    (64, 64, 4, 3),
    (32, 32, 4, 2),
]
DQ_CONFIGS = [
    (128, 32, 8, 3),
    (128, 32, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (64, 32, 4, 4),
    (64, 64, 4, 3),
    (32, 32, 4, 2),
]
TUNING_KEY = ["HEAD_DIM", "CAUSAL", "GROUP", "T_BUCKET", "PRECISION"]
TILE_MODES = ("auto", "autotune", "fixed")
TILES_ENV = "SCRATCHLM_FLASH_TILES"


def tile_mode() -> str:
    """How GPU tiles are chosen, from ``$SCRATCHLM_FLASH_TILES``: "auto" (default), "autotune" or "fixed"."""
    mode = os.environ.get(TILES_ENV, "auto") or "auto"
    if mode not in TILE_MODES:
        raise ValueError(f"{TILES_ENV}={mode!r} is not one of {TILE_MODES}; unset it or pick one of those")
    return mode


def _triton_missing() -> str | None:
    """None when Triton imports, else the reason with an install hint."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install 'scratchlm[triton]')"
    return None


@torch.compiler.assume_constant_result  # torch.compile: evaluated once while tracing, not traced
def flash_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``: (True, "") or (False, why).

    Needs a CUDA device of compute capability >= 8.0 (Ampere or newer: bf16 tensor cores) and Triton.
    On the CPU it is always False: models then use SDPA; tests call the kernels under the interpreter.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"flash_triton runs on CUDA GPUs only (device is {device.type})"
    if not torch.cuda.is_available():
        return False, "flash_triton needs CUDA, which is not available here"
    missing = _triton_missing()
    if missing:
        return False, missing
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"flash_triton needs compute capability >= 8.0, this GPU has {major}.{minor}"
    if _kernels().INTERPRETED:
        return False, "TRITON_INTERPRET=1 is set: the kernels would run in the slow CPU interpreter"
    return True, ""


def _kernels() -> ModuleType:
    """The kernel module, looked up on every call (tests may re-import it under the interpreter)."""
    return importlib.import_module("scratchlm.model.kernels.flash_kernels")


# Autotuned wrappers built so far, by kernel name (their ``cache`` holds the chosen configurations).
_autotuners: dict[str, object] = {}


@functools.cache
def _tuned(name: str, configs: tuple[tuple[int, int, int, int], ...]):
    """Autotuned wrapper of kernel ``name`` over ``configs`` (built once per kernel; GPU only)."""
    import triton

    kernel = getattr(_kernels(), name)
    candidates = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in configs
    ]
    _autotuners[name] = tuned = triton.autotune(candidates, key=TUNING_KEY)(kernel)
    return tuned


def autotuned_tiles() -> dict[str, list[int]]:
    """What autotuning chose in this process, as entries of the shipped tile table (see flash_tiles.py)."""
    return flash_tiles.autotune_records(_autotuners, TUNING_KEY)


# Index of the configuration SCRATCHLM_FLASH_TILES=fixed settled on, per kernel and specialisation.
_fixed_choice: dict[tuple, int] = {}


def _launch_fixed(name: str, configs: list, grid_of, args: tuple, meta: dict) -> None:
    """Run kernel ``name`` with the first of ``configs`` that fits this GPU, remembered per specialisation.

    A configuration that needs more shared memory (or threads, or registers) than the GPU has fails when it
    is loaded, before anything runs, so trying the next one is safe.
    """
    from triton.runtime import errors

    too_big = tuple(getattr(errors, n) for n in ("OutOfResources", "PTXASError") if hasattr(errors, n))
    kernel = getattr(_kernels(), name)
    key = (name, args[0].dtype, tuple(sorted(meta.items())), tuple(configs))
    for i in range(_fixed_choice.get(key, 0), len(configs)):
        bm, bn, warps, stages = configs[i]
        try:
            kernel[grid_of(bm, bn)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        except too_big:
            if i == len(configs) - 1:
                raise
            continue
        _fixed_choice[key] = i
        return


def _table_tiles(name: str, q: torch.Tensor, meta: dict) -> tuple[int, int, int, int] | None:
    """The shipped table's tiles for this launch (None: no entry for this GPU and head size)."""
    gpu = torch.cuda.get_device_name(q.device)
    return flash_tiles.lookup(
        gpu, name, meta["HEAD_DIM"], q.dtype, meta["CAUSAL"], meta["GROUP"], meta["T_BUCKET"]
    )


def _launch(name: str, tiles: str, configs: list, grid_of, *args, **meta) -> None:
    """Run kernel ``name``: fixed tiles under the interpreter, else tiles by tile_mode() (table, autotune,
    fixed). ``grid_of(block_m, block_n)`` gives the launch grid; ``args`` and ``meta`` are the kernel
    arguments (``meta`` holds the constexprs and ``T_BUCKET``)."""
    kernels = _kernels()
    mode = tile_mode()
    if kernels.INTERPRETED:
        bm, bn = INTERPRETER_TILES[tiles]
        getattr(kernels, name)[grid_of(bm, bn)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)
        return
    if mode == "auto":
        table = _table_tiles(name, args[0], meta)
        if table is not None:
            _launch_fixed(name, [table, *configs], grid_of, args, meta)
            return
    if mode == "fixed":
        _launch_fixed(name, configs, grid_of, args, meta)
    else:
        _tuned(name, tuple(configs))[lambda m: grid_of(m["BLOCK_M"], m["BLOCK_N"])](*args, **meta)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and time strides of a (B, H, T, D) tensor whose last dimension is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool, precision: str) -> dict:
    """Constexpr arguments shared by the kernels, and T_BUCKET (T's next power of two: an autotuning key)."""
    upcast = _kernels().INTERPRETED and q.dtype == torch.bfloat16  # numpy has no bf16 matmul
    if q.dtype != torch.float32:
        precision = "tf32"  # Triton's default; it only affects fp32 inputs
    T = q.shape[2]
    return dict(
        T_BUCKET=1 << (T - 1).bit_length(),
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=q.shape[3],
        CAUSAL=causal,
        UPCAST=upcast,
        PRECISION=precision,
    )


def _forward(q, k, v, causal: bool, scale: float, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """O (like q) and LSE (B, Hq, T) fp32."""
    import triton

    B, H, T, _ = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    _launch(
        "attn_fwd_kernel",
        "fwd",
        FWD_CONFIGS,
        lambda bm, bn: (triton.cdiv(T, bm), B * H),
        q,
        k,
        v,
        o,
        lse,
        scale,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(o),
        H,
        T,
        **_meta(q, k, causal, precision),
    )
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, scale: float, precision: str):
    """dQ, dK, dV: preprocessing (D = rowsum(dO * O)), then the dK/dV pass, then the dQ pass."""
    import triton

    kernels = _kernels()
    B, H, T, D = q.shape
    n_kv = k.shape[1]
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    pre_block = INTERPRETER_TILES["preprocess"] if kernels.INTERPRETED else 128
    kernels.attn_bwd_preprocess_kernel[(triton.cdiv(T, pre_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=pre_block
    )

    meta = _meta(q, k, causal, precision)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do), H, T)
    dk = torch.empty((B, n_kv, T, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, n_kv, T, D), device=v.device, dtype=v.dtype)
    _launch(
        "attn_bwd_dkdv_kernel",
        "dkdv",
        DKDV_CONFIGS,
        lambda bm, bn: (triton.cdiv(T, bn), B * n_kv),
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        scale,
        *common,
        **meta,
    )
    dq = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    _launch(
        "attn_bwd_dq_kernel",
        "dq",
        DQ_CONFIGS,
        lambda bm, bn: (triton.cdiv(T, bm), B * H),
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        scale,
        *common,
        **meta,
    )
    return dq, dk, dv


# The kernels as torch.library custom ops: torch.compile (Dynamo, AOTAutograd, Inductor) sees each as one
# opaque call with the output shapes of its fake implementation, so it never traces or re-compiles the
# Triton code (Inductor's own handling of user kernels passes the float scale as fp64, for one).
@torch.library.custom_op("scratchlm::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """O (like q, same strides) and LSE (B, Hq, T) fp32 of q (B, Hq, T, D), k, v (B, Hkv, T, D)."""
    return _forward(q, k, v, causal, scale, precision)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale, precision):
    B, H, T, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("scratchlm::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    causal: bool,
    scale: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ (B, Hq, T, D), dK, dV (B, Hkv, T, D), contiguous, from the forward's q, k, v, O, LSE and dO."""
    return _backward(q, k, v, o, lse, do, causal, scale, precision)


@flash_attn_bwd.register_fake
def _(q, k, v, o, lse, do, causal, scale, precision):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale, precision = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)  # no T x T tensor: P is recomputed from the LSE
    ctx.causal, ctx.scale, ctx.precision = causal, scale, precision
    ctx.mark_non_differentiable(lse)


def _flash_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(q, k, v, o, lse, do.contiguous(), ctx.causal, ctx.scale, ctx.precision)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_flash_backward, setup_context=_setup_context)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise one clear error for shapes, dtypes or head sizes the kernels do not handle."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"flash_attention wants q (B, Hq, T, D), k = v (B, Hkv, T, D); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(
            f"flash_attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
            "(same B, T, D; Hq a multiple of Hkv)"
        )
    if D not in SUPPORTED_HEAD_DIMS:
        raise ConfigError(
            f"attention=flash_triton supports head_dim in {SUPPORTED_HEAD_DIMS}, got {D} "
            "(d_model / n_head); change the model shape or use model.attention=sdpa"
        )
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"flash_attention wants q, k, v of one dtype among fp32/fp16/bf16; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )


@torch.compiler.assume_constant_result  # torch.compile: evaluated once while tracing, not traced
def _kernels_missing(device_type: str) -> str | None:
    """Why the kernels cannot run on tensors of this device type (None: they can)."""
    missing = _triton_missing()
    if missing is None and device_type == "cpu" and not _kernels().INTERPRETED:
        missing = "the Triton kernels were defined without TRITON_INTERPRET=1, so they cannot run on the CPU"
    return missing


@functools.cache
def _say_fallback_once(reason: str) -> None:
    warnings.warn(f"flash_attention: {reason}; using the plain-PyTorch tiled reference instead", stacklevel=3)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    input_precision: str = "ieee",
) -> torch.Tensor:
    """Differentiable FlashAttention-2: q (B, Hq, T, D), k/v (B, Hkv, T, D) -> (B, Hq, T, D) like q.

    Grouped-query attention when Hkv < Hq (query head h reads kv head h // (Hq // Hkv)). D in {16, 32, 64,
    128}; fp32, fp16 or bf16 with fp32 softmax statistics and accumulators. ``softmax_scale`` defaults to
    1/sqrt(D). ``input_precision`` sets the ``tl.dot`` precision for fp32 inputs: "ieee" (the default: exact
    fp32, like PyTorch's default matmuls) or "tf32" (faster on tensor cores, ~1e-3 relative error); fp16 and
    bf16 always multiply on tensor cores in their own dtype. Where the kernels cannot run (no Triton; CPU
    tensors without TRITON_INTERPRET=1 set before import) it says so once (a warning) and runs
    ``flash_attention_reference``, which is always exact fp32.
    """
    _check_inputs(q, k, v)
    if input_precision not in ("ieee", "tf32"):
        raise ValueError(f"input_precision must be 'ieee' or 'tf32', got {input_precision!r}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    missing = _kernels_missing(q.device.type)
    if missing is not None:
        _say_fallback_once(missing)
        return flash_attention_reference(q, k, v, causal, scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return flash_attn_fwd(q, k, v, causal, scale, input_precision)[0]
