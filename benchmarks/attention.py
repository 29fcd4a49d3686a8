"""ScratchLM's Triton FlashAttention-2 against PyTorch SDPA (flash, cuDNN, efficient backends) on one GPU.

Workload (the FlashAttention-2 paper's setting): bf16, causal, B*T = 16K tokens, H*D = 2048 (so Hq = 2048/D),
D in {64, 128}, T in {1K, 2K, 4K, 8K, 16K} with B = 16K/T, multi-head (Hkv = Hq) and GQA 4:1 (Hkv = Hq/4).
Each SDPA backend is pinned with ``torch.nn.attention.sdpa_kernel``; a backend that rejects a case is
recorded as unsupported. Times are medians from ``triton.testing.do_bench``.

FLOP convention: forward = 4 * B * Hq * T^2 * D, halved when causal; backward = 2.5 x forward, so
forward+backward = 3.5 x forward. TFLOP/s = FLOPs / time. Ratios are ours / SDPA's flash backend.

Run on a CUDA machine:  python benchmarks/attention.py   (writes benchmarks/results/attention_<device>.{json,md})
Without CUDA it prints why and exits 0 without writing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = 16 * 1024
HIDDEN = 2048


def machine() -> dict:
    """Platform, CPU model, cores, GPU and library versions."""
    import triton

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    props = torch.cuda.get_device_properties(0)
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
    }


def attention_flops(B: int, H: int, T: int, D: int, causal: bool, backward: bool) -> float:
    """4*B*H*T^2*D for the forward (two T x T x D matmuls), halved when causal; x3.5 with the backward."""
    flops = 4 * B * H * T * T * D / (2 if causal else 1)
    return flops * 3.5 if backward else flops


def providers() -> dict:
    """name -> attention(q, k, v) with q (B, Hq, T, D), k/v (B, Hkv, T, D), causal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from scratchlm.model.kernels.flash_attention import flash_attention

    def pinned(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1]
                )

        return run

    return {
        "flash_triton (ours)": lambda q, k, v: flash_attention(q, k, v, causal=True),
        "sdpa_flash": pinned(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": pinned(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": pinned(SDPBackend.EFFICIENT_ATTENTION),
    }


def time_case(fn, B: int, Hq: int, Hkv: int, T: int, D: int) -> dict:
    """Forward and forward+backward time (ms) and TFLOP/s of fn on fresh bf16 inputs; None if unsupported."""
    from triton.testing import do_bench

    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda h: torch.randn(
        B, h, T, D, device="cuda", dtype=torch.bfloat16, generator=g
    ).requires_grad_()
    q, k, v = make(Hq), make(Hkv), make(Hkv)
    do = torch.randn_like(q)
    try:
        fn(q, k, v).backward(do)
    except RuntimeError as e:  # a backend that does not handle this case
        return {"error": str(e).splitlines()[0][:200]}

    def fwd_bwd():
        fn(q, k, v).backward(do)

    with torch.no_grad():
        fwd_ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100)
    bwd_ms = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=[q, k, v])
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": bwd_ms,
        "fwd_tflops": attention_flops(B, Hq, T, D, True, False) / fwd_ms / 1e9,
        "fwd_bwd_tflops": attention_flops(B, Hq, T, D, True, True) / bwd_ms / 1e9,
    }


def check_correctness(D: int, group: int) -> dict:
    """Max abs difference of our output and gradients vs SDPA's flash backend at T = 1024 (bf16)."""
    from scratchlm.model.kernels.flash_attention import flash_attention

    g = torch.Generator(device="cuda").manual_seed(1)
    Hq = HIDDEN // D
    make = lambda h: torch.randn(2, h, 1024, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v, do = make(Hq), make(Hq // group), make(Hq // group), make(Hq)
    out = {}
    for name, fn in [
        ("ours", lambda *a: flash_attention(*a, causal=True)),
        (
            "fp32",
            lambda q, k, v: F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), is_causal=True, enable_gqa=group > 1
            ),
        ),
    ]:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        o.backward(do.to(o.dtype))
        out[name] = [o.detach()] + [x.grad for x in leaves]
    return {n: (a.float() - b).abs().max().item() for n, a, b in zip(["O", "dQ", "dK", "dV"], *out.values())}


