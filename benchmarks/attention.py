"""ScratchLM's Triton FlashAttention-2 against PyTorch SDPA (flash, cuDNN, efficient backends) on one GPU.

Workload (the FlashAttention-2 paper's setting): bf16, causal, B*T = 16K tokens, H*D = 2048 (so Hq = 2048/D),
D in {64, 128}, T in {1K, 2K, 4K, 8K, 16K} with B = 16K/T, multi-head (Hkv = Hq) and GQA 4:1 (Hkv = Hq/4).
Each SDPA backend is pinned with ``torch.nn.attention.sdpa_kernel``; a backend that rejects ``enable_gqa`` is
timed on k, v repeated to Hq heads (the copy included, as a model would pay it) and marked so; one that
rejects a case outright is recorded as unsupported. Times are medians of ``triton.testing.do_bench``
(``return_mode="median"``, or its 0.5 quantile on a Triton without that argument).

FLOP convention: forward = 4 * B * Hq * T^2 * D, halved when causal; backward = 2.5 x forward, so
forward+backward = 3.5 x forward. TFLOP/s = FLOPs / time. Ratios are ours / SDPA's flash backend.

Run on a CUDA machine, from the repository root (with ``pip install -e '.[triton]'``)::

    python benchmarks/attention.py --quick   # ~2 min on an H100: D in {64, 128}, T in {2K, 8K}, MHA and GQA,
                                             # fixed tiles -> benchmarks/results/attention_<gpu>_quick.{json,md}
    python benchmarks/attention.py           # <= ~8 min on an H100: the full grid, autotuned tiles
                                             # -> benchmarks/results/attention_<gpu>.{json,md}

<gpu> is the device name in lower case with "_" for anything else (e.g. nvidia_h100_80gb_hbm3). The times are
sized from estimates (no H100 run yet): the full run compiles ~90 kernels and autotunes 7-8 tile candidates
per kernel at each of its 20 shapes (most of its time), then takes 20 cases x 4 providers x 2 do_bench
timings of ~0.2 s; --quick compiles ~14 kernels and times 8 cases. ``--tiles fixed`` runs the full grid
without autotuning (~3 min). Both files are rewritten after every case, so a run cut short leaves what it
measured (``"complete": false`` in the JSON, a note in the Markdown). Without CUDA (or where the kernels
cannot run) it prints why and exits 0 without writing anything.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import scratchlm  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "cuda"
TOKENS = 16 * 1024
HIDDEN = 2048
OURS = "flash_triton (ours)"
QUICK = {"seq_lens": [2048, 8192], "head_dims": [64, 128], "tiles": "fixed"}


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


def median_ms(fn, grad_to_none=None) -> float:
    """Median time of fn() in ms by triton.testing.do_bench (whose default is the mean)."""
    from triton.testing import do_bench

    if "return_mode" in inspect.signature(do_bench).parameters:
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5])


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
        OURS: lambda q, k, v: flash_attention(q, k, v, causal=True),
        "sdpa_flash": pinned(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": pinned(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": pinned(SDPBackend.EFFICIENT_ATTENTION),
    }


def kv_expanded(fn):
    """fn on k, v repeated to the query heads (for a backend without GQA); the copy is part of the time."""

    def run(q, k, v):
        group = q.shape[1] // k.shape[1]
        return fn(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))

    return run


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]


def time_case(name: str, fn, B: int, Hq: int, Hkv: int, T: int, D: int) -> dict:
    """Forward and forward+backward median time (ms) and TFLOP/s of fn on bf16 inputs, or {"error": ...}.

    The first call (outside the timing) compiles and autotunes our kernels.
    """
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def make(h: int) -> torch.Tensor:
        return torch.randn(B, h, T, D, device=DEVICE, dtype=torch.bfloat16, generator=g).requires_grad_()

    q, k, v = make(Hq), make(Hkv), make(Hkv)
    do = torch.randn_like(q)
    out: dict = {}
    try:
        fn(q, k, v).backward(do)
    except Exception as e:  # a backend that does not handle this case
        if Hkv == Hq or name == OURS:
            return {"error": first_line(e)}
        out["gqa"] = f"enable_gqa rejected ({first_line(e)}): k, v repeated to {Hq} heads"
        fn = kv_expanded(fn)
        try:
            fn(q, k, v).backward(do)
        except Exception as e2:
            return {"error": first_line(e2), **out}

    def fwd_bwd():
        fn(q, k, v).backward(do)

    with torch.no_grad():
        fwd_ms = median_ms(lambda: fn(q, k, v))
    bwd_ms = median_ms(fwd_bwd, grad_to_none=[q, k, v])
    return {
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": bwd_ms,
        "fwd_tflops": attention_flops(B, Hq, T, D, True, False) / fwd_ms / 1e9,
        "fwd_bwd_tflops": attention_flops(B, Hq, T, D, True, True) / bwd_ms / 1e9,
        **out,
    }


def check_correctness(D: int, group: int, T: int = 1024) -> dict:
    """Max abs difference of our bf16 output and gradients from fp32 SDPA at B = 2, T = 1024."""
    from scratchlm.model.kernels.flash_attention import flash_attention

    g = torch.Generator(device=DEVICE).manual_seed(1)
    Hq = HIDDEN // D

    def make(h: int) -> torch.Tensor:
        return torch.randn(2, h, T, D, device=DEVICE, dtype=torch.bfloat16, generator=g)

    q, k, v, do = make(Hq), make(Hq // group), make(Hq // group), make(Hq)
    out = {}
    for name, fn, dtype in [
        ("ours", lambda *a: flash_attention(*a, causal=True), torch.bfloat16),
        (
            "fp32",
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1),
            torch.float32,
        ),
    ]:
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        o.backward(do.to(dtype))
        out[name] = [o.detach()] + [x.grad for x in leaves]
    return {
        n: (a.float() - b.float()).abs().max().item()
        for n, a, b in zip(["O", "dQ", "dK", "dV"], out["ours"], out["fp32"])
    }


def verdicts(key: str, D: int, row: dict) -> list[str]:
    """Pass/fail lines of the issue's targets for one case at T >= 2K (none where a ratio is missing)."""
    ratio, ours = row["ratio_vs_sdpa_flash"], row["results"][OURS]
    if row["T"] < 2048 or ratio["fwd"] is None or ratio["fwd_bwd"] is None:
        return []
    where = f"{key} T={row['T']}"
    ok = ratio["fwd"] >= 0.9 and ratio["fwd_bwd"] >= 0.7
    lines = [
        f"{where}: fwd {ratio['fwd']:.2f}x (>= 0.9), fwd+bwd {ratio['fwd_bwd']:.2f}x (>= 0.7): "
        + ("PASS" if ok else "FAIL")
    ]
    goal = ratio["fwd"] >= 1.0 and ratio["fwd_bwd"] >= 0.85 and (D != 128 or ours["fwd_tflops"] >= 300)
    lines.append(
        f"{where} goal: fwd {ratio['fwd']:.2f}x (>= 1.0)"
        + (f", {ours['fwd_tflops']:.0f} TFLOP/s (>= 300)" if D == 128 else "")
        + f", fwd+bwd {ratio['fwd_bwd']:.2f}x (>= 0.85): "
        + ("MET" if goal else "not met")
    )
    return lines


