"""ScratchLM on one GPU in one bounded command: the training loop's overhead, MFU, attention, compile.

    bash benchmarks/gpu.sh                 # = python benchmarks/gpu_bench.py all  (<= ~5.5 min on an H200)
    python benchmarks/gpu_bench.py all --cpu --budget 600   # the same plumbing on the CPU with a tiny model

Parts, each in its own process with its own time limit (a part that fails or runs out of time is recorded
with its traceback under logs/ and the next part runs):

1. ``loop``: the gpt2 preset (124M), context 1024, bf16 autocast, torch.compile, on random tokens already on
   the GPU: a bare loop written here (forward, backward, clip, fused AdamW, no host sync) against
   ScratchLM's ``train_step`` (one host sync per step) at batch 32, then the bare loop with
   ``model.attention=sdpa_cudnn``, at larger batches (with the chunked loss and activation checkpointing)
   and in the other compile modes while time remains: tokens/s and MFU.
2. ``profile``: one step of the bare loop at batch 32 under torch.profiler: the GPU's time by kind of kernel
   (matmuls, attention, the loss, the optimizer, Inductor's other fused kernels, casts), its idle share, the
   matmuls' and attention's own TFLOP/s, and the MFU bound they set (the MFU if nothing else took time).
3. ``attention``: our Triton FlashAttention-2 (tiles autotuned, the choices recorded) against SDPA's flash
   and cuDNN backends, bf16 causal, B*T = 16K, H*D = 2048, D in {128, 64}, T in {2K, 8K}, MHA and GQA 4:1,
   forward and forward+backward TFLOP/s (benchmarks/attention.py's cases and FLOP convention).
4. ``cli``: ``scratchlm train preset=gpt2 train.compile=true train.batch_size=32`` through the CLI (char
   tokenizer on a slice of the built-in corpus), its steady-state tokens/s read from metrics.jsonl.
5. ``flash_compile``: the gpt2 preset with ``model.attention=flash_triton`` and torch.compile, trained for a
   few steps with ``train_step`` (the loss must fall), tokens/s.

Output (rewritten after every part): benchmarks/results/gpu_<device>.{md,json}, the autotuned tiles as
benchmarks/results/flash_tiles_<device>.json (merge them into the shipped table with
``python benchmarks/gpu_bench.py merge-tiles benchmarks/results/flash_tiles_<device>.json``), and logs/ with
every part's output and tracebacks; all of it is also copied under ``$OUT`` when that variable is set.
MFU = 6N + 12 L T C FLOPs per token (GPT.flops_per_token) x tokens/s / the GPU's dense bf16 peak
(train/metrics.py PEAK_FLOPS, e.g. 989.5 TFLOP/s for an H100/H200).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (part, seconds on a GPU, seconds with --cpu); the GPU budgets sum to the default --budget of 325 s (+ a few
# seconds of start-up); time a part leaves unused goes to the later ones. The CLI run gets the most after the
# loop: it compiles again if Inductor's on-disk cache misses. The profile reuses the loop's compilation from
# that cache. Attention runs last: each case adds data.
PARTS = [
    ("loop", 110, 240),
    ("cli", 75, 200),
    ("profile", 40, 120),
    ("flash_compile", 50, 120),
    ("attention", 50, 120),
]
CPU_MODEL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=64",
    "model.context_length=64",
    "model.vocab_size=4096",
]


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def device_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def machine() -> dict:
    """Host, GPU and library versions; which optional packages import (the device may lack some)."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info["cudnn"] = torch.backends.cudnn.version()
    for mod in ("triton", "numpy", "safetensors", "yaml", "tqdm", "regex", "matplotlib"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "yes")
        except Exception as e:  # a missing package is a finding, not a crash
            info[mod] = f"MISSING ({type(e).__name__})"
    return info


class PartWriter:
    """Accumulates one part's results in ``workdir/<part>.json``, rewritten after every measurement."""

    def __init__(self, workdir: Path, part: str):
        self.path = workdir / f"{part}.json"
        self.data: dict = {"part": part, "rows": [], "notes": []}

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.flush()
        log(f"result: {json.dumps(row)}")

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()
        log(f"note: {text}")

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def failure(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]


def save_traceback(workdir: Path, part: str, label: str) -> None:
    """Append the current exception's traceback to logs/<part>.traceback.txt (the part goes on)."""
    path = workdir / "logs" / f"{part}.traceback.txt"
    with path.open("a") as f:
        f.write(f"==== {label}\n{traceback.format_exc()}\n")


