"""Streaming benchmark: training tokens/s streaming vs pre-sharded, start-up time and flat memory.

    .venv/bin/python benchmarks/streaming.py                          # 1 GB large source (default)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/streaming.py --rounds 10   # a crowded machine: 1 thread each

Tokens/s: one process trains the ``cpu-small`` preset (4 x 192, context 128, batch 16) with the real
``train_step`` and takes its batches from two loaders over the same 10 MB jsonl of TinyStories paragraphs
and the same BPE tokenizer (vocab 4096):

* peer: **pre-sharded**: ``scratchlm data prepare`` first (not timed), then the sequential shard loader
  (``data.loader=sequential``: the order the stream reads in);
* **streaming**: ``StreamLoader`` on the jsonl, tokenized while training by one worker process.

The sides alternate in rounds of ``--steps-per-round`` steps each (order swapped every round), on the same
model, so both see the same machine load; a step's time is batch fetch + forward + backward + optimizer
step, as the trainer's ``tokens_per_s``. Result: the median of the per-round ratios, and the CPU seconds the
stream worker spent per streamed step (its whole cost, whether or not it overlaps training).

Memory and start-up: a fresh process opens a 10 MB and a --large-mb source (``StreamLoader``, one worker),
reads ``--memory-batches`` batches and reports the seconds to the first batch (no prepare pass) and the
peak RSS of the process plus its worker (sampled every 0.05 s with psutil).
Writes benchmarks/results/streaming.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLM_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "src"))


def machine() -> dict:
    import torch

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def make_corpus(path: Path, mb: float) -> Path:
    """A jsonl of TinyStories paragraphs (1-8 per document, seeded order), ``mb`` MB; reused when present."""
    if path.exists() and abs(path.stat().st_size - mb * 1e6) < 1e6:
        return path
    paras = [
        p for p in (SHARED / "tinystories" / "train_lowercased_4M.txt").read_text().split("\n\n") if p.strip()
    ]
    rng, size = random.Random(0), 0
    tmp = path.with_suffix(".partial")
    with open(tmp, "w") as f:
        while size < mb * 1e6:
            line = (
                json.dumps({"text": "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 8)))}) + "\n"
            )
            f.write(line)
            size += len(line.encode())
    tmp.replace(path)
    return path


def tree_rss_sampler(pid: int, stop: threading.Event, out: list[float]) -> None:
    """Peak of the summed RSS of ``pid`` and its descendants, in MB, into ``out[0]``."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            out[0] = max(out[0], total / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.05)


def memory_child(source: str, tokenizer: str, batches: int) -> None:
    """In a fresh process: open the stream, read batches; print seconds to the first batch and peak RSS."""
    from scratchlm.data.stream import Candidate, StreamLoader
    from scratchlm.tokenizer import load_tokenizer

    peak, stop = [0.0], threading.Event()
    threading.Thread(target=tree_rss_sampler, args=(os.getpid(), stop, peak), daemon=True).start()
    tok = load_tokenizer(tokenizer)
    t0 = time.perf_counter()
    loader = StreamLoader([Candidate(source, [(1.0, [source])])], tok, 16, 128, workers=1)
    loader.next_batch()
    first = time.perf_counter() - t0
    for _ in range(batches - 1):
        loader.next_batch()
    time.sleep(0.2)
    stop.set()
    print(json.dumps({"first_batch_s": first, "peak_rss_mb": peak[0], "batches": batches}))
    loader.close()


