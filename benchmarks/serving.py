"""Serving throughput: 16 concurrent OpenAI clients vs the same 16 requests sent one after another.

    .venv/bin/python benchmarks/serving.py            # writes benchmarks/results/serving.{json,md,png}
    .venv/bin/python benchmarks/serving.py --quick    # 16 new tokens per request (smoke run)

Model: the ``cpu-small`` preset (4 layers, 192 wide, Llama style, context 128) with random weights and a
BPE vocabulary of 4096 trained on Tiny Shakespeare (the first 300 kB; the built-in corpus when absent).
The model is saved as a run directory and served by ``scratchlm serve RUN --port 0 --max-batch 16`` in its
own process (``--threads`` torch threads), on 127.0.0.1; the clients are the ``openai`` package's ``OpenAI``
clients, one per thread, in this process.

Each of the 16 requests is ``/v1/completions`` with a different prompt, ``max_tokens`` new tokens
(``ignore_eos``: no early stop), temperature 0. Sequential: one after another from one client. Concurrent:
16 threads released together by a barrier. Aggregate tokens/s = all completion tokens / wall time; latency =
each request's time from send to full answer (p50, p95 over every request of every round). ``--rounds``
rounds alternate sequential and concurrent, and the speedup is the median of the per-round ratios, so both
sides see the same load. The concurrent texts are checked equal to the sequential ones before anything is
written; the kernel's ListenOverflows counter is read around the concurrent rounds, and the server process's
CPU seconds (psutil) around each mode: a load-independent measure of the same work.
Goal (issue 16): concurrent >= 4x sequential on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from scratchlm.config import load_config, save_config
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
CLIENTS = 16


def machine(threads: int) -> dict:
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
        server_threads=threads,
        python=platform.python_version(),
    )


def corpus() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    from scratchlm.corpus import builtin_corpus

    return "\n".join(d for _, d in zip(range(100), builtin_corpus(0.1).train.documents()))


def start_server(run: Path, device: str, threads: int) -> tuple[subprocess.Popen, str]:
    """``scratchlm serve RUN`` in its own process (as a user runs it), on a free port: (process, URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "scratchlm", "serve", str(run), "--port", "0", "--which", "latest"]
    cmd += ["--device", device, "--max-batch", str(CLIENTS)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r" on (http://127\.0\.0\.1:\d+) ", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise SystemExit("scratchlm serve did not start")


def listen_overflows() -> int | None:
    """The kernel's TcpExt ListenOverflows counter (connections dropped by a full listen backlog), or None."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table["ListenOverflows"]) if "ListenOverflows" in table else None
    return None


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens per request")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternated sequential/concurrent rounds (default 3)"
    )
    args = ap.parse_args()
    import openai
    import psutil

    max_tokens = 16 if args.quick else args.max_tokens
    text = corpus()
    cfg = load_config(
        preset="cpu-small", overrides=["model.d_model=192"]
    )  # the size the results were measured at
    tok = train_bpe_from_iterator([text], vocab_size=cfg.tokenizer.vocab_size, progress=False)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    prompts = [lines[i * 7] for i in range(CLIENTS)]

    tmp = tempfile.TemporaryDirectory()
    run = Path(tmp.name) / "cpu-small"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, 1, model, {}, {"step": 1}, keep_last=1)
    server, url = start_server(run, args.device, args.threads)
    body = dict(model="cpu-small", max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})

    def one(client, prompt: str) -> tuple[str, int, float]:
        t0 = time.perf_counter()
        out = client.completions.create(prompt=prompt, **body)
        return out.choices[0].text, out.usage.completion_tokens, time.perf_counter() - t0

    def sequential_round(client) -> tuple[list, float]:
        t0 = time.perf_counter()
        rows = [one(client, p) for p in prompts]
        return rows, time.perf_counter() - t0

    def concurrent_round() -> tuple[list, float, int | None]:
        clients = [
            openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=300, max_retries=0) for _ in prompts
        ]
        results: dict[int, tuple[str, int, float]] = {}
        barrier = threading.Barrier(CLIENTS + 1, timeout=60)

        def worker(i: int) -> None:
            barrier.wait()
            results[i] = one(clients[i], prompts[i])

        workers = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
        for w in workers:
            w.start()
        before = listen_overflows()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join(600)
        wall = time.perf_counter() - t0
        after = listen_overflows()
        return [results[i] for i in range(CLIENTS)], wall, None if before is None else after - before

    rounds = []  # (sequential rows, wall, concurrent rows, wall, overflows): alternated, same load drift
    cpu_s: list[tuple[float, float]] = []  # server CPU seconds per round: (sequential, concurrent)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=300, max_retries=0)
        one(client, "warm up")
        proc = psutil.Process(server.pid)

        def cpu() -> float:  # the server process's CPU seconds (all threads): what it cost, whatever the load
            t = proc.cpu_times()
            return t.user + t.system

        for _ in range(args.rounds):
            c0 = cpu()
            seq_round = sequential_round(client)
            c1 = cpu()
            conc_round = concurrent_round()
            cpu_s.append((c1 - c0, cpu() - c1))
            rounds.append((*seq_round, *conc_round))
        with urllib.request.urlopen(url + "/info", timeout=60) as r:
            widest = json.load(r)["batching"]["max_rows_in_step"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        tmp.cleanup()
    for seq_rows, _, conc_rows, _, _ in rounds:
        if [r[0] for r in conc_rows] != [r[0] for r in seq_rows]:
            raise SystemExit("concurrent answers differ from sequential ones: not writing results")
    overflow_counts = [r[4] for r in rounds]
    overflows = None if None in overflow_counts else sum(overflow_counts)

    def summary(rows_and_walls) -> dict:
        """Median over rounds of aggregate tokens/s; latency percentiles over every request of every round."""
        rates = [sum(r[1] for r in rows) / wall for rows, wall in rows_and_walls]
        lat = [r[2] for rows, _ in rows_and_walls for r in rows]
        return dict(
            tokens=sum(r[1] for r in rows_and_walls[0][0]),
            wall_s=round(statistics.median(w for _, w in rows_and_walls), 3),
            tokens_per_s=round(statistics.median(rates), 1),
            p50_latency_s=round(statistics.median(lat), 3),
            p95_latency_s=round(percentile(lat, 0.95), 3),
        )

    seq = summary([(r[0], r[1]) for r in rounds])
    conc = summary([(r[2], r[3]) for r in rounds])
    ratios = [r[1] / r[3] for r in rounds]  # same tokens: tokens/s ratio = wall-time ratio
    speedup = statistics.median(ratios)
    seq["server_cpu_s"] = round(statistics.median(c[0] for c in cpu_s), 3)
    conc["server_cpu_s"] = round(statistics.median(c[1] for c in cpu_s), 3)
    cpu_ratio = statistics.median(c[0] / c[1] for c in cpu_s)
    report = dict(
        machine=machine(args.threads),
        model="cpu-small preset, random weights, vocab 4096",
        requests=CLIENTS,
        max_tokens=max_tokens,
        sequential=seq,
        concurrent=conc,
        rounds=args.rounds,
        speedup=round(speedup, 2),
        speedup_per_round=[round(x, 2) for x in ratios],
        server_cpu_ratio=round(
            cpu_ratio, 2
        ),  # sequential / concurrent server CPU seconds for the same tokens
        widest_batch=widest,
        listen_overflows_during_concurrent=overflows,  # machine-wide counter: 0 = no connection was dropped
        device=args.device,
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
        f"torch {m['torch']}, {m['server_threads']} server thread(s), device {args.device}). Model: {report['model']}. Each request: "
        f"/v1/completions, {max_tokens} new tokens, temperature 0.",
        "",
        f"Median of {args.rounds} rounds, sequential and concurrent alternated (the machine's speed drifts).",
        "",
        "| mode | completion tokens | wall (s) | aggregate tokens/s | p50 latency (s) | p95 latency (s) | server CPU (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("sequential", seq), (f"{CLIENTS} concurrent", conc)):
        md.append(
            f"| {name} | {r['tokens']} | {r['wall_s']} | {r['tokens_per_s']} | {r['p50_latency_s']} | "
            f"{r['p95_latency_s']} | {r['server_cpu_s']} |"
        )
    md += [
        "",
        f"Speedup of aggregate tokens/s: **{speedup:.2f}x** (median of the per-round ratios "
        f"{', '.join(f'{x:.2f}' for x in ratios)}; goal >= 4x: {'met' if speedup >= 4 else 'not met'}); "
        f"widest decoder step: {widest} rows. Concurrent answers equal the sequential ones. "
        f"Kernel ListenOverflows during the concurrent rounds (machine-wide): {overflows}.",
        "",
        f"Server CPU seconds for the same tokens, sequential / concurrent (median over rounds): "
        f"**{cpu_ratio:.2f}x**. On a shared machine the wall-clock ratio swings with other processes' load; "
        "the CPU time the server process spent does not, and on an otherwise idle machine the single-threaded "
        "server's wall time follows it.",
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
