"""Generation speed: ScratchLM's Engine vs HF transformers ``generate`` on the same weights, and KV cache vs
full recomputation.

    .venv/bin/python benchmarks/generation.py            # writes benchmarks/results/generation.{json,md}
    .venv/bin/python benchmarks/generation.py --quick    # fewer tokens, one repeat (smoke run)

Model: a 4-layer, 128-wide Llama (RMSNorm, RoPE, SwiGLU, 4 heads, untied head) with random weights and a
4096-token BPE vocabulary trained on Tiny Shakespeare (the built-in corpus when absent). It is exported with
``scratchlm.model.hf.export_hf`` and loaded with ``LlamaForCausalLM.from_pretrained``, so both sides run the
same weights; greedy outputs are checked to agree token for token before timing.

Measured on the CPU: greedy decoding of 256 new tokens (no early stop: HF ``min_new_tokens``, ours
``stop_token_ids=[]``) at batch 1 and batch 8 (left-padded prompts of different lengths), best of
``--repeats`` runs, tokens/s = batch * new tokens / wall time (prefill included). Then our engine with the
KV cache vs greedy decoding by full recomputation (one forward over the whole sequence per token) for 512
new tokens at batch 1. Both sides run with the same number of torch threads (``--threads``, default 1).

At batch 1 a third column: llama.cpp (llama-cpp-python, as the slow GGUF test uses) on the same weights,
exported by ``scratchlm export``'s GGUF writer in float32, greedy (an argmax of its logits per token), timed
the same way with the same thread count; skipped, with the reason in the report, where it is not installed
(``pip install llama-cpp-python gguf``). benchmarks/decode_cpu.py measures decoding alone against llama.cpp
on a larger model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.inference.engine import Engine
from scratchlm.model import build_model

RESULTS = Path(__file__).resolve().parent / "results"
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return dict(
        platform=platform.platform(),
        cpu=cpu,
        cores=os.cpu_count(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
    )


def corpus_lines() -> list[str]:
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")
    else:
        from scratchlm.corpus import builtin_corpus

        text = "\n".join(d for _, d in zip(range(200), builtin_corpus(0.1).train.documents()))
    return [line for line in text.splitlines() if len(line) > 20]


def best_times(fns: list, repeats: int) -> list[float]:
    """Best-of-``repeats`` wall time of each function, the functions interleaved in every round so that a
    load spike on a shared machine hits both sides alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [min(t) for t in times]


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in batch)
    ids = torch.tensor([[pad] * (L - len(s)) + s for s in batch])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in batch])
    return ids, mask


