"""Data pipeline benchmark: prepare throughput (all cores vs one worker) and flat memory (1 GB vs 10 MB).

    nice .venv/bin/python benchmarks/data_pipeline.py                  # 1 GB "large" corpus (default)
    nice .venv/bin/python benchmarks/data_pipeline.py --large-mb 200   # a smaller "large" on a busy machine

Corpora are generated under --workdir (default /tmp/scratchlm-data-bench, never the repo) as jsonl of
TinyStories paragraphs (../shared/data/tinystories) in a seeded random order. Peer: the nanoGPT-style
in-memory prepare (read everything, ``tiktoken`` ``encode_ordinary`` in one process, ``np.array``, write),
timed and measured on the same throughput corpus. Peak RSS is measured in a fresh child process per case
(``ru_maxrss`` of the process itself and of its worker processes). Writes benchmarks/results/data_pipeline.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLM_SHARED_DATA", REPO.parent / "shared" / "data"))


def machine() -> dict:
    import torch

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def make_corpus(path: Path, mb: float) -> Path:
    """A jsonl of TinyStories paragraphs, ``mb`` MB, deterministic."""
    if path.exists() and abs(path.stat().st_size - mb * 1e6) < 1e6:
        return path
    paras = [
        p for p in (SHARED / "tinystories" / "train_lowercased_4M.txt").read_text().split("\n\n") if p.strip()
    ]
    rng, size = random.Random(0), 0
    tmp = path.with_suffix(".partial")
    with open(tmp, "w") as f:
        while size < mb * 1e6:
            k = rng.randint(1, 8)  # documents of 1-8 paragraphs
            line = json.dumps({"text": "\n\n".join(rng.choice(paras) for _ in range(k))}) + "\n"
            f.write(line)
            size += len(line.encode())
    tmp.replace(path)
    return path


def child(args: argparse.Namespace) -> None:
    """One measured case, in a fresh process: prints a JSON line."""
    from scratchlm.corpus import resolve_source
    from scratchlm.data.loader import TokenLoader
    from scratchlm.data.prepare import prepare
    from scratchlm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.case == "naive":  # the peer: nanoGPT's in-memory prepare
        import numpy as np
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        ids = []
        with open(args.corpus) as f:
            for line in f:
                ids += enc.encode_ordinary(json.loads(line)["text"]) + [enc.eot_token]
        np.array(ids, dtype=np.uint16).tofile(out.with_suffix(".naive.bin"))
        prep_s = time.perf_counter() - t0
    else:
        meta = prepare(
            resolve_source([args.corpus]),
            tok,
            out,
            val_fraction=0.01,
            num_workers=args.workers,
            progress=False,
        )
        prep_s = meta["seconds"]
    prep_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_s = None
    if args.batches:
        loader = TokenLoader(out, "train", 16, 256, mode="random", seed=0)
        t1 = time.perf_counter()
        for _ in range(args.batches):
            loader.next_batch()
        load_s = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "prepare_s": prep_s,
                "mb": Path(args.corpus).stat().st_size / 1e6,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "prepare_rss_mb": prep_rss,
                "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "loader_batches_per_s": args.batches / load_s if load_s else None,
            }
        )
    )


def run_case(
    corpus: Path, out: Path, workers: int, batches: int, tokenizer: str, case: str = "prepare"
) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--case",
        case,
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--batches",
        str(batches),
        "--tokenizer",
        tokenizer,
    ]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken_cache")},
    )
    if res.returncode:
        raise SystemExit(f"case failed: {' '.join(cmd)}\n{res.stderr}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["mb_per_s"] = r["mb"] / r["prepare_s"]
    shutil.rmtree(out, ignore_errors=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large-mb", type=float, default=1000.0, help="the large corpus for the memory test")
    ap.add_argument("--small-mb", type=float, default=10.0, help="the small corpus for the memory test")
    ap.add_argument("--throughput-mb", type=float, default=50.0, help="corpus for the worker-scaling test")
    ap.add_argument("--batches", type=int, default=1000, help="loader batches (16 x 256) after prepare")
    ap.add_argument("--tokenizer", default=str(SHARED / "gpt2"), help="tokenizer for prepare (default GPT-2)")
    ap.add_argument("--workdir", default="/tmp/scratchlm-data-bench")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default="prepare", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {"machine": machine(), "tokenizer": args.tokenizer, "cores_used": cores}
    tp = make_corpus(work / f"corpus_{args.throughput_mb:g}mb.jsonl", args.throughput_mb)
    one = run_case(tp, work / "out_tp1", 1, 0, args.tokenizer)
    allc = run_case(tp, work / "out_tpN", cores, 0, args.tokenizer)
    naive = run_case(tp, work / "out_naive", 1, 0, args.tokenizer, case="naive")
    result["throughput"] = {
        "corpus_mb": args.throughput_mb,
        "one_worker": one,
        "all_cores": allc,
        "naive_peer": naive,
        "speedup_all_vs_one": allc["mb_per_s"] / one["mb_per_s"],
    }
    print(json.dumps(result["throughput"], indent=1), flush=True)
    small = run_case(
        make_corpus(work / f"corpus_{args.small_mb:g}mb.jsonl", args.small_mb),
        work / "out_s",
        cores,
        args.batches,
        args.tokenizer,
    )
    large = run_case(
        make_corpus(work / f"corpus_{args.large_mb:g}mb.jsonl", args.large_mb),
        work / "out_l",
        cores,
        args.batches,
        args.tokenizer,
    )
    result["memory"] = {
        "small": small,
        "large": large,
        "peak_rss_diff_mb": large["peak_rss_mb"] - small["peak_rss_mb"],
        "worker_rss_diff_mb": large["worker_peak_rss_mb"] - small["worker_peak_rss_mb"],
        "goal_mb": 100,
    }
    write(result, args)


def write(r: dict, args: argparse.Namespace) -> None:
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(r, indent=2) + "\n")
    t, m = r["throughput"], r["memory"]
    lines = [
        "# Data pipeline benchmark",
        "",
        f"Command: `nice .venv/bin/python benchmarks/data_pipeline.py --large-mb {args.large_mb:g}` "
        f"(tokenizer: {Path(r['tokenizer']).name})",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['platform']}, "
        f"torch {r['machine']['torch']}, load average at start {r['machine']['load_avg_at_start']}",
        "",
        f"## Prepare throughput ({t['corpus_mb']:g} MB jsonl)",
        "",
        "| run | MB/s | seconds | peak RSS main (MB) | peak RSS worker (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, c in (
        ("scratchlm, 1 worker (in-process)", t["one_worker"]),
        (f"scratchlm, {r['cores_used']} workers", t["all_cores"]),
        ("peer: nanoGPT-style in-memory (tiktoken, 1 process)", t["naive_peer"]),
    ):
        lines.append(
            f"| {name} | {c['mb_per_s']:.2f} | {c['prepare_s']:.1f} | {c['prepare_rss_mb']:.0f} | "
            f"{c['worker_peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Speed-up all cores vs one worker: **{t['speedup_all_vs_one']:.2f}x**; "
        f"vs the in-memory peer: {t['all_cores']['mb_per_s'] / t['naive_peer']['mb_per_s']:.2f}x",
        "",
        f"## Peak RSS: prepare + {args.batches} loader batches (16 x 256, random)",
        "",
        "| corpus | MB | prepare MB/s | peak RSS main (MB) | peak RSS worker (MB) | loader batches/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("small", "large"):
        c = m[name]
        lines.append(
            f"| {name} | {c['mb']:.0f} | {c['mb_per_s']:.2f} | {c['peak_rss_mb']:.0f} | "
            f"{c['worker_peak_rss_mb']:.0f} | {c['loader_batches_per_s']:.0f} |"
        )
    lines += [
        "",
        f"Peak RSS difference large - small: main {m['peak_rss_diff_mb']:+.0f} MB, workers "
        f"{m['worker_rss_diff_mb']:+.0f} MB (goal <= {m['goal_mb']} MB)",
        "",
    ]
    (out / "data_pipeline.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
