"""Default tiles of the FlashAttention kernels per GPU: a shipped table filled from autotune results.

Autotuning tries 7-8 tile configurations per kernel and shape the first time a shape is seen (tens of
seconds per model); the table gives the default path the autotuned tiles without that search. It maps a GPU
name (``torch.cuda.get_device_name``) to entries::

    "attn_fwd_kernel|D=128|bfloat16|causal=1|group=1|T=2048": [BLOCK_M, BLOCK_N, num_warps, num_stages]

one per kernel, head size, dtype, causality, GQA group and power-of-two length bucket, exactly the key that
Triton's autotuner uses (``TUNING_KEY`` in flash_attention.py plus the input dtype). A lookup that finds no
exact entry takes the entry of the same (kernel, head size, dtype, causality) with the nearest length bucket
(same group first): tiles that fit one length fit every length, and the best tiles change slowly with T.
No entry at all for the GPU (or the head size) means: autotune, as before.

The table lives in ``flash_tiles.json`` beside this module. ``benchmarks/gpu.sh`` autotunes the benchmark
shapes and writes ``benchmarks/results/flash_tiles_<gpu>.json`` in the same format (:func:`autotune_records`);
``python benchmarks/gpu_bench.py merge-tiles FILE`` merges such a file into the shipped table.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

TABLE_PATH = Path(__file__).with_name("flash_tiles.json")
Tiles = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)


def entry_key(
    kernel: str, head_dim: int, dtype: torch.dtype | str, causal: bool, group: int, t_bucket: int
) -> str:
    """The table key of one kernel specialisation, e.g. ``attn_fwd_kernel|D=64|bfloat16|causal=1|group=1|T=1024``."""
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{kernel}|D={head_dim}|{dtype_name}|causal={int(bool(causal))}|group={group}|T={t_bucket}"


def _parse(key: str) -> tuple[str, int, str, int, int, int]:
    kernel, d, dtype, causal, group, t = key.split("|")
    return kernel, int(d[2:]), dtype, int(causal[7:]), int(group[6:]), int(t[2:])


@functools.cache
def load_table(path: Path = TABLE_PATH) -> dict[str, dict[str, list[int]]]:
    """{gpu name: {entry key: [BLOCK_M, BLOCK_N, num_warps, num_stages]}} ({} when the file is absent)."""
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def lookup(
    gpu: str,
    kernel: str,
    head_dim: int,
    dtype: torch.dtype | str,
    causal: bool,
    group: int,
    t_bucket: int,
    table: dict[str, dict[str, list[int]]] | None = None,
) -> Tiles | None:
    """Tiles for this specialisation on GPU ``gpu``: the exact entry, else the nearest length bucket of the
    same kernel, head size, dtype and causality (the same group preferred); None when there is none."""
    entries = (load_table() if table is None else table).get(gpu, {})
    exact = entries.get(entry_key(kernel, head_dim, dtype, causal, group, t_bucket))
    if exact is not None:
        return tuple(exact)
    want = entry_key(kernel, head_dim, dtype, causal, group, t_bucket)
    k0, d0, dt0, c0, g0, t0 = _parse(want)
    best, best_rank = None, None
    for key, tiles in entries.items():
        k, d, dt, c, g, t = _parse(key)
        if (k, d, dt, c) != (k0, d0, dt0, c0):
            continue
        rank = (g != g0, abs(math.log2(t) - math.log2(t0)), -t)  # same group, nearest T, then the longer
        if best_rank is None or rank < best_rank:
            best, best_rank = tuple(tiles), rank
    return best


def autotune_records(autotuners: dict[str, Any], tuning_key: list[str]) -> dict[str, list[int]]:
    """The autotuners' choices as table entries: {entry key: [BLOCK_M, BLOCK_N, num_warps, num_stages]}.

    Triton's autotuner caches one ``Config`` per key tuple: the values of ``tuning_key`` in order, then the
    dtype of every tensor argument (the first of which is Q's).
    """
    out: dict[str, list[int]] = {}
    for kernel, tuner in autotuners.items():
        for key, config in getattr(tuner, "cache", {}).items():
            values = dict(zip(tuning_key, key))
            dtype = next((str(x) for x in key[len(tuning_key) :] if str(x).startswith("torch.")), None)
            if dtype is None or values.get("PRECISION") not in (None, "tf32"):
                continue  # exact-fp32 ("ieee") dots are a test setting, not a default worth shipping
            name = entry_key(
                kernel, values["HEAD_DIM"], dtype, values["CAUSAL"], values["GROUP"], values["T_BUCKET"]
            )
            kw = config.kwargs
            out[name] = [kw["BLOCK_M"], kw["BLOCK_N"], config.num_warps, config.num_stages]
    return dict(sorted(out.items()))


def merge_into_table(gpu: str, entries: dict[str, list[int]], path: Path = TABLE_PATH) -> int:
    """Add (or replace) ``entries`` under ``gpu`` in the table file; returns how many entries it now has."""
    table = json.loads(path.read_text()) if path.exists() else {}
    table.setdefault(gpu, {}).update(entries)
    table[gpu] = dict(sorted(table[gpu].items()))
    path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    load_table.cache_clear()
    return len(table[gpu])