# ----------------------------------------------------------------------------------------------------------
# part 1: the bare loop vs train_step, then larger batches


def gpt2_config(cpu: bool, *extra: str):
    from scratchlm.config import load_config

    overrides = ["preset=gpt2", *(CPU_MODEL if cpu else []), *extra]
    return load_config(None, overrides)


def measure(step, warmup: int, steps: int, sync) -> float:
    """Seconds per step of ``step()`` after ``warmup`` calls (the first compiles), device-synchronised."""
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def bare_step(fwd, model, opt, batch, device, dtype, graphs: bool) -> None:
    """nanoGPT's training step, written plainly: forward, backward, clip, AdamW; no host sync inside."""
    import torch

    from scratchlm.device import autocast

    x, y = batch
    if graphs:  # CUDA-graph modes: outputs are reused by the next replay, so mark each step
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, dtype):
        loss = fwd(x, y)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bare_optimizer(model, device):
    """nanoGPT's AdamW (fused on CUDA) for the bare loop."""
    import torch

    return torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )


def part_loop(workdir: Path, deadline: float, cpu: bool) -> None:
    import torch

    from scratchlm.model import build_model
    from scratchlm.train.memory import apply_memory_options
    from scratchlm.train.metrics import peak_flops
    from scratchlm.train.optim import build_optimizers
    from scratchlm.train.step import CUDA_GRAPH_MODES, train_step

    out = PartWriter(workdir, "loop")
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16  # (bf16 on a small CPU is slow, and --cpu is plumbing)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = peak_flops(device, dtype) if device.type == "cuda" else None
    warmup, steps = (2, 3) if cpu else (6, 20)

    def run(label: str, batch: int, paths: tuple[str, ...], extra: tuple[str, ...]) -> None:
        """Build and compile the model once, then time each path on it (one compilation for all)."""
        cfg = gpt2_config(cpu, f"train.batch_size={batch}", *extra)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        apply_memory_options(model, cfg.train)
        model.train()
        mode = cfg.train.compile_mode
        graphs = mode in CUDA_GRAPH_MODES and not cpu  # outputs are reused by the next replay: mark each step
        # --cpu: eager (compiling on a small CPU takes minutes)
        fwd = model if cpu else torch.compile(model, mode=None if mode == "default" else mode)
        T, V = cfg.model.context_length, cfg.model.vocab_size
        data = torch.randint(0, V, (4, batch, T + 1), device=device)
        # contiguous like the loader's batches, so the CLI run finds this compilation in Inductor's cache
        batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
        i = [0]

        def next_batch():
            i[0] += 1
            return batches[i[0] % len(batches)]

        for path in paths:
            if path == "bare":
                opt = bare_optimizer(model, device)
                step = lambda opt=opt: bare_step(fwd, model, opt, next_batch(), device, dtype, graphs)
            else:
                opts = build_optimizers(model, cfg.train)
                step = lambda opts=opts: train_step(
                    fwd,
                    model,
                    opts,
                    [next_batch()],
                    grad_clip=1.0,
                    device=device,
                    dtype=dtype,
                    cuda_graphs=graphs,
                )
            t0 = time.perf_counter()
            sec = measure(step, warmup, steps, sync)
            tokens_per_s = batch * T / sec
            row = {
                "label": label.replace("bare loop", "train_step") if path == "train_step" else label,
                "path": path,
                "batch": batch,
                "context": T,
                "tokens_per_s": round(tokens_per_s),
                "ms_per_step": round(sec * 1e3, 2),
                "mfu": round(model.flops_per_token() * tokens_per_s / peak, 4) if peak else None,
                "wall_s_incl_compile": round(time.perf_counter() - t0, 1),
            }
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
                torch.cuda.reset_peak_memory_stats()
            out.add(row)

    # batch 32 (518K tokens/s in the bare-loop measurement, the best of 16 and 32) for the three
    # compared paths: the bare loop and train_step share one compilation, which the CLI run finds in
    # Inductor's on-disk cache; then batch 64 with the memory savers while time remains (new compilations)
    b = 2 if cpu else 32
    plan = [
        ("bare loop", b, ("bare", "train_step"), ()),
        # SDPA with cuDNN's kernel first (its own order takes flash: 0.63x cuDNN at D = 64 on an H200)
        ("bare loop, attention=sdpa_cudnn", b, ("bare",), ("model.attention=sdpa_cudnn",)),
        ("bare loop, loss_chunk_rows=8192", 2 * b, ("bare",), ("train.loss_chunk_rows=8192",)),
        ("bare loop, activation ckpt + chunked loss", 2 * b, ("bare",),
         ("train.activation_checkpointing=true", "train.loss_chunk_rows=8192")),
        # compile modes (train.compile_mode): Inductor's autotuned matmuls, then CUDA graphs as well
        ("bare loop, compile max-autotune-no-cudagraphs", b, ("bare",),
         ("train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs")),
        ("bare loop, compile reduce-overhead (CUDA graphs)", b, ("bare", "train_step"),
         ("train.compile=true", "train.compile_mode=reduce-overhead")),
    ]  # fmt: skip
    for label, batch, paths, extra in plan:
        if time.time() > deadline - (5 if cpu else 45):  # a compiled measurement needs ~40 s on a GPU
            out.note(f"skipped (out of time): {label} B={batch}")
            continue
        log(f"loop: {label}, batch {batch}")
        try:
            run(label, batch, paths, extra)
        except Exception as e:
            save_traceback(workdir, "loop", f"{label} B={batch}")
            out.add({"label": label, "path": paths[-1], "batch": batch, "error": failure(e)})
        torch._dynamo.reset()  # drop this measurement's compiled frames (and their hold on the model)
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# part 2: where the step's time goes (what MFU is lost to)

