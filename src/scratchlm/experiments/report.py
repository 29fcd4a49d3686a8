"""``scratchlm report RUN_DIR``: one markdown page a person can read about a run, with its figures.

Writes ``RUN_DIR/report/report.md`` and PNGs beside it. Sections, in order:

1. Why the run stopped (the last ``stop`` record of metrics.jsonl; none: still running or killed).
2. Config: what differs from the preset the run started from (or from the defaults).
3. Model: parameters, non-embedding parameters, FLOPs per token and for the whole run (``6N + attention``
   per token, times the tokens seen).
4. Data: source, tokens and documents per split (the shards' meta.json), tokenizer.
5. Curves: loss, perplexity, learning rate and throughput against steps (``scratchlm plot``'s PNGs).
6. Evaluation: every validation record (loss, perplexity, bits per byte, top-1/top-5 accuracy, BLEU/chrF).
7. Speed (decoder models) on the machine that writes the report: prefill and decode tokens/s, time to
   first token (the prefill of a ``prompt_tokens`` prompt), the median of 3 timed runs after a warm-up, and
   peak memory (CUDA: the allocator's peak; CPU: the peak resident size of this process, all included).
8. Samples at fixed seeds (0, 1, 2) from ``eval.sample_prompt``; seq2seq: the last samples.txt block.
9. Environment: library versions saved with the checkpoint, and this machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import load_config, load_run_config, to_dict
from scratchlm.experiments.runs import EVAL_COLUMNS, format_value, markdown_table, summarize_run
from scratchlm.train.metrics import read_metrics

SAMPLE_SEEDS = (0, 1, 2)


def config_diff(cfg) -> list[tuple[str, Any, Any]]:
    """(key, value, preset-or-default value) for every field that differs from the run's preset."""
    base = to_dict(load_config(preset=cfg.preset) if cfg.preset else load_config())
    now = to_dict(cfg)
    rows = []
    for sec, values in now.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if base[sec].get(key) != value:
                rows.append((f"{sec}.{key}", value, base[sec].get(key)))
    return rows


def measure_speed(
    run_dir: Path, device: str | None = None, prompt_tokens: int = 64, new_tokens: int = 64
) -> dict[str, Any]:
    """Prefill/decode throughput, time to first token and peak memory of the run's best checkpoint.

    Greedy decoding of a seeded random prompt, no stop token (every run generates ``new_tokens``). Returns
    ``{"device", "prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
    "ttft_ms", "peak_memory_mb", "memory_kind"}``.
    """
    from scratchlm.api import load

    lm = load(run_dir, device=device)
    ctx = lm.config.model.context_length
    P = max(1, min(prompt_tokens, ctx // 2))
    N = max(2, min(new_tokens, ctx - P))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, lm.tokenizer.vocab_size, (P,), generator=gen).tolist()
    dev = lm.device
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def once():
        lm.engine.generate_ids([prompt], max_new_tokens=N, temperature=0.0, stop_token_ids=[])
        return lm.engine.last_stats

    once()  # warm-up (allocations, kernel selection)
    runs = [once() for _ in range(3)]
    prefill = statistics.median(s.prefill_seconds for s in runs)
    decode = statistics.median(s.decode_seconds / max(s.new_tokens - 1, 1) for s in runs)
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev) / 2**20, "CUDA allocator peak"
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        kind = "peak resident memory of the report process"
    return {
        "device": str(dev),
        "prompt_tokens": P,
        "new_tokens": N,
        "prefill_tokens_per_s": P / prefill,
        "decode_tokens_per_s": 1.0 / decode,
        "ttft_ms": 1000 * prefill,
        "peak_memory_mb": peak,
        "memory_kind": kind,
    }


def samples(run_dir: Path, cfg, device: str | None = None, tokens: int = 100) -> list[tuple[int, str]]:
    """(seed, text) at each of :data:`SAMPLE_SEEDS`: prompt + completion at the run's sampling settings."""
    from scratchlm.api import load

    lm = load(run_dir, device=device)
    prompt = cfg.eval.sample_prompt
    out = []
    for seed in SAMPLE_SEEDS:
        text = lm.generate(
            prompt or "\n",
            max_new_tokens=min(tokens, cfg.model.context_length - 1),
            temperature=cfg.eval.temperature,
            top_k=cfg.eval.top_k,
            seed=seed,
            context="slide",
        )
        out.append((seed, (prompt or "\n") + text))
    return out


def _last_samples_block(run_dir: Path) -> str:
    path = run_dir / "samples.txt"
    if not path.is_file():
        return "(no samples.txt)"
    blocks = path.read_text(encoding="utf-8").split("=== step ")
    return "=== step " + blocks[-1].strip() if len(blocks) > 1 else "(empty samples.txt)"


def _data_rows(cfg) -> list[str]:
    from scratchlm.data.shards import read_meta

    lines = [f"- source: {', '.join(cfg.data.source) or 'the built-in corpus (Python standard library)'}"]
    if cfg.data.val_source:
        lines.append(f"- validation source: {', '.join(cfg.data.val_source)}")
    lines.append(f"- tokenizer: {cfg.tokenizer.kind}, {cfg.model.vocab_size:,} tokens")
    if cfg.data.data_dir and Path(cfg.data.data_dir, "meta.json").is_file():
        meta = read_meta(cfg.data.data_dir)
        lines.append(f"- shards: `{cfg.data.data_dir}` ({meta.get('text_bytes', 0):,} bytes of text)")
        for split, info in meta["splits"].items():
            lines.append(f"- {split}: {info['tokens']:,} tokens in {info['documents']:,} documents")
    return lines


