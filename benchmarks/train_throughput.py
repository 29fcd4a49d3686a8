"""Training throughput: ScratchLM vs Hugging Face transformers, same architecture, batch and optimizer.

    python benchmarks/train_throughput.py                    # CPU: tiny + small, fp32 + bf16
    python benchmarks/train_throughput.py --device cuda      # GPU: MFU of the gpt2 preset (context 1024,
                                                             #      bf16, torch.compile) vs HF GPT2LMHeadModel

Peers: ``transformers.GPT2LMHeadModel`` (vs our GPT-2 style: learned positions, LayerNorm, tanh-GELU, biases,
tied embeddings) and ``transformers.LlamaForCausalLM`` (vs our Llama style: RoPE, RMSNorm, SwiGLU, no
biases, untied head), each built from the identical shape (vocab, width, layers, heads, MLP width,
context), no dropout, HF's default attention implementation (sdpa). Both sides run the *same* step code:
autocast (bf16 runs), forward, loss, backward, clip the grad norm to 1.0, AdamW step (ScratchLM's
``build_optimizers``: torch AdamW, fused), zero grads. On the CPU each side runs eager and
``torch.compile``'d (default mode, compiled from a clean dynamo cache, warm-up excluded). Implementations
alternate step blocks round by round; tokens/s (batch * context per step) is the median over rounds, and a
ratio is the median of the per-round ratios, so that both sides of a ratio saw the same machine load (this
shared 2-core machine's speed drifts by tens of percent within minutes). The headline ratio is ScratchLM
compiled (``train.compile=true``) over HF eager (its default). Writes
benchmarks/results/train_throughput[_cuda].{json,md}.

``--kernel-floor`` (CPU) also profiles a round of steps of each side and measures the share of the wall
time spent in the GEMM and attention kernels (``aten::mm``, ``addmm``, ``bmm`` and sdpa's CPU flash forward
and backward). Both sides call these same ATen kernels on the same shapes, so HF's eager step time over
*our* time in them, ``ratio / share``, is the highest ratio any ScratchLM built on these kernels could
reach: the bound if everything else in our step (norms, activations, the loss, the optimizer, Python)
took no time at all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from scratchlm.config import ModelConfig, TrainConfig
from scratchlm.model import build_model
from scratchlm.model.layers import mlp_hidden_dim
from scratchlm.train.optim import build_optimizers
from scratchlm.train.trainer import train_step

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

SIZES = {  # name: (d_model, n_layer, n_head, context, batch, vocab)
    "tiny": (128, 4, 4, 64, 12, 65),
    "small": (384, 6, 6, 256, 8, 4096),
}


class HFAdapter(nn.Module):
    """Gives an HF causal LM our forward contract: (x, y) -> (None, loss); HF shifts the labels itself."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return None, self.hf(input_ids=x, labels=x).loss


def model_config(style: str, d: int, L: int, H: int, T: int, V: int) -> ModelConfig:
    if style == "gpt2":
        return ModelConfig(
            vocab_size=V,
            d_model=d,
            n_layer=L,
            n_head=H,
            context_length=T,
            pos="learned",
            norm="layernorm",
            mlp="gelu_tanh",
            bias=True,
            tie_embeddings=True,
        )
    return ModelConfig(
        vocab_size=V,
        d_model=d,
        n_layer=L,
        n_head=H,
        context_length=T,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    )


def hf_model(style: str, cfg: ModelConfig) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise SystemExit("this benchmark needs transformers: pip install 'scratchlm[hf]'") from None
    if style == "gpt2":
        hc = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=mlp_hidden_dim(cfg),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps,
        )
        return transformers.GPT2LMHeadModel(hc)
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=mlp_hidden_dim(cfg),
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_theta=cfg.rope_theta,
    )
    return transformers.LlamaForCausalLM(hc)


class Runner:
    """One model + optimizer + fixed batches; ``run(n)`` times n optimizer steps."""

    def __init__(self, model: nn.Module, batch: int, T: int, V: int, device, dtype, compile_: bool):
        torch.manual_seed(0)
        self.model = model.to(device).train()
        self.forward = torch.compile(self.model) if compile_ else self.model
        self.opts = build_optimizers(self.model, TrainConfig(lr=1e-4, weight_decay=0.1))
        x = torch.randint(0, V, (batch, T + 1), device=device)
        self.batches = [(x[:, :-1], x[:, 1:])]
        self.device, self.dtype, self.tokens = device, dtype, batch * T
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def run(self, steps: int) -> float:
        """tokens/s over ``steps`` steps."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(
                self.forward,
                self.model,
                self.opts,
                self.batches,
                grad_clip=1.0,
                device=self.device,
                dtype=self.dtype,
            )
        sync()
        return steps * self.tokens / (time.perf_counter() - t0)


def machine(device: torch.device) -> dict:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    import transformers

    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1m_end": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


VARIANTS = ("scratchlm-eager", "scratchlm-compiled", "hf-eager", "hf-compiled")

# the kernels both sides share: every matmul, and torch's CPU attention forward and backward
SHARED_KERNELS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


def shared_kernel_share(runner: Runner, steps: int) -> float:
    """Fraction of the wall time of ``steps`` profiled steps spent inside SHARED_KERNELS (self time).

    A fraction, not milliseconds: numerator and denominator see the same machine load. The profiler's own
    per-op cost lengthens the wall time, so the share (and the bound built on it) errs low (high).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        runner.run(steps)
        wall = time.perf_counter() - t0
    us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in SHARED_KERNELS)
    return us / 1e6 / wall


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


