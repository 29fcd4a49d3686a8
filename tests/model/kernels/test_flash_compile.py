"""FlashAttention under torch.compile (custom ops), the fp32 scale fix, and the shipped tile table.

On the CPU the kernels run in Triton's interpreter (conftest.py), so ``torch.compile`` of a model that calls
them exercises Dynamo, AOTAutograd and the ops' fake implementations and autograd formula for real; the
GPU-only failure (Inductor passing the softmax scale as fp64, which made the loop-carried ``acc`` change type)
is reproduced by compiling the kernel for an sm_90 target with that signature (Triton ships ptxas).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'scratchlm[triton]')")

from scratchlm.config import ModelConfig  # noqa: E402
from scratchlm.model import (
    build_model,  # noqa: E402
    layers,  # noqa: E402
)
from scratchlm.model.kernels import flash_attention as fa  # noqa: E402
from scratchlm.model.kernels import flash_tiles  # noqa: E402

REPO_SRC = os.path.join(os.path.dirname(__file__), "..", "..", "..", "src")
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def launches(monkeypatch) -> collections.Counter:
    """Kernel launches by name (proves the Triton kernels ran, not the PyTorch reference)."""
    if not HAS_CUDA:
        assert fa._kernels().INTERPRETED, "the Triton kernels are not defined under TRITON_INTERPRET=1"
    counts: collections.Counter = collections.Counter()
    launch = fa._launch

    def counting(name, *args, **kwargs):
        counts[name] += 1
        return launch(name, *args, **kwargs)

    monkeypatch.setattr(fa, "_launch", counting)
    return counts


def tiny_flash_gpt(monkeypatch, device: str) -> torch.nn.Module:
    """A 1-layer GPT (D = 16, GQA 4:2, T = 16) whose attention takes the flash_triton path on ``device``."""
    cfg = ModelConfig(
        vocab_size=64,
        context_length=16,
        n_layer=1,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        attention="flash_triton",
    )
    if device == "cpu":  # the interpreter: let the layer call the kernels on CPU tensors
        monkeypatch.setattr(layers.Attention, "_flash_ok", lambda self, q, plain, p: (True, ""))
    torch.manual_seed(0)
    return build_model(cfg).to(device)


def loss_and_grads(run, model, x, y):
    """Loss of ``run`` (the model or its compiled wrapper) and the gradients of ``model``'s parameters."""
    model.zero_grad(set_to_none=True)
    loss = run(x, y)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_with_flash_kernels_matches_eager(monkeypatch, launches, backend):
    """fullgraph=True: the kernels are one opaque op each (no graph break); loss and gradients as eager."""
    device = "cuda" if HAS_CUDA else "cpu"
    model = tiny_flash_gpt(monkeypatch, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (2, 16), generator=g).to(device)
    y = torch.randint(0, 64, (2, 16), generator=g).to(device)
    eager_loss, eager_grads = loss_and_grads(model, model, x, y)
    assert launches["attn_fwd_kernel"] == 1 and launches["attn_bwd_dq_kernel"] == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    loss, grads = loss_and_grads(compiled, model, x, y)
    assert launches["attn_fwd_kernel"] == 2 and launches["attn_bwd_dkdv_kernel"] == 2
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_custom_op_fake_shapes_and_opcheck():
    """torch.library.opcheck: schema, fake implementation (shapes, strides, dtypes) and autograd agree."""
    device = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 16, generator=g).to(device).requires_grad_()
    k, v = (torch.randn(1, 2, 20, 16, generator=g).to(device).requires_grad_() for _ in range(2))
    torch.library.opcheck(
        fa.flash_attn_fwd,
        (q, k, v, True, 0.25, "ieee"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.slow  # ~10 s: a child process compiles the kernel with ptxas
def test_kernel_compiles_for_sm90_with_an_fp64_scale():
    """Inductor's launcher types the float softmax scale fp64; the kernels must keep fp32 accumulators.

    Before the fix this failed with "Loop-carried variable acc has initial type fp32 but is re-assigned to
    fp64" (the GPU error under ``train.compile=true``). Compiled in a child without the interpreter.
    """
    script = textwrap.dedent(
        """
        import inspect, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from scratchlm.model.kernels import flash_kernels as fk
        fn = fk.attn_fwd_kernel
        names = list(inspect.signature(fn.fn).parameters)
        const = dict(GROUP=1, HEAD_DIM=16, CAUSAL=True, UPCAST=False, PRECISION="tf32", BLOCK_M=16, BLOCK_N=16)
        sig = {n: "constexpr" if n in const else "i32" for n in names}
        sig.update(Q="*bf16", K="*bf16", V="*bf16", O="*bf16", LSE="*fp32", softmax_scale="fp64")
        src = ASTSource(fn, signature=sig, constexprs={(names.index(n),): v for n, v in const.items()})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32))
        except Exception as e:
            text = repr(e)
            while e.__cause__ or e.__context__:
                e = e.__cause__ or e.__context__
                text += " | " + repr(e)
            if "Loop-carried" in text or "CompilationError" in text:
                print("FAIL", text[-500:])
            else:
                print("SKIP", text[-300:])  # no backend for this target here (not the bug under test)
        else:
            print("OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.abspath(REPO_SRC)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240
    ).stdout.strip()
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert out == "OK", out


@pytest.mark.slow  # ~30 s: benchmarks/flash_registers.py compiles for sm_90 in a child process
def test_fixed_tiles_compile_without_register_spills_on_sm90(tmp_path):
    """The fixed-mode tiles of the three kernels fit in 255 registers on sm_90 at D = 64 and 128.

    The 4-warp tiles that used to come first spill at D = 128 (forward 240 bytes per thread, dK/dV 856,
    dQ 104), so a reordering of the candidate lists or a kernel change that brings spills back fails here.
    """
    script = os.path.join(os.path.dirname(REPO_SRC), "benchmarks", "flash_registers.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, script, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0 and ("cuobjdump" in out.stderr or "backend" in out.stderr.lower()):
        pytest.skip(out.stderr.strip().splitlines()[-1][:300])  # no CUDA toolchain in this Triton
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "flash_registers_sm90.json").read_text())["rows"]
    first = {
        "attn_fwd_kernel": list(fa.FWD_CONFIGS[0]),
        "attn_bwd_dkdv_kernel": list(fa.DKDV_CONFIGS[0]),
        "attn_bwd_dq_kernel": list(fa.DQ_CONFIGS[0]),
    }
    checked = [r for r in rows if first.get(r["kernel"]) == r["tiles"]]
    assert len(checked) == 6, rows
    for r in checked:
        assert r["stack_bytes"] == 0, r
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]


TABLE = {
    "Fake GPU": {
        flash_tiles.entry_key("attn_fwd_kernel", 128, torch.bfloat16, True, 1, 2048): [128, 128, 8, 3],
        flash_tiles.entry_key("attn_fwd_kernel", 128, torch.bfloat16, True, 1, 8192): [128, 64, 8, 2],
        flash_tiles.entry_key("attn_fwd_kernel", 128, torch.bfloat16, True, 4, 512): [64, 64, 4, 3],
    }
}


def test_tile_table_lookup_exact_then_nearest_bucket():
    look = lambda **kw: flash_tiles.lookup(
        **{"gpu": "Fake GPU", "kernel": "attn_fwd_kernel", "head_dim": 128, "dtype": torch.bfloat16,
           "causal": True, "group": 1, "t_bucket": 2048, **kw},
        table=TABLE,
    )  # fmt: skip
    assert look() == (128, 128, 8, 3)
    assert look(t_bucket=8192) == (128, 64, 8, 2)
    assert look(t_bucket=16384) == (128, 64, 8, 2)  # nearest bucket
    assert look(t_bucket=1024) == (128, 128, 8, 3)
    assert look(group=4, t_bucket=4096) == (64, 64, 4, 3)  # the same group before a nearer bucket
    assert look(group=2, t_bucket=4096) in {(128, 128, 8, 3), (128, 64, 8, 2)}
    assert look(head_dim=64) is None and look(dtype=torch.float16) is None and look(causal=False) is None
    assert look(gpu="Other GPU") is None


def test_autotune_records_become_table_entries(tmp_path):
    """Autotuner.cache keys are TUNING_KEY values then the tensor dtypes; exact-fp32 choices are not shipped."""
    import triton

    tuner = types.SimpleNamespace(
        cache={
            (128, True, 1, 2048, "tf32", "torch.bfloat16", "torch.bfloat16"): triton.Config(
                {"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3
            ),
            (64, True, 1, 2048, "ieee", "torch.float32"): triton.Config(
                {"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2
            ),
        }
    )
    records = flash_tiles.autotune_records({"attn_fwd_kernel": tuner}, fa.TUNING_KEY)
    key = flash_tiles.entry_key("attn_fwd_kernel", 128, torch.bfloat16, True, 1, 2048)
    assert records == {key: [128, 64, 8, 3]}
    path = tmp_path / "tiles.json"
    assert flash_tiles.merge_into_table("Fake GPU", records, path) == 1
    assert flash_tiles.load_table(path) == {"Fake GPU": records}


class FakeKernel:
    """Stands in for a Triton kernel: records the tiles of each launch."""

    def __init__(self):
        self.runs = []

    def __getitem__(self, grid):
        def run(*args, BLOCK_M=None, BLOCK_N=None, num_warps=None, num_stages=None, **meta):
            self.runs.append((BLOCK_M, BLOCK_N, num_warps, num_stages))

        return run


def test_auto_mode_launches_the_table_tiles(monkeypatch):
    kernel = FakeKernel()
    monkeypatch.setattr(
        fa, "_kernels", lambda: types.SimpleNamespace(INTERPRETED=False, attn_fwd_kernel=kernel)
    )
    monkeypatch.setattr(fa, "_fixed_choice", {})
    monkeypatch.setattr(flash_tiles, "load_table", lambda: TABLE)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.delenv("SCRATCHLM_FLASH_TILES", raising=False)
    assert fa.tile_mode() == "auto"
    x = torch.zeros(1, dtype=torch.bfloat16)
    meta = dict(HEAD_DIM=128, CAUSAL=True, GROUP=1, T_BUCKET=1024)
    fa._launch("attn_fwd_kernel", "fwd", fa.FWD_CONFIGS, lambda bm, bn: (bm, bn), x, **meta)
    assert kernel.runs == [(128, 128, 8, 3)]
    tuned = []
    monkeypatch.setattr(fa, "_tuned", lambda name, configs: tuned.append(name) or kernel)
    meta["HEAD_DIM"] = 64  # no entry for D = 64 on this GPU: autotune
    fa._launch("attn_fwd_kernel", "fwd", fa.FWD_CONFIGS, lambda bm, bn: (bm, bn), x, **meta)
    assert tuned == ["attn_fwd_kernel"] and kernel.runs[-1] == (None, None, None, None)