@torch.inference_mode()
def recompute_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding without a cache: a full forward over the whole sequence for every new token."""
    seq = torch.tensor([ids])
    for _ in range(n):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(ids) :].tolist()


def llama_cpp_greedy(model, tok, threads: int, workdir: str):
    """(generate(prompt ids, n) -> n greedy token ids through llama.cpp on ``model``'s weights as GGUF f32,
    None) or (None, the reason llama.cpp is skipped)."""
    try:
        import llama_cpp
        import numpy as np

        from scratchlm.model.gguf import export_gguf
    except ImportError as e:
        return None, f"llama.cpp not measured: {e} (pip install llama-cpp-python gguf)"
    path = export_gguf(model, tok, Path(workdir) / "model-f32.gguf", dtype="f32")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=model.config.context_length,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )

    def generate(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        while True:
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) == n:
                return out
            llm.eval([out[-1]])

    return generate, None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--recompute-tokens", type=int, default=512)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (default 1: a tiny model at batch 1 is overhead-bound, and "
        "on a shared 2-core machine more threads oversubscribe; 0 = torch's default)",
    )
    ap.add_argument(
        "--compile", action="store_true", help="also time the engine with a torch.compile'd decode step"
    )
    ap.add_argument("--quick", action="store_true", help="64 new tokens, 128 for recompute, one repeat")
    ap.add_argument("--out", default=str(RESULTS / "generation"), help="output path without extension")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.recompute_tokens, args.repeats = 64, 128, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from transformers import LlamaForCausalLM

    from scratchlm.model.hf import export_hf
    from scratchlm.tokenizer import train_bpe_from_iterator

    lines = corpus_lines()
    tok = train_bpe_from_iterator(lines[:20000], vocab_size=4096, progress=False)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        n_layer=4,
        d_model=128,
        n_head=4,
        context_length=1024,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        multiple_of=32,
        bias=False,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    engine = Engine(model, tok)
    with tempfile.TemporaryDirectory() as d:
        export_hf(model, d)
        hf = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    pad = tok.eot_id

    def hf_generate(batch: list[list[int]], n: int) -> list[list[int]]:
        ids, mask = left_pad(batch, pad)
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=None,
            )
        return out[:, ids.shape[1] :].tolist()

    def ours(batch: list[list[int]], n: int, eng: Engine = engine) -> list[list[int]]:
        results = eng.generate_ids(batch, max_new_tokens=n, temperature=0, stop_token_ids=[])
        return [r.token_ids for r in results]

    compiled = Engine(model, tok, compile=True) if args.compile else None
    gguf_dir = tempfile.TemporaryDirectory()
    llama_cpp, skipped = llama_cpp_greedy(model, tok, torch.get_num_threads(), gguf_dir.name)

    report: dict = dict(
        machine=machine(),
        model=dict(
            n_layer=4,
            d_model=128,
            n_head=4,
            vocab_size=tok.vocab_size,
            params=sum(p.numel() for p in model.parameters()),
        ),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        llama_cpp_skipped=skipped,
        rows=[],
    )
    prompts = [tok.encode(line)[:24] for line in lines[100:108]]
    for B in args.batch_sizes:
        batch = [prompts[i % len(prompts)][: 8 + 2 * i] for i in range(B)]  # different lengths: left padding
        agree = ours(batch, 32) == hf_generate(batch, 32)
        hf_generate(batch, 8), ours(batch, 8)  # warm-up
        t_hf, t_ours = best_times(
            [lambda b=batch: hf_generate(b, args.new_tokens), lambda b=batch: ours(b, args.new_tokens)],
            args.repeats,
        )
        row = dict(
            batch=B,
            greedy_tokens_agree=agree,
            hf_tok_s=round(B * args.new_tokens / t_hf, 1),
            ours_tok_s=round(B * args.new_tokens / t_ours, 1),
            speedup=round(t_hf / t_ours, 2),
        )
        if compiled is not None:  # torch.compile'd decode step: warm up (compile) first, then time
            start = time.perf_counter()
            row["compiled_tokens_agree"] = ours(batch, 32, compiled) == ours(batch, 32)
            row["compile_warmup_s"] = round(time.perf_counter() - start, 1)
            t_hf, t_comp = best_times(
                [
                    lambda b=batch: hf_generate(b, args.new_tokens),
                    lambda b=batch: ours(b, args.new_tokens, compiled),
                ],
                args.repeats,
            )
            row["hf_tok_s_2"] = round(B * args.new_tokens / t_hf, 1)
            row["compiled_tok_s"] = round(B * args.new_tokens / t_comp, 1)
            row["compiled_speedup"] = round(t_hf / t_comp, 2)
        if B == 1 and llama_cpp is not None:  # llama.cpp at batch 1, against ours in the same rounds
            row["llama_cpp_tokens_agree"] = llama_cpp(batch[0], 32) == ours(batch, 32)[0]
            fns = [lambda b=batch: llama_cpp(b[0], args.new_tokens), lambda b=batch: ours(b, args.new_tokens)]
            if compiled is not None:
                fns.append(lambda b=batch: ours(b, args.new_tokens, compiled))
            times = best_times(fns, args.repeats)
            row["llama_cpp_tok_s"] = round(args.new_tokens / times[0], 1)
            row["vs_llama_cpp"] = round(times[0] / times[1], 2)
            if compiled is not None:
                row["compiled_vs_llama_cpp"] = round(times[0] / times[2], 2)
        report["rows"].append(row)
        print(row, flush=True)

    n = args.recompute_tokens
    prompt = prompts[0][:8]
    same = ours([prompt], 64)[0] == recompute_greedy(model, prompt, 64)
    t_cache, t_full = best_times([lambda: ours([prompt], n), lambda: recompute_greedy(model, prompt, n)], 1)
    report["cache_vs_recompute"] = dict(
        new_tokens=n,
        greedy_tokens_agree=same,
        cache_tok_s=round(n / t_cache, 1),
        recompute_tok_s=round(n / t_full, 1),
        speedup=round(t_full / t_cache, 2),
    )
    print(report["cache_vs_recompute"], flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m, c = report["machine"], report["cache_vs_recompute"]
    md = [
        "# Generation speed: ScratchLM Engine vs HF transformers `generate`",
        "",
        f"Command: `.venv/bin/python benchmarks/generation.py{' --compile' if args.compile else ''}"
        f"{' --quick' if args.quick else ''}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['platform']}, "
        f"torch {m['torch']}, transformers {m['transformers']}  ",
        f"Model: Llama, 4 layers, d_model 128, 4 heads, vocab {tok.vocab_size}, {report['model']['params']:,} params, "
        f"fp32, random weights (same weights on both sides via export_hf)",
        "",
        f"Greedy, {args.new_tokens} new tokens per row, best of {args.repeats}:",
        "",
        "| batch | HF generate (tok/s) | ScratchLM (tok/s) | speedup | same tokens |",
        "|---:|---:|---:|---:|:---:|",
    ]
    md += [
        f"| {r['batch']} | {r['hf_tok_s']} | {r['ours_tok_s']} | {r['speedup']}x | {r['greedy_tokens_agree']} |"
        for r in report["rows"]
    ]
    if args.compile:
        md += [
            "",
            "With `Engine(..., compile=True)` (torch.compile of the decode step, timed after its warm-up; HF "
            "re-timed in the same rounds):",
            "",
            "| batch | HF generate (tok/s) | ScratchLM compiled (tok/s) | speedup | same tokens | compile warm-up |",
            "|---:|---:|---:|---:|:---:|---:|",
        ]
        md += [
            f"| {r['batch']} | {r['hf_tok_s_2']} | {r['compiled_tok_s']} | {r['compiled_speedup']}x | "
            f"{r['compiled_tokens_agree']} | {r['compile_warmup_s']} s |"
            for r in report["rows"]
        ]
    md += [""]
    llama_rows = [r for r in report["rows"] if "llama_cpp_tok_s" in r]
    if llama_rows:
        r = llama_rows[0]
        md += [
            "Against llama.cpp on the same weights (GGUF f32 from `scratchlm export`, greedy, batch 1, the same "
            f"thread count, ScratchLM re-timed in the same rounds): llama.cpp {r['llama_cpp_tok_s']} tok/s; "
            f"ScratchLM eager {r['vs_llama_cpp']}x of it"
            + (f", compiled {r['compiled_vs_llama_cpp']}x" if "compiled_vs_llama_cpp" in r else "")
            + f" (same first 32 tokens: {r['llama_cpp_tokens_agree']}). "
            "Decoding alone on a larger model: benchmarks/results/decode_cpu.md.",
            "",
        ]
    else:
        md += [f"llama.cpp: {skipped or 'not measured (no batch-1 row)'}", ""]
    md += [
        f"KV cache vs full recomputation, batch 1, {n} new tokens: {c['cache_tok_s']} vs "
        f"{c['recompute_tok_s']} tok/s = **{c['speedup']}x** (same tokens: {c['greedy_tokens_agree']})",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    gguf_dir.cleanup()
    return report


if __name__ == "__main__":
    main()