def write_report(
    run_dir: str | Path, out: str | Path | None = None, device: str | None = None, speed: bool = True
) -> Path:
    """Write report.md and its PNGs (``out`` defaults to RUN_DIR/report); returns the report's path."""
    from scratchlm.train.checkpoint import find_checkpoint, read_state
    from scratchlm.train.metrics import plot_run

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    summary = summarize_run(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for path in plot_run(run_dir):
        shutil.copyfile(path, out / path.name)
        figures.append(path.name)

    L = [
        f"# Run report: {run_dir.name}",
        "",
        f"Run directory `{run_dir}`; config preset: {cfg.preset or 'none'}.",
        "",
    ]
    L += ["## Why the run stopped", ""]
    L.append(
        summary["stop_detail"]
        or f"It did not finish: no stop record (still running, or killed after step {summary['steps']})."
    )
    L += ["", "## Config (what differs from the preset)", ""]
    diff = config_diff(cfg)
    L.append(
        markdown_table(
            ["key", "value", f"{cfg.preset or 'default'}"],
            [[f"`{k}`", f"`{v}`", f"`{b}`"] for k, v, b in diff],
        )
        if diff
        else "Nothing: the run is the preset as is."
    )
    m = cfg.model
    total_flops = summary["flops_per_token"] * (summary["tokens"] or 0)
    L += ["## Model", ""]
    L.append(
        markdown_table(
            [
                "architecture",
                "layers",
                "heads",
                "d_model",
                "context",
                "parameters",
                "non-embedding",
                "FLOPs/token",
                "training FLOPs",
            ],
            [
                [
                    f"{m.arch} ({m.pos} positions, {m.norm}, {m.mlp})",
                    str(m.n_layer),
                    f"{m.n_head}" + (f" (kv {m.n_kv_head})" if m.n_kv_head else ""),
                    str(m.d_model),
                    str(m.context_length),
                    f"{summary['params']:,}",
                    f"{summary['non_embedding_params']:,}",
                    f"{summary['flops_per_token']:.3g}",
                    f"{total_flops:.3g}",
                ]
            ],
        )
    )
    L += ["## Data", "", *_data_rows(cfg), ""]
    L += ["## Curves", ""]
    L += [f"![{name}]({name})" for name in figures] + [""]
    L += ["## Evaluation", ""]
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval" and r.get("val_loss") is not None]
    cols = [
        c for c in EVAL_COLUMNS if c[0] != "best_val_loss" and any(r.get(c[0]) is not None for r in evals)
    ]
    L.append(
        markdown_table(
            ["step", "tokens"] + [c[1].replace("final ", "") for c in cols],
            [
                [str(r["step"]), format_value(r.get("tokens"), "{:,}")]
                + [format_value(r.get(k), f) for k, _, f in cols]
                for r in evals
            ],
        )
        if evals
        else "No evaluation was logged."
    )
    L += ["## Speed (inference, this machine)", ""]
    if speed and m.arch == "gpt":
        s = measure_speed(run_dir, device)
        L.append(
            markdown_table(
                [
                    "device",
                    "prompt tokens",
                    "new tokens",
                    "prefill tokens/s",
                    "decode tokens/s",
                    "time to first token (ms)",
                    "peak memory (MB)",
                ],
                [
                    [
                        s["device"],
                        str(s["prompt_tokens"]),
                        str(s["new_tokens"]),
                        f"{s['prefill_tokens_per_s']:,.0f}",
                        f"{s['decode_tokens_per_s']:,.0f}",
                        f"{s['ttft_ms']:.1f}",
                        f"{s['peak_memory_mb']:,.0f}",
                    ]
                ],
            )
        )
        L.append(f"Batch 1, greedy, KV cache; median of 3 runs after a warm-up. Memory: {s['memory_kind']}.")
    else:
        L.append(
            "Not measured ("
            + ("--no-speed" if not speed else "encoder-decoder run: see `scratchlm translate`")
            + ")."
        )
    L += ["", "## Samples", ""]
    if m.arch == "gpt":
        for seed, text in samples(run_dir, cfg, device):
            L += [
                f"seed {seed} (temperature {cfg.eval.temperature}, top-k {cfg.eval.top_k}):",
                "",
                "```",
                text.rstrip(),
                "```",
                "",
            ]
    else:
        L += ["The last block of samples.txt:", "", "```", _last_samples_block(run_dir), "```", ""]
    L += ["## Environment", ""]
    try:
        versions = read_state(find_checkpoint(run_dir, "latest")).get("versions", {})
    except Exception:  # an unfinished run may have no checkpoint yet: the report still has the rest
        versions = {}
    L.append(
        "- trained with: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown (no checkpoint)")
    )
    L.append(f"- training device setting: `train.device={cfg.train.device}`, `train.dtype={cfg.train.dtype}`")
    L.append(
        f"- this report: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    L.append(
        f"- written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `scratchlm report {run_dir}`"
    )
    path = out / "report.md"
    from scratchlm import fileio

    fileio.write_text(path, "\n".join(L) + "\n")
    return path
