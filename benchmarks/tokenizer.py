"""Tokenizer benchmark: BPE training vs HF tokenizers' BpeTrainer, encoding vs tiktoken and HF tokenizers.

    python benchmarks/tokenizer.py            # writes benchmarks/results/tokenizer.{json,md}

Training: same corpus, same vocab size (10K), same number of cores (ours: worker processes; HF: rayon
threads, RAYON_NUM_THREADS), each run in a fresh process so that peak RSS (the process and its workers)
is its own. Corpora: the 5 MB TinyStories sample (valid_head.txt + train_lowercased_4M.txt) and the
built-in corpus (the standard library files of `scratchlm.corpus.builtin_corpus()`, train + val).
Encoding: the GPT-2 vocabulary in all three libraries (same work), single call on the whole text and a
batch of documents, on the first 2 MB of each corpus; 7 rounds, every encoder timed back to back in each
round: MB/s of UTF-8 input is the median over rounds, "vs tiktoken" the median of the per-round ratios (both
sides under the same machine load). scratchlm's fast path is tiktoken's Rust BPE on threads: one thread
group per call for a batch, safe-cut pieces of a long text (see scratchlm.tokenizer.tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SCRATCHLM_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
VOCAB = 10_000
SPECIALS = ["<|endoftext|>"]
ENCODE_CHARS = 2_000_000


def corpus_files(name: str) -> list[str]:
    if name == "tinystories_5mb":
        return [
            str(SHARED / "tinystories/valid_head.txt"),
            str(SHARED / "tinystories/train_lowercased_4M.txt"),
        ]
    from scratchlm.corpus import builtin_corpus

    b = builtin_corpus()
    return [str(p) for p in b.train.paths + b.val.paths]


def child_train(trainer: str, corpus: str, cores: int) -> dict:
    """Runs in a fresh process: train once, report wall time, CPU time and peak RSS (self + children)."""
    files = corpus_files(corpus)
    start = time.perf_counter()
    cpu0 = time.process_time()
    if trainer == "scratchlm":
        from scratchlm.tokenizer import train_bpe

        tok = train_bpe(files, VOCAB, special_tokens=SPECIALS, num_workers=cores, progress=False)
        vocab = tok.vocab_size
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t = trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        hf.train(files, t)
        vocab = hf.get_vocab_size()
    wall = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": wall,
        "cpu_s": time.process_time() - cpu0 + kids.ru_utime + kids.ru_stime,
        "peak_rss_mb": max(own.ru_maxrss, kids.ru_maxrss) / 1024,
        "vocab_size": vocab,
        "bytes": sum(Path(f).stat().st_size for f in files),
    }


def run_child(trainer: str, corpus: str, cores: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(cores), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run(
        [sys.executable, __file__, "--child", trainer, "--corpus", corpus, "--cores", str(cores)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_encode(text: str, docs: list[str], repeats: int = 7) -> dict:
    import tiktoken
    from tokenizers import Tokenizer, models, pre_tokenizers

    from scratchlm.tokenizer import load_tokenizer

    ours = load_tokenizer(SHARED / "gpt2")
    tt = tiktoken.get_encoding("gpt2")
    hf = Tokenizer(models.BPE.from_file(str(SHARED / "gpt2/vocab.json"), str(SHARED / "gpt2/merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    n_bytes = len(text.encode("utf-8"))
    doc_bytes = sum(len(d.encode("utf-8")) for d in docs)
    sample = text[:300_000]
    cases = {
        "scratchlm (tiktoken path)": (lambda: ours.encode(text), lambda: ours.encode_batch(docs)),
        "tiktoken gpt2": (lambda: tt.encode_ordinary(text), lambda: tt.encode_ordinary_batch(docs)),
        "HF tokenizers": (lambda: hf.encode(text).ids, lambda: [e.ids for e in hf.encode_batch(docs)]),
    }
    assert ours.encode(text) == tt.encode_ordinary(text) == hf.encode(text).ids
    single = {name: [] for name in cases}
    batch = {name: [] for name in cases}
    for _ in range(repeats):  # round-robin, so that machine noise hits every encoder alike
        for name, (one, many) in cases.items():
            single[name].append(_timed(one))
            batch[name].append(_timed(many))
    tt_name = "tiktoken gpt2"
    results = {
        name: {
            "single_MBps": n_bytes / 1e6 / statistics.median(single[name]),
            "batch_MBps": doc_bytes / 1e6 / statistics.median(batch[name]),
            # speed relative to tiktoken, per round (both timed back to back), median over rounds
            "single_vs_tiktoken": statistics.median(t / o for t, o in zip(single[tt_name], single[name])),
            "batch_vs_tiktoken": statistics.median(t / o for t, o in zip(batch[tt_name], batch[name])),
        }
        for name in cases
    }
    ref = min(_timed(lambda: ours.encode_reference(sample)) for _ in range(2))
    ours._cache.clear()
    results["scratchlm pure-Python reference"] = {
        "single_MBps": len(sample.encode()) / 1e6 / ref,
        "batch_MBps": None,
        "note": "first 300 KB, warm cache",
    }
    return results


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": version("torch"),
        "tokenizers": version("tokenizers"),
        "tiktoken": version("tiktoken"),
        "loadavg_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["scratchlm", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default="tinystories_5mb", help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=2, help="cores for both trainers (default 2)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="training runs per trainer and corpus (best kept)"
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_train(args.child, args.corpus, args.cores)))
        return
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    report: dict = {"machine": machine(), "vocab_size": VOCAB, "cores": args.cores, "train": {}, "encode": {}}
    for corpus in ["tinystories_5mb", "builtin"]:
        runs: dict[str, list[dict]] = {"hf": [], "scratchlm": []}
        for _ in range(args.repeats):  # alternate, so that machine noise hits both trainers alike
            for trainer in runs:
                runs[trainer].append(run_child(trainer, corpus, args.cores))
        row = {trainer: min(r, key=lambda x: x["wall_s"]) for trainer, r in runs.items()}
        print(corpus, row, flush=True)
        row["wall_ratio"] = row["scratchlm"]["wall_s"] / row["hf"]["wall_s"]
        row["rss_ratio"] = row["scratchlm"]["peak_rss_mb"] / row["hf"]["peak_rss_mb"]
        report["train"][corpus] = row
    # encoding: the first ~2 MB of each corpus (HF's single-call encode is slow on very long strings)
    text = "".join(Path(f).read_text() for f in corpus_files("tinystories_5mb"))[:ENCODE_CHARS]
    report["encode"]["tinystories_2mb"] = bench_encode(text, [d for d in text.split("\n\n") if d])
    docs, size = [], 0
    for f in corpus_files("builtin"):
        if size >= ENCODE_CHARS:
            break
        docs.append(Path(f).read_text(errors="replace"))
        size += len(docs[-1])
    report["encode"]["builtin_2mb"] = bench_encode("\n".join(docs), docs)
    for rows in report["encode"].values():  # the pure-Python reference: its own sample, a plain ratio
        tt, ref = rows["tiktoken gpt2"], rows["scratchlm pure-Python reference"]
        ref["single_vs_tiktoken"], ref["batch_vs_tiktoken"] = ref["single_MBps"] / tt["single_MBps"], None
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tokenizer.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "tokenizer.md").write_text(markdown(report))
    print(markdown(report))


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Tokenizer benchmark",
        "",
        f"Command: `python benchmarks/tokenizer.py` | {m['cpu']}, {m['cores']} cores, {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, tokenizers {m['tokenizers']}, tiktoken {m['tiktoken']}, "
        f"load average at start {m['loadavg_at_start'][0]:.1f}",
        "",
        f"## BPE training (vocab {r['vocab_size']}, {r['cores']} cores, best of runs)",
        "",
        "| corpus | MB | HF BpeTrainer wall s | scratchlm wall s | ratio | HF CPU s | scratchlm CPU s "
        "| HF peak RSS MB | scratchlm peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus, row in r["train"].items():
        hf, us = row["hf"], row["scratchlm"]
        lines.append(
            f"| {corpus} | {hf['bytes'] / 1e6:.1f} | {hf['wall_s']:.2f} | {us['wall_s']:.2f} | "
            f"{row['wall_ratio']:.2f}x | {hf['cpu_s']:.2f} | {us['cpu_s']:.2f} | {hf['peak_rss_mb']:.0f} | "
            f"{us['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "## Encoding throughput (GPT-2 vocabulary, MB/s of UTF-8 input; medians of 7 round-robin rounds, "
        "ratios per round)",
        "",
        "| text | encoder | one call MB/s | vs tiktoken | batch of docs MB/s | vs tiktoken |",
        "|---|---|---|---|---|---|",
    ]
    for corpus, rows in r["encode"].items():
        for name, row in rows.items():
            batch = (
                f"{row['batch_MBps']:.1f} | {row['batch_vs_tiktoken']:.2f}x" if row["batch_MBps"] else "- | -"
            )
            lines.append(
                f"| {corpus} | {name} | {row['single_MBps']:.1f} | {row['single_vs_tiktoken']:.2f}x | {batch} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