def to_markdown(report: dict) -> str:
    """One table per (D, GQA): TFLOP/s per provider, forward and forward+backward, and ours/sdpa_flash."""
    lines = [
        f"# Attention: flash_triton vs SDPA on {report['machine']['gpu']}",
        "",
        f"Command: `{report['command']}`. {report['convention']}",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()),
        "",
    ]
    names = list(providers_names(report))
    for key, rows in report["cases"].items():
        lines += [
            f"## {key}",
            "",
            "| T | B | "
            + " | ".join(f"{n} fwd | {n} fwd+bwd" for n in names)
            + " | ours/flash fwd | ours/flash fwd+bwd |",
            "|" + "---|" * (2 + 2 * len(names) + 2),
        ]
        for row in rows:
            cells = []
            for n in names:
                r = row["results"].get(n, {})
                cells += [
                    f"{r['fwd_tflops']:.0f}" if "fwd_tflops" in r else "n/a",
                    f"{r['fwd_bwd_tflops']:.0f}" if "fwd_bwd_tflops" in r else "n/a",
                ]
            ratio = row.get("ratio_vs_sdpa_flash", {})
            fmt = lambda x: f"{x:.2f}x" if x is not None else "n/a"
            lines.append(
                f"| {row['T']} | {row['B']} | "
                + " | ".join(cells)
                + f" | {fmt(ratio.get('fwd'))} | {fmt(ratio.get('fwd_bwd'))} |"
            )
        lines.append("")
    lines += ["## Targets (T >= 2K)", ""] + [f"- {t}" for t in report["targets"]] + [""]
    lines += ["## Correctness vs fp32 SDPA at T=1024 (max abs error)", ""]
    lines += [
        f"- {k}: " + ", ".join(f"{n} {e:.2e}" for n, e in v.items()) for k, v in report["errors"].items()
    ]
    return "\n".join(lines) + "\n"


def providers_names(report: dict):
    seen = {}
    for rows in report["cases"].values():
        for row in rows:
            seen.update(dict.fromkeys(row["results"]))
    return seen


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "benchmarks/attention.py needs a CUDA GPU (an H100 for the recorded figures); none here, "
            "nothing written",
            file=sys.stderr,
        )
        return 0
    from scratchlm.model.kernels.flash_attention import flash_available

    ok, reason = flash_available(torch.device("cuda"))
    if not ok:
        print(
            f"benchmarks/attention.py: flash_triton cannot run here: {reason}; nothing written",
            file=sys.stderr,
        )
        return 0

    runners = providers()
    report = {
        "command": "python benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "dtype": "bfloat16",
        "causal": True,
        "tokens": TOKENS,
        "hidden": HIDDEN,
        "convention": "TFLOP/s with forward FLOPs = 4*B*H*T^2*D / 2 (causal), forward+backward = 3.5x "
        "that (backward = 2.5x forward); H = query heads; do_bench median times.",
        "cases": {},
        "errors": {},
        "targets": [],
    }
    for D in args.head_dims:
        for group in (1, 4):
            Hq = HIDDEN // D
            key = f"D={D}, Hq={Hq}, Hkv={Hq // group}" + (" (GQA 4:1)" if group > 1 else " (MHA)")
            report["errors"][key] = check_correctness(D, group)
            rows = []
            for T in args.seq_lens:
                B = max(1, TOKENS // T)
                results = {name: time_case(fn, B, Hq, Hq // group, T, D) for name, fn in runners.items()}
                ours, ref = results["flash_triton (ours)"], results["sdpa_flash"]
                ratio = {
                    m: (
                        ours[f"{m}_tflops"] / ref[f"{m}_tflops"]
                        if f"{m}_tflops" in ours and f"{m}_tflops" in ref
                        else None
                    )
                    for m in ("fwd", "fwd_bwd")
                }
                rows.append({"T": T, "B": B, "results": results, "ratio_vs_sdpa_flash": ratio})
                print(
                    f"{key} T={T}: "
                    + ", ".join(
                        f"{n} {r.get('fwd_tflops', 0):.0f}/{r.get('fwd_bwd_tflops', 0):.0f}"
                        for n, r in results.items()
                    )
                    + " TFLOP/s (fwd/fwd+bwd)",
                    flush=True,
                )
                if T >= 2048 and ratio["fwd"] is not None and ratio["fwd_bwd"] is not None:
                    verdict = "PASS" if ratio["fwd"] >= 0.9 and ratio["fwd_bwd"] >= 0.7 else "FAIL"
                    report["targets"].append(
                        f"{key} T={T}: fwd {ratio['fwd']:.2f}x (>= 0.9), fwd+bwd "
                        f"{ratio['fwd_bwd']:.2f}x (>= 0.7): {verdict}"
                    )
            report["cases"][key] = rows

    slug = re.sub(r"[^a-z0-9]+", "_", report["machine"]["gpu"].lower()).strip("_")
    write_atomic(RESULTS / f"attention_{slug}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(RESULTS / f"attention_{slug}.md", to_markdown(report))
    print(f"wrote {RESULTS}/attention_{slug}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