def to_markdown(report: dict) -> str:
    """One table per (D, GQA): TFLOP/s per provider, forward and forward+backward, and ours/sdpa_flash."""
    lines = [
        f"# Attention: flash_triton vs SDPA on {report['machine']['gpu']}",
        "",
        f"Command: `{report['command']}`. Tiles: {report['tiles']}. {report['convention']}",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in report["machine"].items()),
        "",
    ]
    if not report["complete"]:
        lines += ["**Incomplete: the run stopped before the last case; what it measured is below.**", ""]
    names = list(providers_names(report))
    notes = []
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
                star = "*" if "gqa" in r else ""
                cells += [
                    f"{r['fwd_tflops']:.0f}{star}" if "fwd_tflops" in r else "n/a",
                    f"{r['fwd_bwd_tflops']:.0f}{star}" if "fwd_bwd_tflops" in r else "n/a",
                ]
                if "gqa" in r or "error" in r:
                    notes.append(f"{key} T={row['T']} {n}: {r.get('error') or r['gqa']}")
            ratio = row["ratio_vs_sdpa_flash"]
            fmt = lambda x: f"{x:.2f}x" if x is not None else "n/a"
            lines.append(
                f"| {row['T']} | {row['B']} | "
                + " | ".join(cells)
                + f" | {fmt(ratio['fwd'])} | {fmt(ratio['fwd_bwd'])} |"
            )
        lines.append("")
    if notes:
        lines += ["n/a: unsupported; *: k, v repeated to Hq heads. Details:", ""]
        lines += [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    lines += ["## Targets (T >= 2K)", ""] + [f"- {t}" for t in report["targets"]] + [""]
    lines += ["## Correctness vs fp32 SDPA at T=1024 (max abs error)", ""]
    fmt_err = lambda n, e: f"{n} {e:.2e}" if isinstance(e, float) else f"{n}: {e}"
    lines += [
        f"- {k}: " + ", ".join(fmt_err(n, e) for n, e in v.items()) for k, v in report["errors"].items()
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
    parser.add_argument(
        "--tiles",
        choices=["autotune", "fixed"],
        default=None,
        help="how our kernels pick tiles (SCRATCHLM_FLASH_TILES): autotune (default) or fixed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="~2 min smoke run: T in {2K, 8K}, D in {64, 128}, fixed tiles; writes attention_<gpu>_quick.*",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.head_dims = QUICK["seq_lens"], QUICK["head_dims"]
        args.tiles = args.tiles or QUICK["tiles"]
    args.tiles = args.tiles or "autotune"
    if not torch.cuda.is_available():
        print(
            "benchmarks/attention.py needs a CUDA GPU (an H100 for the recorded figures); none here, "
            "nothing written",
            file=sys.stderr,
        )
        return 0
    os.environ["SCRATCHLM_FLASH_TILES"] = args.tiles
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
        "tiles": args.tiles,
        "convention": "TFLOP/s with forward FLOPs = 4*B*H*T^2*D / 2 (causal), forward+backward = 3.5x "
        "that (backward = 2.5x forward); H = query heads; do_bench median times.",
        "complete": False,
        "cases": {},
        "errors": {},
        "targets": [],
    }
    slug = re.sub(r"[^a-z0-9]+", "_", report["machine"]["gpu"].lower()).strip("_")
    stem = RESULTS / (f"attention_{slug}" + ("_quick" if args.quick else ""))

    def save() -> None:
        write_atomic(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        write_atomic(stem.with_suffix(".md"), to_markdown(report))

    for D in args.head_dims:
        for group in (1, 4):
            Hq = HIDDEN // D
            key = f"D={D}, Hq={Hq}, Hkv={Hq // group}" + (" (GQA 4:1)" if group > 1 else " (MHA)")
            try:
                report["errors"][key] = check_correctness(D, group)
            except Exception as e:
                report["errors"][key] = {"error": first_line(e)}
                print(f"{key}: correctness check failed: {first_line(e)}", file=sys.stderr, flush=True)
            rows = report["cases"].setdefault(key, [])
            for T in args.seq_lens:
                B = max(1, TOKENS // T)
                results = {
                    name: time_case(name, fn, B, Hq, Hq // group, T, D) for name, fn in runners.items()
                }
                torch.cuda.empty_cache()
                ours, ref = results[OURS], results["sdpa_flash"]
                ratio = {
                    m: (
                        ours[f"{m}_tflops"] / ref[f"{m}_tflops"]
                        if f"{m}_tflops" in ours and f"{m}_tflops" in ref
                        else None
                    )
                    for m in ("fwd", "fwd_bwd")
                }
                row = {"T": T, "B": B, "results": results, "ratio_vs_sdpa_flash": ratio}
                rows.append(row)
                report["targets"] += verdicts(key, D, row)
                print(
                    f"{key} T={T}: "
                    + ", ".join(
                        f"{n} {r['fwd_tflops']:.0f}/{r['fwd_bwd_tflops']:.0f}"
                        if "fwd_tflops" in r
                        else f"{n} {r['error']}"
                        for n, r in results.items()
                    )
                    + " TFLOP/s (fwd/fwd+bwd)",
                    flush=True,
                )
                save()
    report["complete"] = True
    save()
    print(f"wrote {stem}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
