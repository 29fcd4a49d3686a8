"""Decoding on a CPU against llama.cpp on the same weights: batch-1 greedy tokens/s, alternating rounds.

    .venv/bin/python benchmarks/decode_cpu.py            # writes benchmarks/results/decode_cpu.{json,md}
    .venv/bin/python benchmarks/decode_cpu.py --quick    # a small model, few tokens (smoke run)

Model: a Llama-style decoder of 8 layers x 512 (8 heads, SwiGLU, RMSNorm, RoPE, untied head), vocabulary
4096 (a BPE trained on Tiny Shakespeare), context 512, random weights scaled so that greedy logits are well
separated. It is exported with ``scratchlm export``'s GGUF writer (f32 and q8_0) and loaded by llama.cpp
through llama-cpp-python (the ``gguf`` extra and ``pip install llama-cpp-python``; its column is skipped,
with the reason, where it is not installed).

Timed, each variant once per round, rounds alternating so that a load change hits every variant alike:
- ``scratchlm f32 eager``: ``Engine(model, tok)``, the default path;
- ``scratchlm f32 compiled``: ``Engine(model, tok, compile=True)`` (the decode step through torch.compile,
  with threaded multiply-and-sum products, inference/matvec.py; its compilation happens in a warm-up
  before the rounds and is reported apart);
- ``scratchlm int8 eager`` and ``int8 compiled``: the same after ``quantize_int8`` (inference/quantize.py:
  int8 weights, one scale per output row; ``--int8`` on the command line);
- ``llama.cpp f32`` and ``llama.cpp q8_0``: ``Llama.eval`` one token at a time and an argmax of its logits.
Decode tokens/s excludes the prompt's prefill on both sides (ScratchLM: ``GenerationStats.decode_seconds``,
which also excludes compilation; llama.cpp: the wall time of the one-token evals). Every side runs with
the same number of threads (``--threads``, default 2 = this machine's cores) and greedy tokens are compared
with ScratchLM's f32 eager tokens. The int8 path's logits are compared with float32's on 64 positions
(max |difference| relative to the logits' standard deviation).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.config import ModelConfig
from scratchlm.inference.engine import Engine
from scratchlm.inference.quantize import quantize_int8
from scratchlm.model import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported: its sibling
from generation import SHAKESPEARE  # noqa: E402
from generation import machine as generation_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine(threads: int) -> dict:
    """generation.py's machine description, with this run's thread count and the CPU's vector capability."""
    return dict(generation_machine(), threads=threads, capability=torch.backends.cpu.get_cpu_capability())


def corpus_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")
    from scratchlm.corpus import builtin_corpus

    return "\n".join(d for _, d in zip(range(200), builtin_corpus(0.1).train.documents()))


def make_model(vocab_size: int, n_layer: int, d_model: int, context: int) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=vocab_size,
        n_layer=n_layer,
        d_model=d_model,
        n_head=d_model // 64,
        context_length=context,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # larger than the init: well-separated logits, so float order cannot flip an argmax
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 2.0 / math.sqrt(p.shape[1]))
    return model


def scratchlm_decoder(engine: Engine, prompt: list[int], n: int):
    def run() -> tuple[list[int], float]:
        r = engine.generate_ids([prompt], max_new_tokens=n, temperature=0, stop_token_ids=[])[0]
        return r.token_ids, engine.last_stats.decode_tokens_per_second

    return run