def bench_cpu(args) -> dict:
    """Every (size, dtype, style): ScratchLM and HF, each eager and torch.compile'd, alternating round by
    round. The headline ratio is ScratchLM compiled (``train.compile=true``) over HF eager (HF's default);
    the other two pairings are reported beside it. A ratio is taken *within* each round (both sides under
    the same machine load) and the median over rounds is reported."""
    device = torch.device("cpu")
    rows = []
    for size in args.sizes:
        d, L, H, T, B, V = SIZES[size]
        for dtype in (getattr(torch, name) for name in args.dtypes):
            for style in ("gpt2", "llama"):
                cfg = model_config(style, d, L, H, T, V)
                runners = {}
                torch._dynamo.reset()  # a clean compile cache per case (the recompile limit is per function)
                for variant in VARIANTS:
                    model = (
                        build_model(cfg)
                        if variant.startswith("scratchlm")
                        else HFAdapter(hf_model(style, cfg))
                    )
                    runner = Runner(model, B, T, V, device, dtype, variant.endswith("compiled"))
                    t0 = time.perf_counter()
                    runner.run(args.warmup)
                    runner.warmup_s = time.perf_counter() - t0
                    runners[variant] = runner
                samples = {k: [] for k in runners}
                steps = args.steps if size == "tiny" else max(1, args.steps // 5)
                for _ in range(args.rounds):  # alternate implementations, round by round
                    for k, r in runners.items():
                        samples[k].append(r.run(steps))

                row = {
                    "size": size,
                    "dtype": str(dtype).removeprefix("torch."),
                    "style": style,
                    "shape": dict(d_model=d, n_layer=L, n_head=H, context=T, batch=B, vocab=V),
                    "params_scratchlm": runners["scratchlm-eager"].n_params,
                    "params_hf": runners["hf-eager"].n_params,
                    "tok_s": {k: statistics.median(v) for k, v in samples.items()},
                    "ratio": median_ratio(samples["scratchlm-compiled"], samples["hf-eager"]),
                    "ratio_eager": median_ratio(samples["scratchlm-eager"], samples["hf-eager"]),
                    "ratio_both_compiled": median_ratio(
                        samples["scratchlm-compiled"], samples["hf-compiled"]
                    ),
                    "warmup_s": {k: round(r.warmup_s, 1) for k, r in runners.items()},
                    "samples": samples,
                }
                if args.kernel_floor:
                    ours = shared_kernel_share(runners["scratchlm-compiled"], steps)
                    row["kernel_floor"] = {
                        "scratchlm_compiled_share": ours,
                        "hf_eager_share": shared_kernel_share(runners["hf-eager"], steps),
                        "bound": row["ratio"] / ours,
                    }
                rows.append(row)
                print(
                    f"{size:5s} {row['dtype']:8s} {style:5s}: "
                    + "  ".join(f"{k} {v:9,.0f}" for k, v in row["tok_s"].items())
                    + f"  ratio {row['ratio']:.2f}x (eager {row['ratio_eager']:.2f}x, "
                    f"both compiled {row['ratio_both_compiled']:.2f}x)"
                    + (f"  bound {row['kernel_floor']['bound']:.2f}x" if args.kernel_floor else ""),
                    flush=True,
                )
                del runners
    return {"rows": rows}


def bench_cuda(args) -> dict:
    """MFU of the gpt2 preset at context 1024, bf16, compiled; HF GPT2LMHeadModel alongside."""
    from scratchlm.config import PRESETS
    from scratchlm.model.gpt import estimate_mfu
    from scratchlm.train.metrics import peak_flops

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = ModelConfig(**PRESETS["gpt2"]["model"])
    B, T, V = args.cuda_batch, cfg.context_length, cfg.vocab_size
    ours = Runner(build_model(cfg), B, T, V, device, dtype, compile_=True)
    peer = Runner(HFAdapter(hf_model("gpt2", cfg)), B, T, V, device, dtype, compile_=args.compile)
    for r in (ours, peer):
        r.run(args.warmup + 2)
    samples = {"scratchlm": [], "hf": []}
    for _ in range(args.rounds):
        samples["scratchlm"].append(ours.run(args.steps))
        samples["hf"].append(peer.run(args.steps))
    peak = peak_flops(device, dtype)
    fpt = ours.model.flops_per_token()
    out = {}
    for k, v in samples.items():
        tps = statistics.median(v)
        out[k] = {"tok_s": tps, "mfu": estimate_mfu(fpt, tps, peak) if peak else None, "samples": v}
        print(f"{k}: {tps:,.0f} tok/s, MFU {out[k]['mfu']}", flush=True)
    return {
        "rows": [
            {
                "preset": "gpt2",
                "context": T,
                "batch": B,
                "dtype": "bfloat16",
                "compiled": True,
                "flops_per_token": fpt,
                "peak_flops": peak,
                **out,
                "ratio": out["scratchlm"]["tok_s"] / out["hf"]["tok_s"],
            }
        ]
    }


def write(report: dict, stem: str, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        f"# Training throughput: ScratchLM vs HF transformers ({report['device']})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers "
        f"{m['transformers']}, {m['threads']} threads; load average {m['load_avg_1m_end']:.1f} at the end "
        "(shared machine: figures are medians over alternating rounds)",
        "",
    ]
    if report["device"] == "cpu":
        lines += [
            "tokens/s (median over rounds); ratios are medians of per-round ratios (both sides measured in the "
            "same round). Headline: ScratchLM with `train.compile=true` vs HF's default (eager).",
            "",
            "| size | dtype | style (HF peer) | ScratchLM eager | ScratchLM compiled | HF eager | HF compiled "
            "| **ratio** (ours compiled / HF eager) | eager / eager | compiled / compiled |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["rows"]:
            peer = "GPT2LMHeadModel" if r["style"] == "gpt2" else "LlamaForCausalLM"
            t = r["tok_s"]
            lines.append(
                f"| {r['size']} | {r['dtype']} | {r['style']} ({peer}) | {t['scratchlm-eager']:,.0f} | "
                f"{t['scratchlm-compiled']:,.0f} | {t['hf-eager']:,.0f} | {t['hf-compiled']:,.0f} | "
                f"**{r['ratio']:.2f}x** | {r['ratio_eager']:.2f}x | {r['ratio_both_compiled']:.2f}x |"
            )
        lines += [
            "",
            "Shapes: tiny = d 128, 4 layers, 4 heads, context 64, batch 12, vocab 65; small = d 384, "
            "6 layers, 6 heads, context 256, batch 8, vocab 4096. Goal: ratio >= 1.3x at both sizes.",
        ]
        floors = [r for r in report["rows"] if "kernel_floor" in r]
        if floors:
            lines += [
                "",
                "Kernel floor (`--kernel-floor`): the share of each side's step spent inside the GEMM and "
                "attention kernels both sides call on the same shapes (aten mm/addmm/bmm, sdpa's CPU flash "
                "forward + backward), from a profiled round. **bound** = ratio / our share = HF eager step "
                "/ our time in those kernels: the highest ratio possible on them even if all our other "
                "work took no time.",
                "",
                "| size | dtype | style | share of ours compiled | share of HF eager | measured ratio "
                "| **bound** |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in floors:
                f = r["kernel_floor"]
                lines.append(
                    f"| {r['size']} | {r['dtype']} | {r['style']} | {100 * f['scratchlm_compiled_share']:.0f}% "
                    f"| {100 * f['hf_eager_share']:.0f}% | {r['ratio']:.2f}x | **{f['bound']:.2f}x** |"
                )
    else:
        r = report["rows"][0]
        lines += ["| model | tok/s | MFU |", "|---|---|---|"]
        for k in ("scratchlm", "hf"):
            mfu = r[k]["mfu"]
            lines.append(
                f"| {k} gpt2 (ctx {r['context']}, batch {r['batch']}, bf16, compiled) | "
                f"{r[k]['tok_s']:,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} |"
            )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    p.add_argument("--steps", type=int, default=10, help="steps per round (tiny; small uses steps/5)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="CUDA: also compile HF (CPU: both are always run)")
    p.add_argument("--cuda-batch", type=int, default=16)
    p.add_argument(
        "--kernel-floor",
        action="store_true",
        help="CPU: profile each side's GEMM + attention kernel time and report the bound it puts on the ratio",
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    command = "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    report = bench_cpu(args) if device.type == "cpu" else bench_cuda(args)
    report = {"benchmark": "train_throughput", "device": args.device, "machine": machine(device), **report}
    write(report, "train_throughput" if device.type == "cpu" else "train_throughput_cuda", command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
