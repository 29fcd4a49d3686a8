"""Registers and spills of the FlashAttention kernels on a GPU architecture, compiled offline (no GPU needed).

    python benchmarks/flash_registers.py                    # sm_90 (H100/H200), D = 64 and 128, bf16, causal
    python benchmarks/flash_registers.py --arch 80 --head-dims 128

Triton compiles each kernel of src/scratchlm/model/kernels/flash_kernels.py for every tile configuration
that autotuning can pick (flash_attention.py's candidate lists) to a cubin with the ptxas it ships, and
``cuobjdump --dump-resource-usage`` reads the registers per thread and the stack frame. A thread has at most
255 registers; what does not fit is spilled to the stack in local memory (off-chip, cached in L1), which
every iteration of the inner loop then reads and writes. A stack of 0 bytes means no spill. This is a
property of the compiled code, not a timing: ``benchmarks/attention.py`` and ``benchmarks/gpu.sh`` time the
kernels on a GPU. Writes ``benchmarks/results/flash_registers_sm<arch>.{json,md}``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# The compiler must see real kernels, not the interpreter's (set before triton is imported).
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(ROOT / "src"))

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
FP32_POINTERS = {"LSE", "DELTA"}


def compile_kernel(fn, dtype: str, constexprs: dict, warps: int, stages: int, arch: int):
    """A compiled kernel for ``arch`` (e.g. 90) with the given constexprs; every other argument an i32.

    Like a real launch, the pointers, the strides and T are marked divisible by 16 (Triton's JIT does so
    for 16-byte aligned pointers and integers that are multiples of 16, as they are for (B, H, T, D)
    tensors with D in {64, 128} and T a multiple of 16). Without that hint loads cannot be vectorised or
    made asynchronous, and the compiled code would not be what runs. H (the head count) is left unmarked.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    signature, divisible = {}, []
    for n in names:
        if n in constexprs:
            signature[n] = "constexpr"
        elif n in POINTERS or n in FP32_POINTERS:
            signature[n] = "*fp32" if n in FP32_POINTERS else f"*{dtype}"
            divisible.append(n)
        elif n == "softmax_scale":
            signature[n] = "fp32"
        else:
            signature[n] = "i32"
            if n.startswith("stride_") or n in ("T", "T_BUCKET"):
                divisible.append(n)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(
        fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs
    )
    options = {"num_warps": warps, "num_stages": stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32 if arch < 100 else 64), options=options)


def resource_usage(cubin: bytes) -> dict:
    """{"registers": ..., "stack_bytes": ...} of a cubin, from the cuobjdump that Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if not reg or not stack:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {text[-300:]}")
    return {"registers": int(reg.group(1)), "stack_bytes": int(stack.group(1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--no-causal", action="store_true", help="the non-causal kernels instead")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    args = parser.parse_args(argv)

    from scratchlm.model.kernels import flash_attention as fa
    from scratchlm.model.kernels import flash_kernels as fk

    unsupported = [d for d in args.head_dims if d not in fa.SUPPORTED_HEAD_DIMS]
    if unsupported:
        parser.error(f"--head-dims {unsupported}: the kernels support {list(fa.SUPPORTED_HEAD_DIMS)}")

    lists = {
        "attn_fwd_kernel": fa.FWD_CONFIGS,
        "attn_bwd_dkdv_kernel": fa.DKDV_CONFIGS,
        "attn_bwd_dq_kernel": fa.DQ_CONFIGS,
    }
    rows = []
    for D in args.head_dims:
        for name, configs in lists.items():
            for bm, bn, warps, stages in configs:
                constexprs = dict(
                    GROUP=1,
                    HEAD_DIM=D,
                    CAUSAL=not args.no_causal,
                    UPCAST=False,
                    PRECISION="tf32",
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                )
                row = {"kernel": name, "D": D, "tiles": [bm, bn, warps, stages]}
                try:
                    kernel = compile_kernel(
                        getattr(fk, name), args.dtype, constexprs, warps, stages, args.arch
                    )
                    row.update(resource_usage(kernel.asm["cubin"]), shared_bytes=kernel.metadata.shared)
                except Exception as e:  # e.g. more shared memory than the architecture has: recorded
                    row["error"] = f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:200]
                rows.append(row)
                print(json.dumps(row), flush=True)

    import triton

    report = {
        "command": "python benchmarks/flash_registers.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "arch": args.arch,
        "dtype": args.dtype,
        "causal": not args.no_causal,
        "triton": triton.__version__,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"flash_registers_sm{args.arch}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# FlashAttention kernels on sm_{args.arch}: registers and spills (compiled offline)",
        "",
        f"`{report['command'].strip()}` (Triton {triton.__version__}, {args.dtype}, "
        f"{'causal' if report['causal'] else 'non-causal'}). Stack > 0: registers spilled to local memory.",
        "",
        "| kernel | D | BLOCK_M, BLOCK_N, warps, stages | registers | stack bytes | shared KiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tiles = ", ".join(map(str, r["tiles"]))
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['D']} | {tiles} | {r['error']} | | |")
        else:
            lines.append(
                f"| {r['kernel']} | {r['D']} | {tiles} | {r['registers']} | {r['stack_bytes']} | "
                f"{r['shared_bytes'] / 1024:.0f} |"
            )
    spill_free = sum(1 for r in rows if r.get("stack_bytes") == 0)
    lines += ["", f"{spill_free} of {len(rows)} configurations compile without spills."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
