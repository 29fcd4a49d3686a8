"""Tokenizer benchmark: BPE training vs HF tokenizers' BpeTrainer, encoding vs tiktoken and HF tokenizers.

    python benchmarks/tokenizer.py                                  # -> benchmarks/results/tokenizer.{json,md}
    python benchmarks/tokenizer.py --train-only --sizes 10,30,100   # -> benchmarks/results/tokenizer_train.*

Training: same corpus, same vocab size (10K), same number of cores (ours: worker processes; HF: rayon
threads, RAYON_NUM_THREADS), each run in a fresh process. Rounds alternate the two trainers (and which one
goes first), so machine noise hits both alike; "speed-up" is HF's wall time over ours in the same round,
median and range over rounds. Wall time is the whole command, interpreter start and imports included.
Memory is sampled every 20 ms over the process tree (ours: the trainer and its worker processes; HF: one
process with threads): the peak of the summed RSS (pages shared by forked workers counted in each), the
peak of the summed PSS (shared pages divided among the processes that share them) and the trainer
process's own peak RSS (getrusage). Corpora: the 5 MB TinyStories sample (valid_head.txt +
train_lowercased_4M.txt), the built-in corpus (the standard library files of
`scratchlm.corpus.builtin_corpus()`, train + val), and mixed corpora of N MB (`--sizes`): 1 MB files taken
in turn from Tiny Shakespeare, TinyStories, the Multi30k captions (en/de/fr), the HellaSwag contexts and
endings, and the built-in corpus (code), each source read on from where its last file stopped and wrapping
around at its end (~38 MB of distinct text: larger corpora repeat it).
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


def corpus_files(name: str, workdir: str | None = None) -> list[str]:
    if name.startswith("mixed_"):
        return [str(p) for p in sorted(Path(workdir, name).iterdir())]
    if name == "tinystories_5mb":
        return [
            str(SHARED / "tinystories/valid_head.txt"),
            str(SHARED / "tinystories/train_lowercased_4M.txt"),
        ]
    from scratchlm.corpus import builtin_corpus

    b = builtin_corpus()
    return [str(p) for p in b.train.paths + b.val.paths]


def mixed_sources() -> dict[str, str]:
    """The texts a mixed corpus is cut from: prose, stories, captions in three languages, HellaSwag, code."""
    texts = {"shakespeare": (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")}
    texts["tinystories"] = "".join(
        (SHARED / "tinystories" / f).read_text(encoding="utf-8")
        for f in ["valid_head.txt", "train_lowercased_4M.txt"]
    )
    texts["multi30k"] = "".join(
        p.read_text(encoding="utf-8") for p in sorted((SHARED / "multi30k").iterdir()) if p.is_file()
    )
    items = [json.loads(line) for line in (SHARED / "hellaswag/hellaswag_val.jsonl").open(encoding="utf-8")]
    texts["hellaswag"] = "".join(f"{it['ctx']} {' '.join(it['endings'])}\n" for it in items)
    from scratchlm.corpus import builtin_corpus

    b = builtin_corpus()
    texts["code"] = "\n".join(
        p.read_text(encoding="utf-8", errors="replace") for p in b.train.paths + b.val.paths
    )
    return texts


def build_mixed(size_mb: int, out: Path, block_chars: int = 1_000_000) -> None:
    """Write ``size_mb`` MB of mixed text into ``out`` as ~1 MB files, taken from the sources in turn."""
    out.mkdir(parents=True, exist_ok=True)
    sources = mixed_sources()
    offset = dict.fromkeys(sources, 0)
    written, i = 0, 0
    while written < size_mb * 1_000_000:
        for name, text in sources.items():
            if written >= size_mb * 1_000_000:
                break
            start = offset[name]
            block = (
                (text[start:] + text)[:block_chars]
                if start + block_chars > len(text)
                else text[start : start + block_chars]
            )
            offset[name] = (start + block_chars) % len(text)
            data = block.encode("utf-8")[: size_mb * 1_000_000 - written]
            (out / f"{i:05d}_{name}.txt").write_bytes(data)
            written += len(data)
            i += 1


def child_train(trainer: str, corpus: str, cores: int, workdir: str | None = None) -> dict:
    """Runs in a fresh process: train once, report wall time, CPU time and peak RSS (self + children)."""
    files = corpus_files(corpus, workdir)
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


def run_child(trainer: str, corpus: str, cores: int, workdir: str | None = None) -> dict:
    """Train in a fresh process while sampling the memory of its process tree; the child's report plus
    ``command_s`` (the whole command), ``tree_rss_mb`` / ``tree_pss_mb`` (peaks of the sums) and the
    load average before the run."""
    import threading

    import psutil

    env = dict(os.environ, RAYON_NUM_THREADS=str(cores), TOKENIZERS_PARALLELISM="true")
    cmd = [sys.executable, __file__, "--child", trainer, "--corpus", corpus, "--cores", str(cores)]
    if workdir:
        cmd += ["--workdir", workdir]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0, "main": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            rss = pss = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        mem = p.memory_full_info()
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    rss += mem.rss
                    pss += getattr(mem, "pss", mem.rss)
                    if p is root:
                        peak["main"] = max(peak["main"], mem.rss)
            except psutil.NoSuchProcess:
                break
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    command_s = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{trainer} on {corpus} failed:\n{stderr[-2000:]}")
    row = json.loads(stdout.strip().splitlines()[-1])
    row.update(
        command_s=command_s,
        tree_rss_mb=peak["rss"] / 2**20,
        tree_pss_mb=peak["pss"] / 2**20,
        main_rss_mb=peak["main"] / 2**20,
        loadavg=load,
    )
    return row


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
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--build-mixed", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, default=2, help="cores for both trainers (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per corpus (default 3)")
    parser.add_argument("--sizes", default="10,30", help="mixed corpora to build, in MB (default 10,30)")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="BPE training on the mixed corpora only, written to results/tokenizer_train.{json,md}",
    )
    args = parser.parse_args(argv)
    if args.build_mixed:
        build_mixed(args.build_mixed, Path(args.workdir))
        return
    if args.child:
        print(json.dumps(child_train(args.child, args.corpus, args.cores, args.workdir)))
        return
    import tempfile

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    sizes = [int(x) for x in args.sizes.split(",") if x]
    report: dict = {
        "machine": machine(),
        "vocab_size": VOCAB,
        "cores": args.cores,
        "repeats": args.repeats,
        "train": {},
        "encode": {},
    }
    corpora = [] if args.train_only else ["tinystories_5mb", "builtin"]
    with tempfile.TemporaryDirectory(prefix="scratchlm_bench_") as workdir:
        for mb in sizes:  # built in a child process: this one stays small (a child's peak RSS starts at ours)
            out = str(Path(workdir, f"mixed_{mb}mb"))
            subprocess.run([sys.executable, __file__, "--build-mixed", str(mb), "--workdir", out], check=True)
            corpora.append(f"mixed_{mb}mb")
        for corpus in corpora:
            report["train"][corpus] = train_rounds(corpus, args.cores, args.repeats, workdir)
            print(corpus, json.dumps(summary_line(report["train"][corpus])), flush=True)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    name = "tokenizer_train" if args.train_only else "tokenizer"
    if not args.train_only:
        bench_all_encoders(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(report, args))
    print(markdown(report, args))


def train_rounds(corpus: str, cores: int, repeats: int, workdir: str) -> dict:
    """``repeats`` rounds of HF then ours (ours first in every other round), each in a fresh process."""
    runs: dict[str, list[dict]] = {"hf": [], "scratchlm": []}
    for r in range(repeats):
        for trainer in ["hf", "scratchlm"] if r % 2 == 0 else ["scratchlm", "hf"]:
            runs[trainer].append(run_child(trainer, corpus, cores, workdir))
    row: dict = {"bytes": runs["hf"][0]["bytes"], "runs": runs}
    for trainer, rs in runs.items():
        row[trainer] = {
            "command_s": statistics.median(x["command_s"] for x in rs),
            "command_s_range": [min(x["command_s"] for x in rs), max(x["command_s"] for x in rs)],
            "cpu_s": statistics.median(x["cpu_s"] for x in rs),
            "tree_rss_mb": max(x["tree_rss_mb"] for x in rs),
            "tree_pss_mb": max(x["tree_pss_mb"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
        }
    speedups = [h["command_s"] / s["command_s"] for h, s in zip(runs["hf"], runs["scratchlm"])]
    row["speedup"] = statistics.median(speedups)
    row["speedup_range"] = [min(speedups), max(speedups)]
    row["memory_ratio_rss"] = row["scratchlm"]["tree_rss_mb"] / row["hf"]["tree_rss_mb"]
    row["memory_ratio_pss"] = row["scratchlm"]["tree_pss_mb"] / row["hf"]["tree_pss_mb"]
    return row


def summary_line(row: dict) -> dict:
    return {
        "speedup": round(row["speedup"], 2),
        "hf_s": round(row["hf"]["command_s"], 2),
        "ours_s": round(row["scratchlm"]["command_s"], 2),
        "hf_mb": round(row["hf"]["tree_rss_mb"]),
        "ours_mb": round(row["scratchlm"]["tree_rss_mb"]),
    }


def bench_all_encoders(report: dict) -> None:
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


def markdown(r: dict, args: argparse.Namespace | None = None) -> str:
    m = r["machine"]
    command = "python benchmarks/tokenizer.py"
    if args is not None and args.train_only:
        command += f" --train-only --sizes {args.sizes} --repeats {args.repeats}"
    lines = [
        "# Tokenizer benchmark" if r["encode"] else "# BPE training: scratchlm vs HF tokenizers",
        "",
        f"Command: `{command}` | {m['cpu']}, {m['cores']} cores, {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, tokenizers {m['tokenizers']}, tiktoken {m['tiktoken']}, "
        f"load average (1 min) {m['loadavg_at_start'][0]:.1f} at start, "
        f"{m.get('loadavg_at_end', [float('nan')])[0]:.1f} at end",
        "",
        f"## BPE training (vocab {r['vocab_size']}, {r['cores']} cores, {r['repeats']} alternating rounds)",
        "",
        "Wall time of the whole command (median and range over rounds); speed-up = HF's time / ours in the "
        "same round (median, range); peak memory = the largest sampled sum of RSS over the process tree "
        "(PSS, which counts pages shared by forked workers once, in brackets; the trainer process alone "
        "after the slash).",
        "",
        "| corpus | MB | HF BpeTrainer s | scratchlm s | speed-up | HF CPU s | scratchlm CPU s "
        "| HF peak MB | scratchlm peak MB | memory ours/HF |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for corpus, row in r["train"].items():
        hf, us = row["hf"], row["scratchlm"]
        lines.append(
            f"| {corpus} | {row['bytes'] / 1e6:.1f} | {_s(hf)} | {_s(us)} | {row['speedup']:.2f}x "
            f"({row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}) | {hf['cpu_s']:.1f} | "
            f"{us['cpu_s']:.1f} | {hf['tree_rss_mb']:.0f} ({hf['tree_pss_mb']:.0f}) | "
            f"{us['tree_rss_mb']:.0f} ({us['tree_pss_mb']:.0f}) / {us['peak_rss_mb']:.0f} | "
            f"{row['memory_ratio_rss']:.2f} ({row['memory_ratio_pss']:.2f}) |"
        )
    mixed = {c: row for c, row in r["train"].items() if c.startswith("mixed_")}
    if len(mixed) > 1:
        lines += [
            "",
            "Growth with corpus size (mixed corpora; seconds per MB of input, median rounds):",
            "",
            "| corpus | HF s/MB | scratchlm s/MB |",
            "|---|---|---|",
        ]
        for corpus, row in mixed.items():
            mb = row["bytes"] / 1e6
            lines.append(
                f"| {corpus} | {row['hf']['command_s'] / mb:.3f} | {row['scratchlm']['command_s'] / mb:.3f} |"
            )
    if not r["encode"]:
        return "\n".join(lines) + "\n"
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


def _s(side: dict) -> str:
    lo, hi = side["command_s_range"]
    return f"{side['command_s']:.2f} ({lo:.2f}-{hi:.2f})"


if __name__ == "__main__":
    main()
