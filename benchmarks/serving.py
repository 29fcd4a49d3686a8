"""Serving throughput: 16 concurrent OpenAI clients vs the same 16 requests sent one after another.

    .venv/bin/python benchmarks/serving.py            # writes benchmarks/results/serving.{json,md,png}
    .venv/bin/python benchmarks/serving.py --quick    # 16 new tokens per request (smoke run)

Model: the ``cpu-small`` preset (4 layers, 192 wide, Llama style, context 128) with random weights and a
BPE vocabulary of 4096 trained on Tiny Shakespeare (the first 300 kB; the built-in corpus when absent).
The server (``scratchlm.inference.server.GenerationServer``, continuous batching) runs in this process on
127.0.0.1 with a free port; the clients are the ``openai`` package's ``OpenAI`` clients, one per thread.

Each of the 16 requests is ``/v1/completions`` with a different prompt, ``max_tokens`` new tokens
(``ignore_eos``: no early stop), temperature 0. Sequential: one after another from one client. Concurrent:
16 threads released together by a barrier. Aggregate tokens/s = all completion tokens / wall time; latency =
each request's time from send to full answer (p50, p95). The concurrent texts are checked equal to the
sequential ones before anything is written. Goal (issue 16): concurrent >= 4x sequential on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from scratchlm.api import LoadedModel
from scratchlm.config import load_config
from scratchlm.inference.server import GenerationServer
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
CLIENTS = 16


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
    )


def corpus() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    from scratchlm.corpus import builtin_corpus

    return "\n".join(d for _, d in zip(range(100), builtin_corpus(0.1).train.documents()))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens per request")
    args = ap.parse_args()
    import openai

    torch.set_num_threads(args.threads)
    max_tokens = 16 if args.quick else args.max_tokens
    text = corpus()
    cfg = load_config(preset="cpu-small")
    tok = train_bpe_from_iterator([text], vocab_size=cfg.tokenizer.vocab_size, progress=False)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    lm = LoadedModel(model, tok, cfg, Path("cpu-small/random"), Path("cpu-small"))
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    prompts = [lines[i * 7] for i in range(CLIENTS)]

    srv = GenerationServer(lm, host="127.0.0.1", port=0, max_batch=CLIENTS)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    body = dict(model="cpu-small", max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})

    def one(client, prompt: str) -> tuple[str, int, float]:
        t0 = time.perf_counter()
        out = client.completions.create(prompt=prompt, **body)
        return out.choices[0].text, out.usage.completion_tokens, time.perf_counter() - t0

    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=300, max_retries=0)
        one(client, "warm up")
        t0 = time.perf_counter()
        sequential = [one(client, p) for p in prompts]
        seq_wall = time.perf_counter() - t0

        clients = [
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=300, max_retries=0) for _ in prompts
        ]
        results: dict[int, tuple[str, int, float]] = {}
        barrier = threading.Barrier(CLIENTS + 1, timeout=60)

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = one(clients[i], prompts[i])

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join(600)
        conc_wall = time.perf_counter() - t0
        concurrent = [results[i] for i in range(CLIENTS)]
        widest = srv.batcher.stats.max_rows_in_step
    finally:
        srv.shutdown()
        srv.server_close()
    if [r[0] for r in concurrent] != [r[0] for r in sequential]:
        raise SystemExit("concurrent answers differ from sequential ones: not writing results")

    def summary(rows, wall) -> dict:
        tokens = sum(r[1] for r in rows)
        lat = [r[2] for r in rows]
        return dict(
            tokens=tokens,
            wall_s=round(wall, 3),
            tokens_per_s=round(tokens / wall, 1),
            p50_latency_s=round(statistics.median(lat), 3),
            p95_latency_s=round(percentile(lat, 0.95), 3),
        )

    seq, conc = summary(sequential, seq_wall), summary(concurrent, conc_wall)
    speedup = conc["tokens_per_s"] / seq["tokens_per_s"]
    report = dict(
        machine=machine(),
        model="cpu-small preset, random weights, vocab 4096",
        requests=CLIENTS,
        max_tokens=max_tokens,
        sequential=seq,
        concurrent=conc,
        speedup=round(speedup, 2),
        widest_batch=widest,
        goal="concurrent >= 4x sequential aggregate tokens/s",
        met=speedup >= 4,
    )
    RESULTS.mkdir(exist_ok=True)
    stem = "serving" if not args.quick else "serving_quick"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    md = [
        f"# Serving: {CLIENTS} concurrent OpenAI clients vs the same requests one after another",
        "",
        f"`python benchmarks/serving.py{' --quick' if args.quick else ''}` on {m['cpu']} ({m['cores']} cores, "
        f"torch {m['torch']}, {m['threads']} thread(s)). Model: {report['model']}. Each request: "
        f"/v1/completions, {max_tokens} new tokens, temperature 0.",
        "",
        "| mode | completion tokens | wall (s) | aggregate tokens/s | p50 latency (s) | p95 latency (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("sequential", seq), (f"{CLIENTS} concurrent", conc)):
        md.append(
            f"| {name} | {r['tokens']} | {r['wall_s']} | {r['tokens_per_s']} | {r['p50_latency_s']} | "
            f"{r['p95_latency_s']} |"
        )
    md += [
        "",
        f"Speedup of aggregate tokens/s: **{speedup:.2f}x** (goal >= 4x: {'met' if speedup >= 4 else 'not met'}); "
        f"widest decoder step: {widest} rows. Concurrent answers equal the sequential ones.",
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    _plot(seq, conc, speedup, max_tokens, RESULTS / f"{stem}.png")


def _plot(seq: dict, conc: dict, speedup: float, max_tokens: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = ["sequential", f"{CLIENTS} concurrent"]
    a.bar(names, [seq["tokens_per_s"], conc["tokens_per_s"]], color=["tab:gray", "tab:blue"])
    a.set_ylabel("aggregate tokens/s")
    a.set_title(f"throughput ({speedup:.1f}x)")
    x = range(2)
    b.bar([i - 0.2 for i in x], [seq["p50_latency_s"], conc["p50_latency_s"]], 0.4, label="p50")
    b.bar([i + 0.2 for i in x], [seq["p95_latency_s"], conc["p95_latency_s"]], 0.4, label="p95")
    b.set_xticks(list(x), names)
    b.set_ylabel("request latency (s)")
    b.set_title("latency per request")
    b.legend()
    fig.suptitle(f"scratchlm serve, cpu-small, {CLIENTS} requests x {max_tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