def throughput(args: argparse.Namespace, work: Path, small: Path, shards: Path) -> dict:
    """Alternating rounds of training steps on the two loaders; per-round tokens/s and their ratio."""
    import psutil
    import torch

    from scratchlm.config import load_config
    from scratchlm.data.loader import TokenLoader
    from scratchlm.data.stream import Candidate, StreamLoader
    from scratchlm.model import build_model
    from scratchlm.tokenizer import load_tokenizer
    from scratchlm.train.optim import build_optimizers, set_lr
    from scratchlm.train.trainer import train_step

    tok = load_tokenizer(work / "tokenizer.json")
    # the model and optimizer the recorded results were measured with (cpu-small before its retuning)
    old_small = ["model.d_model=192", "train.optimizer=adamw"]
    cfg = load_config(
        None, ["preset=cpu-small", *old_small, f"model.vocab_size={tok.vocab_size}", "train.device=cpu"]
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizers = build_optimizers(model, cfg.train)
    B, T = cfg.train.batch_size, cfg.model.context_length
    loaders = {
        "pre-sharded": TokenLoader(shards, batch_size=B, context_length=T, mode="sequential"),
        "streaming": StreamLoader([Candidate(str(small), [(1.0, [str(small)])])], tok, B, T, workers=1),
    }
    workers = psutil.Process().children(recursive=True)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    step, fetch = [0], {side: [] for side in loaders}  # fetch: seconds in next_batch, per step
    cpu: dict[str, float] = {}  # tokens per CPU second of the last steps() of each side

    def worker_cpu() -> float:
        return sum(sum(w.cpu_times()[:2]) for w in workers)

    def steps(side: str, n: int) -> float:
        """Wall tokens/s of n steps; also records CPU tokens/s (this process + the stream worker)."""
        t0, c0, w0 = time.perf_counter(), time.process_time(), worker_cpu()
        for _ in range(n):
            set_lr(optimizers, step[0], cfg.train, 0.0)
            f0 = time.perf_counter()
            batch = loaders[side].next_batch()
            fetch[side].append(time.perf_counter() - f0)
            train_step(
                model, model, optimizers, [batch], grad_clip=1.0, device=torch.device("cpu"), dtype=dtype
            )
            step[0] += 1
        cpu[side] = n * B * T / (time.process_time() - c0 + worker_cpu() - w0)
        return n * B * T / (time.perf_counter() - t0)

    for side in loaders:  # warm-up: allocator, first batches
        steps(side, 1)
        fetch[side].clear()
    cpu0 = worker_cpu()
    rounds = []
    for r in range(args.rounds):
        order = list(loaders) if r % 2 == 0 else list(loaders)[::-1]
        res = {side: steps(side, args.steps_per_round) for side in order}
        res["ratio"] = res["streaming"] / res["pre-sharded"]
        res["cpu_ratio"] = cpu["streaming"] / cpu["pre-sharded"]  # insensitive to waiting for a core
        rounds.append(res)
        print(
            f"round {r}: "
            + ", ".join(f"{s} {res[s]:.0f} tok/s" for s in loaders)
            + f", ratio {res['ratio']:.3f} (CPU time: {res['cpu_ratio']:.3f})",
            flush=True,
        )
    worker_s = worker_cpu() - cpu0
    streamed = args.rounds * args.steps_per_round
    loaders["streaming"].close()
    return {
        "fetch_ms_per_step": {side: 1e3 * statistics.median(f) for side, f in fetch.items()},
        "rounds": rounds,
        "worker_cpu_s_per_step": worker_s / streamed,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/scratchlm-stream-bench")
    ap.add_argument("--small-mb", type=float, default=10)
    ap.add_argument("--large-mb", type=float, default=1000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--memory-batches", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--memory-child", nargs=2, metavar=("SOURCE", "TOKENIZER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, args.memory_batches)
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from scratchlm.tokenizer import train_bpe

    small = make_corpus(work / f"small_{args.small_mb:g}mb.jsonl", args.small_mb)
    if not (work / "tokenizer.json").exists():
        sample = work / "tokenizer_sample.txt"
        sample.write_text((SHARED / "tinystories" / "train_lowercased_4M.txt").read_text()[:3_000_000])
        train_bpe([sample], 4096, special_tokens=["<|endoftext|>"], progress=False).save(
            work / "tokenizer.json"
        )
    shards = work / "shards"
    if not (shards / "meta.json").exists():
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
        cmd = [
            sys.executable,
            "-m",
            "scratchlm",
            "data",
            "prepare",
            str(small),
            "--out",
            str(shards),
            "--tokenizer",
            str(work / "tokenizer.json"),
            "--val-fraction",
            "0.01",
            "--no-progress",
        ]
        subprocess.run(cmd, env=env, check=True)
    result = {
        "machine": machine(),
        "command": ".venv/bin/python benchmarks/streaming.py " + " ".join(sys.argv[1:]),
    }
    result.update(throughput(args, work, small, shards))
    result["median_ratio"] = statistics.median(r["ratio"] for r in result["rounds"])
    result["median_cpu_ratio"] = statistics.median(r["cpu_ratio"] for r in result["rounds"])
    large = make_corpus(work / f"large_{args.large_mb:g}mb.jsonl", args.large_mb)
    memory = {}
    for label, path in (("small", small), ("large", large)):
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            str(path),
            str(work / "tokenizer.json"),
            "--memory-batches",
            str(args.memory_batches),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        memory[label] = {**json.loads(out), "source_mb": path.stat().st_size / 1e6}
        print(f"memory {label}: {memory[label]}", flush=True)
    result["memory"] = memory
    result["rss_growth_mb"] = memory["large"]["peak_rss_mb"] - memory["small"]["peak_rss_mb"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "streaming.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Streaming benchmark",
        "",
        f"Command: `{r['command'].strip()}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, torch {m['torch']}, load average at start "
        f"{tuple(round(x, 2) for x in m['load_avg_at_start'])} (shared with other jobs: the sides alternate)",
        "",
        f"## Training tokens/s, cpu-small preset ({r['dtype']}, {r['torch_threads']} torch threads; 10 MB jsonl, "
        "BPE 4096)",
        "",
        "| round | pre-sharded (tokens/s) | streaming (tokens/s) | streaming / pre-sharded | same, per CPU second |",
        "|---|---|---|---|---|",
    ]
    for i, rd in enumerate(r["rounds"]):
        lines.append(
            f"| {i} | {rd['pre-sharded']:.0f} | {rd['streaming']:.0f} | {rd['ratio']:.3f} | {rd['cpu_ratio']:.3f} |"
        )
    lines += [
        "",
        f"Median ratio: **{r['median_ratio']:.3f}** (goal >= 0.95); per CPU second (the training process + the "
        f"stream worker's CPU time, which waiting for a core on a shared machine does not inflate): "
        f"**{r['median_cpu_ratio']:.3f}**. The stream worker used "
        f"{r['worker_cpu_s_per_step'] * 1e3:.1f} ms of CPU per streamed step (reading + tokenizing its 2,048 "
        f"tokens); the training process spent a median {r['fetch_ms_per_step']['streaming']:.2f} ms per step "
        f"fetching a streamed batch vs {r['fetch_ms_per_step']['pre-sharded']:.2f} ms for a sharded one.",
        "",
        "## Start-up and peak RSS of the data path (StreamLoader + its worker, summed)",
        "",
        "| source | MB | seconds to the first batch | peak RSS (MB) | batches read |",
        "|---|---|---|---|---|",
    ]
    for label, mm in r["memory"].items():
        lines.append(
            f"| {label} | {mm['source_mb']:.0f} | {mm['first_batch_s']:.2f} | {mm['peak_rss_mb']:.0f} "
            f"| {mm['batches']} |"
        )
    lines += ["", f"Peak RSS growth large - small: **{r['rss_growth_mb']:+.0f} MB** (goal <= +100 MB)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