def llama_cpp_decoder(llm, prompt: list[int], n: int):
    import numpy as np

    def run() -> tuple[list[int], float]:
        llm.reset()
        llm.eval(prompt)
        tokens = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return tokens, (n - 1) / (time.perf_counter() - start)

    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 layers x 128, 32 new tokens, 1 round")
    ap.add_argument("--out", default=str(RESULTS / "decode_cpu"), help="output path without extension")
    args = ap.parse_args(argv)
    n_layer, d_model = (2, 128) if args.quick else (8, 512)
    if args.quick:
        args.new_tokens, args.rounds = 32, 1
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from scratchlm.tokenizer import train_bpe_from_iterator

    text = corpus_text()
    tok = train_bpe_from_iterator([text[:400_000]], vocab_size=4096, progress=False)
    model = make_model(tok.vocab_size, n_layer, d_model, 512)
    prompt = tok.encode(text[:200])[:32]
    n = args.new_tokens
    report: dict = dict(
        command="python benchmarks/decode_cpu.py" + (" --quick" if args.quick else ""),
        machine=machine(args.threads),
        load_before=os.getloadavg()[0],
        model=dict(
            n_layer=n_layer,
            d_model=d_model,
            vocab_size=tok.vocab_size,
            context=512,
            params=sum(p.numel() for p in model.parameters()),
        ),
        new_tokens=n,
        prompt_tokens=len(prompt),
        rounds=args.rounds,
    )

    eager = Engine(model, tok)
    compiled = Engine(model, tok, compile=True)
    variants = {"scratchlm f32 eager": scratchlm_decoder(eager, prompt, n)}
    variants["scratchlm f32 compiled"] = scratchlm_decoder(compiled, prompt, n)
    int8_model = quantize_int8(make_model(tok.vocab_size, n_layer, d_model, 512))
    variants["scratchlm int8 eager"] = scratchlm_decoder(Engine(int8_model, tok), prompt, n)
    int8 = Engine(int8_model, tok, compile=True)
    variants["scratchlm int8 compiled"] = scratchlm_decoder(int8, prompt, n)

    warm = {}
    for name, engine in (("scratchlm f32 compiled", compiled), ("scratchlm int8 compiled", int8)):
        variants[name]()  # compiles
        warm[name] = round(engine.last_stats.compile_seconds, 1)
    report["compile_seconds"] = warm

    # the int8 path's logits against float32's, on the same 64 positions
    ids = torch.tensor([tok.encode(text[1000:3000])[:64]])
    ref, _ = model(ids)
    got, _ = int8_model(ids)
    report["int8_logits"] = dict(
        max_abs_diff_over_std=round(float((got - ref).abs().max() / ref.std()), 4),
        mean_abs_diff_over_std=round(float((got - ref).abs().mean() / ref.std()), 4),
        argmax_agree=round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
    )

    skipped = None
    try:
        import llama_cpp

        from scratchlm.model.gguf import export_gguf
    except ImportError as e:
        skipped = f"llama.cpp not measured: {e} (pip install llama-cpp-python gguf)"
    tmp = tempfile.TemporaryDirectory()
    if skipped is None:
        for dtype in ("f32", "q8_0"):
            path = export_gguf(model, tok, Path(tmp.name) / f"m-{dtype}.gguf", dtype=dtype)
            llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=512,
                n_batch=512,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                logits_all=True,
                verbose=False,
            )
            variants[f"llama.cpp {dtype}"] = llama_cpp_decoder(llm, prompt, n)
    report["llama_cpp_skipped"] = skipped

    reference = variants["scratchlm f32 eager"]()[0]
    samples: dict[str, list[float]] = {k: [] for k in variants}
    agree: dict[str, int] = {}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            tokens, tps = variants[name]()
            samples[name].append(tps)
            agree[name] = sum(a == b for a, b in zip(tokens, reference))
        print(f"round {r}: " + ", ".join(f"{k} {samples[k][-1]:.1f}" for k in variants), flush=True)
    report["load_after"] = os.getloadavg()[0]
    report["rows"] = [
        dict(
            variant=k,
            median_tok_s=round(statistics.median(v), 1),
            best_tok_s=round(max(v), 1),
            per_round=[round(x, 1) for x in v],
            greedy_agree=f"{agree[k]}/{n}",
        )
        for k, v in samples.items()
    ]
    med = {row["variant"]: row["median_tok_s"] for row in report["rows"]}
    ratios = {}
    if skipped is None:
        ratios = {
            "f32 eager / llama.cpp f32": med["scratchlm f32 eager"] / med["llama.cpp f32"],
            "f32 compiled / llama.cpp f32 (goal >= 0.9)": med["scratchlm f32 compiled"]
            / med["llama.cpp f32"],
            "int8 compiled / llama.cpp q8_0 (goal >= 0.8)": med["scratchlm int8 compiled"]
            / med["llama.cpp q8_0"],
        }
    ratios["f32 compiled / f32 eager"] = med["scratchlm f32 compiled"] / med["scratchlm f32 eager"]
    report["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    tmp.cleanup()
    write(report, Path(args.out))
    return report


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m, mo = report["machine"], report["model"]
    md = [
        "# Decoding on a CPU: ScratchLM vs llama.cpp on the same weights",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['capability']}), {m['threads']} threads on every side, "
        f"torch {m['torch']}, Python {m['python']}; load average (1 min) {report['load_before']:.2f} before, "
        f"{report['load_after']:.2f} after  ",
        f"Model: Llama-style, {mo['n_layer']} layers x {mo['d_model']}, vocab {mo['vocab_size']}, context "
        f"{mo['context']}, {mo['params']:,} parameters (f32: {mo['params'] * 4 / 1e6:.0f} MB read per token)  ",
        f"Greedy, batch 1, a {report['prompt_tokens']}-token prompt, {report['new_tokens']} new tokens; decode "
        f"tokens/s (prefill and compilation excluded), {report['rounds']} alternating rounds.",
        "",
        "| variant | median tok/s | best | per round | greedy tokens = ScratchLM f32 eager |",
        "|---|---:|---:|---|---:|",
    ]
    md += [
        f"| {r['variant']} | {r['median_tok_s']} | {r['best_tok_s']} | "
        f"{', '.join(str(x) for x in r['per_round'])} | {r['greedy_agree']} |"
        for r in report["rows"]
    ]
    md += ["", "Ratios of the medians:", ""]
    md += [f"- {k}: **{v:.2f}x**" for k, v in report["ratios"].items()]
    if report["llama_cpp_skipped"]:
        md += ["", report["llama_cpp_skipped"]]
    il = report["int8_logits"]
    md += [
        "",
        "Compilation (once per batch size, not in the figures above): "
        + ", ".join(f"{k} {v} s" for k, v in report["compile_seconds"].items())
        + ".",
        "",
        f"int8 logits vs float32 on 64 positions: max |difference| {il['max_abs_diff_over_std']} and mean "
        f"{il['mean_abs_diff_over_std']} of the logits' standard deviation; argmax equal at "
        f"{il['argmax_agree']:.0%} of positions.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