# Kinds of kernels (CUDA) or ops (--cpu), by substrings of their names, lower case; the first match wins.
# cuDNN's attention kernels are "cudnn_generated_..._sdpa_...", SDPA's flash backend "flash_fwd/bwd_...",
# cuBLAS's Hopper GEMMs "nvjet_..." or "sm90_xmma_gemm_...", Inductor's fused kernels "triton_<kind>_fused_<ops>".
KERNEL_KINDS = [
    ("attention", ("sdpa", "flash", "fmha", "attn", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer and clipping", ("adam", "multi_tensor", "foreach", "lpnorm")),
    ("loss (log-softmax, NLL)", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("dtype casts", ("_to_copy", "to_copy")),
    ("other fused elementwise and norms (Inductor)", ("triton_",)),
    ("copies and fills", ("memcpy", "memset", "copy_", "fill_", "zero_")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: time the device had at least one kernel running."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def part_profile(workdir: Path, deadline: float, cpu: bool) -> None:
    """One compiled bare-loop step of the gpt2 preset at batch 32 under torch.profiler: the device's time by
    kind of kernel, its idle share, and the TFLOP/s of the matmuls and of attention on their own.

    The MFU the matmuls allow, if nothing else took time, is (6N + 12LTC) x tokens / (matmul + attention
    time) / peak: a loop or fusion change can raise MFU up to that bound, a higher one needs faster kernels.
    """
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from scratchlm.model import build_model
    from scratchlm.train.metrics import peak_flops

    out = PartWriter(workdir, "profile")
    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batch, steps = (2, 2) if cpu else (32, 3)
    cfg = gpt2_config(cpu, f"train.batch_size={batch}")
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    fwd = model if cpu else torch.compile(model)
    opt = bare_optimizer(model, device)
    T, V = cfg.model.context_length, cfg.model.vocab_size
    data = torch.randint(0, V, (batch, T + 1), device=device)
    xy = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    step = lambda: bare_step(fwd, model, opt, xy, device, dtype, False)
    sec = measure(step, 3, 5, sync)  # compiles (Inductor's on-disk cache from the loop part), then times
    if time.time() > deadline - 10:
        out.note("out of time before profiling")
        return
    activities = [ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    # On the GPU: every kernel, timed on the device. On the CPU: ops' self time (their children excluded).
    if cpu:
        events = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.device_type == DeviceType.CPU]
        busy = sum(us for _, us in events)
    else:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        events = [(e.name, e.time_range.elapsed_us()) for e in kernels]
        busy = busy_us([(e.time_range.start, e.time_range.end) for e in kernels])
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for name, us in events:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us
        by_name[name] = by_name.get(name, 0.0) + us
    ms = lambda us: round(us / steps / 1e3, 3)  # per step
    tokens = batch * T
    matmul_flops = 6 * model.num_params(non_embedding=True) * tokens
    attn_flops = 12 * cfg.model.n_layer * T * cfg.model.d_model * tokens
    peak = peak_flops(device, dtype) if device.type == "cuda" else None
    per_step = lambda kind: by_kind.get(kind, 0.0) / steps / 1e6  # seconds
    # 3 significant figures: a CPU reaches well under 0.05 TFLOP/s
    tflops = lambda flops, s: float(f"{flops / s / 1e12:.3g}") if s > 0 else None
    matmul_s, attn_s = per_step("matmul"), per_step("attention")
    row = {
        "batch": batch,
        "ms_per_step": round(sec * 1e3, 2),
        "device_busy_ms_per_step": ms(busy),
        "device_idle_share": round(1 - busy / steps / 1e6 / sec, 3) if not cpu else None,
        "kinds_ms_per_step": {k: ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "matmul_tflops": tflops(matmul_flops, matmul_s),
        "attention_tflops": tflops(attn_flops, attn_s),
        "mfu": round((matmul_flops + attn_flops) / sec / peak, 4) if peak else None,
        "mfu_bound_matmul_and_attention_only": (
            round((matmul_flops + attn_flops) / (matmul_s + attn_s) / peak, 4)
            if peak and matmul_s + attn_s > 0
            else None
        ),
        "top_kernels_ms_per_step": [
            [name[:120], ms(us)] for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
        ],
    }
    out.add(row)


# ----------------------------------------------------------------------------------------------------------
# part 3: attention


def part_attention(workdir: Path, deadline: float, cpu: bool) -> None:
    out = PartWriter(workdir, "attention")
    if cpu:
        out.note("attention needs CUDA; skipped on the CPU (tests/model/kernels covers the kernels there)")
        return
    os.environ["SCRATCHLM_FLASH_TILES"] = "autotune"  # tune the benchmark shapes and record the choices
    import attention as bench  # benchmarks/attention.py: the same cases, providers and FLOP convention
    from scratchlm.model.kernels import flash_attention as fa

    names = ["sdpa_cudnn", "sdpa_flash", bench.OURS]  # the references first: ours may spend the time tuning
    all_providers = bench.providers()
    providers = {n: all_providers[n] for n in names}
    tiles_path = workdir / "flash_tiles.json"
    # in order of use: the targets (D = 128), then D = 64 (the gpt2 preset's head size); each new shape
    # autotunes 23 tile configurations (~20 s), so a bounded run may stop before the GQA cases
    cases = [(128, 2048, 1), (64, 2048, 1), (128, 8192, 1), (64, 8192, 1)]
    cases += [(128, 2048, 4), (128, 8192, 4), (64, 2048, 4), (64, 8192, 4)]
    for D, T, group in cases:
        if time.time() > deadline - 15:
            out.note(f"skipped (out of time): D={D} T={T} group={group}")
            continue
        B, Hq = bench.TOKENS // T, bench.HIDDEN // D
        row = {"D": D, "T": T, "B": B, "Hq": Hq, "Hkv": Hq // group, "results": {}}
        out.data["rows"].append(row)  # flushed after every provider: a case cut short keeps what it has
        log(f"attention: D={D} T={T} Hq={Hq} Hkv={Hq // group}")
        for name, fn in providers.items():
            try:
                row["results"][name] = bench.time_case(name, fn, B, Hq, Hq // group, T, D)
            except Exception as e:
                save_traceback(workdir, "attention", f"{name} D={D} T={T} group={group}")
                row["results"][name] = {"error": failure(e)}
            out.flush()
            log(f"attention: {name}: {json.dumps(row['results'][name])}")
        ours = row["results"].get(bench.OURS, {})
        for ref in ("sdpa_flash", "sdpa_cudnn"):
            r = row["results"].get(ref, {})
            for what in ("fwd", "fwd_bwd"):
                key = f"{what}_tflops"
                if key in ours and key in r:
                    row[f"ours_vs_{ref}_{what}"] = round(ours[key] / r[key], 3)
        out.flush()
        tiles_path.write_text(json.dumps({machine()["gpu"]: fa.autotuned_tiles()}, indent=1))


# ----------------------------------------------------------------------------------------------------------
# part 4: scratchlm train through the CLI


def part_cli(workdir: Path, deadline: float, cpu: bool) -> None:
    out = PartWriter(workdir, "cli")
    text = workdir / "corpus.txt"
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for path in sorted(stdlib.glob("*.py")):  # ~4 MB of real text: enough batches, prepared in seconds
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size > (300_000 if cpu else 4_000_000):
            break
    text.write_text("".join(parts), encoding="utf-8")
    run_dir = workdir / "cli_run"
    steps, interval = (6, 2) if cpu else (60, 10)
    args = [
        "preset=gpt2",
        *(CPU_MODEL if cpu else []),
        "tokenizer.kind=char",
        f"data.source={text}",
        f"data.data_dir={workdir / 'cli_shards'}",
        f"train.run_dir={run_dir}",
        f"train.device={'cpu' if cpu else 'cuda'}",
        f"train.dtype={'float32' if cpu else 'bfloat16'}",
        f"train.compile={'false' if cpu else 'true'}",
        f"train.batch_size={2 if cpu else 32}",
        f"train.max_steps={steps}",
        f"train.log_interval={interval}",
        "train.warmup_steps=10",
        "train.ckpt_interval=100000",
        "train.progress=false",
        "eval.interval=100000",
        "eval.batches=1",
        "eval.num_samples=0",
    ]
    cmd = [sys.executable, "-m", "scratchlm", "train", *args]
    out.data["command"] = "scratchlm train " + " ".join(args)
    log("cli: " + out.data["command"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.run(
        cmd, env=env, cwd=workdir, timeout=max(5, deadline - time.time() - 2), capture_output=True, text=True
    )
    (workdir / "logs" / "cli_train.log").write_text(proc.stdout + "\n---- stderr\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"scratchlm train exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    steady = [r for r in train if r["step"] >= 2 * interval]  # the first intervals include compilation
    if len(steady) < 2:
        raise RuntimeError(f"too few steady-state log records in metrics.jsonl: {train}")
    # wall clock between log records (every bit of the loop counted), and the loop's own tokens/s field
    # (which times the steps only)
    first, last = steady[0], steady[-1]
    wall = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    rates = sorted(r["tokens_per_s"] for r in steady[1:])
    out.add(
        {
            "label": "scratchlm train (CLI)",
            "batch": 2 if cpu else 32,
            "tokens_per_s": round(wall),
            "metrics_tokens_per_s_median": round(rates[len(rates) // 2]),
            "mfu": round(last["mfu"] * wall / last["tokens_per_s"], 4) if last.get("mfu") else None,
            "steps": f"{first['step']}..{last['step']}",
            "intervals": [(r["step"], round(r["tokens_per_s"])) for r in train],
            "wall_s": round(time.time() - t0, 1),
        }
    )


# ----------------------------------------------------------------------------------------------------------
# part 5: flash_triton under torch.compile


def part_flash_compile(workdir: Path, deadline: float, cpu: bool) -> None:
    out = PartWriter(workdir, "flash_compile")
    if cpu:
        out.note(
            "flash_triton needs CUDA; tests/model/kernels/test_flash_compile.py covers compile on the CPU"
        )
        return
    os.environ["SCRATCHLM_FLASH_TILES"] = "fixed"  # bounded: no autotuning inside this part
    import torch

    from scratchlm.model import build_model
    from scratchlm.model.kernels import flash_attention as fa
    from scratchlm.train.metrics import peak_flops
    from scratchlm.train.optim import build_optimizers
    from scratchlm.train.step import train_step

    cfg = gpt2_config(False, "model.attention=flash_triton", "train.lr=6e-4", "train.batch_size=16")
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    fwd = torch.compile(model)
    opts = build_optimizers(model, cfg.train)
    T = cfg.model.context_length
    x = torch.randint(0, cfg.model.vocab_size, (16, T + 1), device=device)  # one batch, learned by heart
    row = {"label": "gpt2, attention=flash_triton, compile", "batch": 16, "losses": [], "trains": False}
    out.data["rows"].append(row)  # flushed after every step: a run cut short shows how far it got
    t0 = time.perf_counter()
    for i in range(30):
        if time.time() > deadline - 3:
            out.note(f"stopped after {i} steps (out of time)")
            break
        if i == 10:
            torch.cuda.synchronize()
            t_steady = time.perf_counter()
        loss, _ = train_step(
            fwd, model, opts, [(x[:, :-1], x[:, 1:])], grad_clip=1.0, device=device, dtype=dtype
        )
        row["losses"].append(round(loss, 4))
        row["flash_kernels_ran"] = bool(fa._fixed_choice)  # fixed tiles chosen = our kernels launched
        row["wall_s_incl_compile"] = round(time.perf_counter() - t0, 1)
        out.flush()
        if i == 0:
            log(
                f"flash_compile: first step (compilation) done in {row['wall_s_incl_compile']} s, loss {loss:.3f}"
            )
    torch.cuda.synchronize()
    losses = row["losses"]
    peak = peak_flops(device, dtype)
    if len(losses) > 10:
        tokens_per_s = (len(losses) - 10) * 16 * T / (time.perf_counter() - t_steady)
        row.update(
            tokens_per_s=round(tokens_per_s),
            mfu=round(model.flops_per_token() * tokens_per_s / peak, 4) if peak else None,
        )
    row["trains"] = row["flash_kernels_ran"] and len(losses) >= 5 and losses[-1] < losses[0] - 0.5
    out.flush()
    log(f"result: {json.dumps(row)}")


# ----------------------------------------------------------------------------------------------------------
# the report


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# ScratchLM on {m.get('gpu', 'CPU')}",
        "",
        f"Command: `{report['command']}` ({report['wall_s']:.0f} s). "
        + ("**CPU plumbing run (--cpu): tiny model, numbers mean nothing.**" if report["cpu"] else ""),
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in m.items()),
        "",
        "## Training throughput (gpt2 preset, 124M, context 1024, bf16 autocast, torch.compile)"
        if not report["cpu"]
        else "## Training throughput (--cpu: tiny gpt2-shaped model, fp32, eager)",
        "",
        "| path | batch | tokens/s | MFU | ms/step | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    rows = report["parts"].get("loop", {}).get("rows", []) + report["parts"].get("cli", {}).get("rows", [])
    rows += report["parts"].get("flash_compile", {}).get("rows", [])
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r.get('batch')} | error: {r['error']} | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        tps = f"{r['tokens_per_s']:,}" if isinstance(r.get("tokens_per_s"), int) else "n/a"
        lines.append(
            f"| {r['label']} | {r.get('batch')} | {tps} | {mfu} | "
            f"{r.get('ms_per_step', '')} | {r.get('peak_mem_gib', '')} |"
        )
    loop = {r["label"]: r for r in report["parts"].get("loop", {}).get("rows", []) if "error" not in r}
    cli = next((r for r in report["parts"].get("cli", {}).get("rows", []) if "error" not in r), None)
    bare = loop.get("bare loop")  # the default compile mode at batch 32 (2 with --cpu)
    lines.append("")
    if bare and cli:
        lines.append(
            f"- `scratchlm train` / bare loop at batch {bare['batch']}: "
            f"{cli['tokens_per_s'] / bare['tokens_per_s']:.3f} (target >= 0.97)"
        )
    if bare and loop.get("train_step"):
        ts = loop["train_step"]
        lines.append(f"- `train_step` / bare loop: {ts['tokens_per_s'] / bare['tokens_per_s']:.3f}")
    best = max((r for r in loop.values() if r.get("mfu")), key=lambda r: r["mfu"], default=None)
    if best:
        lines.append(
            f"- best MFU: {100 * best['mfu']:.1f}% ({best['label']}, batch {best['batch']}; target >= 50%)"
        )
    fc = report["parts"].get("flash_compile", {}).get("rows", [])
    if fc and "error" not in fc[0]:
        lines.append(
            f"- flash_triton + compile trains the gpt2 preset: {fc[0]['trains']} (our kernels ran: "
            f"{fc[0].get('flash_kernels_ran')}; losses {fc[0]['losses'][:3]} ... {fc[0]['losses'][-3:]})"
        )
    cmd = report["parts"].get("cli", {}).get("command")
    if cmd:
        lines += ["", f"CLI run: `{cmd}`"]
    lines += profile_markdown(report["parts"].get("profile", {}).get("rows", []), report["cpu"])
    att = report["parts"].get("attention", {}).get("rows", [])
    if att:
        lines += [
            "",
            "## Attention (bf16, causal, B*T = 16K, H*D = 2048; TFLOP/s, forward / forward+backward)",
            "",
            "| D | T | Hq/Hkv | ours | sdpa flash | sdpa cuDNN | ours/cuDNN fwd | ours/cuDNN fwd+bwd |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in att:
            cells = []
            for n in ("flash_triton (ours)", "sdpa_flash", "sdpa_cudnn"):
                x = r["results"].get(n, {})
                cells.append(
                    f"{x['fwd_tflops']:.0f} / {x['fwd_bwd_tflops']:.0f}"
                    if "fwd_tflops" in x
                    else x.get("error", "n/a")
                )
            fr = lambda k, r=r: f"{r[k]:.2f}x" if k in r else "n/a"
            lines.append(
                f"| {r['D']} | {r['T']} | {r['Hq']}/{r['Hkv']} | "
                + " | ".join(cells)
                + f" | {fr('ours_vs_sdpa_cudnn_fwd')} | {fr('ours_vs_sdpa_cudnn_fwd_bwd')} |"
            )
        lines += ["", "Target: ours/cuDNN forward+backward >= 0.9 at D = 128, T >= 2K (goal 1.0)."]
    lines += ["", "## Parts", ""]
    for name, p in report["parts"].items():
        lines.append(
            f"- {name}: {p.get('status')} ({p.get('wall_s', 0):.0f} s)"
            + (f"; {p['error']}" if p.get("error") else "")
        )
        lines += [f"  - {n}" for n in p.get("notes", [])]
    return "\n".join(lines) + "\n"


def profile_markdown(rows: list[dict], cpu: bool) -> list[str]:
    """The profile part's table: time per step by kind of kernel, the kernels' own speed, the top kernels."""
    prof = next((r for r in rows if "error" not in r), None)
    if prof is None:
        return []
    busy = prof["device_busy_ms_per_step"]
    what = "ops' self CPU time" if cpu else "GPU kernel time"
    lines = [
        "",
        f"## Where one step's time goes (bare loop, batch {prof['batch']}, torch.profiler, {what})",
        "",
        f"Step: {prof['ms_per_step']} ms; busy: {busy} ms"
        + (
            f" (idle {100 * prof['device_idle_share']:.1f}%)"
            if prof.get("device_idle_share") is not None
            else ""
        ),
        "",
        "| kind | ms/step | share of busy |",
        "|---|---|---|",
    ]
    for kind, ms in prof["kinds_ms_per_step"].items():
        lines.append(f"| {kind} | {ms} | {100 * ms / busy:.1f}% |" if busy else f"| {kind} | {ms} | |")
    lines.append("")
    lines.append(
        f"- matmuls: {prof['matmul_tflops']} TFLOP/s (6N FLOPs); attention: {prof['attention_tflops']} "
        "TFLOP/s (12LTC FLOPs, causal half not saved)"
    )
    if prof.get("mfu_bound_matmul_and_attention_only"):
        lines.append(
            f"- MFU {100 * prof['mfu']:.1f}%; the bound with only matmuls and attention taking time: "
            f"{100 * prof['mfu_bound_matmul_and_attention_only']:.1f}%"
        )
    lines += ["", "| top kernels | ms/step |", "|---|---|"]
    lines += [f"| `{name.replace('|', '/')}` | {ms} |" for name, ms in prof["top_kernels_ms_per_step"]]
    return lines


def write_report(report: dict, workdir: Path, slug: str, out_dir: Path | None) -> None:
    """The report in benchmarks/results/ (a --cpu run: in the scratch directory only), and under $OUT."""
    results = workdir if report["cpu"] else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    suffix = "_cpu_dryrun" if report["cpu"] else ""
    try:
        markdown = to_markdown(report)
    except Exception:  # the JSON has everything; never lose it over the table
        markdown = (
            f"# gpu_bench report\n\nThe table could not be drawn:\n\n```\n{traceback.format_exc()}```\n"
        )
    files = {
        results / f"gpu_{slug}{suffix}.json": json.dumps(report, indent=1),
        results / f"gpu_{slug}{suffix}.md": markdown,
    }
    for path, text in files.items():
        path.write_text(text)
    tiles = workdir / "flash_tiles.json"
    if tiles.exists():
        shutil.copy(tiles, results / f"flash_tiles_{slug}.json")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copy(path, out_dir / path.name)
        if tiles.exists():
            shutil.copy(tiles, out_dir / f"flash_tiles_{slug}.json")
        shutil.copytree(workdir / "logs", out_dir / "logs", dirs_exist_ok=True)


def run_all(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget
    slug = device_slug()
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / f"scratchlm_gpu_bench_{slug}")
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "logs").mkdir(parents=True)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    report = {
        "command": "bash benchmarks/gpu.sh" + (" --cpu" if args.cpu else ""),
        "cpu": args.cpu,
        "machine": machine(),
        "parts": {},
        "wall_s": 0.0,
    }
    log(f"machine: {json.dumps(report['machine'])}")
    if not args.cpu and "gpu" not in report["machine"]:
        log("no CUDA GPU visible: run with --cpu for the plumbing check")
        return 2
    missing = [
        m for m in ("yaml", "numpy", "safetensors", "tqdm", "regex") if "MISSING" in str(report["machine"][m])
    ]
    if missing:  # yaml: every part (scratchlm.config); the others: the CLI part (and the loader, checkpoints)
        log(f"WARNING: missing packages {missing}; parts that import them will fail (see logs/)")
    parts = [p for p in PARTS if not args.parts or p[0] in args.parts]
    reserved = {name: (cpu_s if args.cpu else gpu_s) for name, gpu_s, cpu_s in parts}
    for i, (name, _, _) in enumerate(parts):
        later = sum(reserved[n] for n, _, _ in parts[i + 1 :])
        limit = min(
            reserved[name] + max(0, deadline - time.time() - later - reserved[name]), deadline - time.time()
        )
        entry = {"status": "skipped (no time left)", "wall_s": 0.0}
        report["parts"][name] = entry
        if limit < 8:
            log(f"{name}: skipped, {limit:.0f} s left")
            continue
        log(f"==== part {name}: up to {limit:.0f} s")
        t0 = time.time()
        cmd = [
            sys.executable,
            __file__,
            "part",
            name,
            "--workdir",
            str(workdir),
            "--deadline",
            str(t0 + limit - 3),
        ]
        cmd += ["--cpu"] if args.cpu else []
        log_path = workdir / "logs" / f"{name}.log"
        with log_path.open("w") as f:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )

            def pump(proc=proc, f=f, name=name):  # progress on the console, everything in the log
                for line in proc.stdout:
                    f.write(line)
                    f.flush()
                    if line.startswith("[gpu_bench") or "Error" in line:
                        print(f"  {name}| {line.rstrip()[:300]}", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                proc.wait(timeout=limit)
                entry["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (scratchlm train)
                proc.wait()
                entry["status"] = f"timed out after {limit:.0f} s (results so far kept)"
            reader.join(timeout=5)
        entry["wall_s"] = round(time.time() - t0, 1)
        part_json = workdir / f"{name}.json"
        if part_json.exists():
            entry.update(json.loads(part_json.read_text()))
        tb = workdir / "logs" / f"{name}.traceback.txt"
        if tb.exists():
            entry["error"] = tb.read_text().strip().splitlines()[-1][:300]
        log(f"{name}: {entry['status']} in {entry['wall_s']:.0f} s")
        report["wall_s"] = time.time() - t_start
        write_report(report, workdir, slug, out_dir)
    report["wall_s"] = time.time() - t_start
    write_report(report, workdir, slug, out_dir)
    log(
        f"done in {report['wall_s']:.0f} s: "
        + str(workdir / f"gpu_{slug}_cpu_dryrun.md" if args.cpu else RESULTS / f"gpu_{slug}.md")
    )
    return 0


def run_part(args) -> int:
    workdir = Path(args.workdir)
    fn = {
        "loop": part_loop,
        "profile": part_profile,
        "attention": part_attention,
        "cli": part_cli,
        "flash_compile": part_flash_compile,
    }
    try:
        fn[args.name](workdir, args.deadline, args.cpu)
    except Exception:
        save_traceback(workdir, args.name, "part")
        traceback.print_exc()
        return 1
    return 0


def merge_tiles(args) -> int:
    from scratchlm.model.kernels import flash_tiles

    for gpu, entries in json.loads(Path(args.file).read_text()).items():
        n = flash_tiles.merge_into_table(gpu, entries)
        print(f"{gpu}: {len(entries)} entries merged; the table has {n} for it ({flash_tiles.TABLE_PATH})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all", help="every part, bounded by --budget seconds")
    a.add_argument("--cpu", action="store_true", help="plumbing check on the CPU with a tiny model")
    a.add_argument("--budget", type=float, default=325.0, help="seconds for all parts together")
    a.add_argument("--parts", nargs="+", choices=[p[0] for p in PARTS], help="only these parts")
    a.add_argument("--workdir", help="scratch directory (default $TMPDIR/scratchlm_gpu_bench_<device>)")
    p = sub.add_parser("part", help="one part (used by `all`)")
    p.add_argument("name", choices=[p[0] for p in PARTS])
    p.add_argument("--workdir", required=True)
    p.add_argument("--deadline", type=float, required=True, help="time.time() by which to stop")
    p.add_argument("--cpu", action="store_true")
    m = sub.add_parser("merge-tiles", help="merge a flash_tiles_<device>.json into the shipped table")
    m.add_argument("file")
    args = parser.parse_args(argv)
    return {"all": run_all, "part": run_part, "merge-tiles": merge_tiles}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
