"""The Triton FlashAttention-2 kernels against PyTorch's SDPA: forward, saved LSE, gradients, GQA, causal.

Without CUDA the kernels run in Triton's CPU interpreter (conftest.py); with CUDA the same checks run on the
GPU (marked ``gpu``) with exact fp32 dots (every call passes input_precision="ieee"). The reference is fp32
SDPA on the same (upcast) inputs; fp16/bf16 results must be within max(2x the error of PyTorch's own
attention in that dtype, 1e-2) of it.

Every test that takes ``device`` proves that the Triton kernels ran (the autouse ``kernel_launches``
fixture counts their launches and makes the fallback to the PyTorch reference an error), so a broken
interpreter set-up fails instead of silently testing the reference.

GPU run: ``pytest -m gpu tests/model/kernels`` (a few minutes on an H100). The tiles are fixed there
(conftest.py sets SCRATCHLM_FLASH_TILES=fixed: the first candidate of each list in flash_attention.py that
fits), since autotuning 7-8 candidates per kernel for each of the grid's constexpr combinations would take
far longer; ``SCRATCHLM_FLASH_TILES=autotune pytest -m gpu tests/model/kernels`` tests the autotuned path.
"""

from __future__ import annotations

import collections
import itertools
import math
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (pip install 'scratchlm[triton]')")

from scratchlm.errors import ConfigError  # noqa: E402
from scratchlm.model.kernels import flash_attention as fa  # noqa: E402
from scratchlm.model.kernels.flash_attention import flash_attention, flash_available  # noqa: E402
from scratchlm.model.kernels.flash_reference import reference_forward  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(HAS_CUDA, reason="CUDA present: the gpu tests run these")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def kernel_launches(request, monkeypatch) -> collections.Counter:
    """Launches per kernel name in this test; falling back to the PyTorch reference fails the test.

    flash_attention() runs ``flash_attention_reference`` (with a one-time warning) where the kernels cannot
    run; without this fixture a test on the CPU would then pass while testing the reference.
    """
    device = getattr(request.node, "callspec", None) and request.node.callspec.params.get("device")
    if device == "cpu":
        assert fa._kernels().INTERPRETED, "the Triton kernels are not defined under TRITON_INTERPRET=1"
    launches: collections.Counter = collections.Counter()
    launch = fa._launch

    def counting_launch(name, *args, **kwargs):
        launches[name] += 1
        return launch(name, *args, **kwargs)

    def no_fallback(*args, **kwargs):
        raise AssertionError(
            "flash_attention fell back to the PyTorch reference instead of the Triton kernels"
        )

    monkeypatch.setattr(fa, "_launch", counting_launch)
    monkeypatch.setattr(fa, "flash_attention_reference", no_fallback)
    yield launches
    if device is not None:
        assert launches["attn_fwd_kernel"] + launches["attn_bwd_dq_kernel"] > 0, "no Triton kernel ran"


def flash(q, k, v, causal: bool = True, **kwargs) -> torch.Tensor:
    """The kernel under test with exact fp32 dots stated, not left to the default (ignored for fp16/bf16)."""
    return flash_attention(q, k, v, causal=causal, input_precision="ieee", **kwargs)


def make_inputs(B: int, H: int, group: int, T: int, D: int, dtype: torch.dtype, device: str, seed: int = 0):
    """q (B, H, T, D), k, v (B, H // group, T, D), dO like q; standard normal, reproducible."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, H // group, T, D), (B, H // group, T, D), (B, H, T, D)]
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def tolerance(dtype: torch.dtype, torch_err: float) -> float:
    return 1e-4 if dtype == torch.float32 else max(2 * torch_err, 1e-2)


def with_grads(fn, q, k, v, do, causal):
    """(O, dQ, dK, dV) of fn(q, k, v, causal) for the upstream gradient dO."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, causal)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def batch_and_heads(T: int, group: int) -> tuple[int, int]:
    """(B, Hq) of a forward case: B*Hq = 8 below T = 64; from T = 64 on one sequence and Hq = max(2, group)
    (B*Hq = 2 or 4). The interpreter's time grows with the programs (B*Hq x query tiles) times the key tiles
    each one walks; batch strides are exercised by the shorter cases and the gradient tests."""
    return (2, 4) if T < 64 else (1, max(2, group))


# Forward: every T x D x group x causal x dtype (the full product), B*H <= 8 (batch_and_heads).
FORWARD_GRID = list(itertools.product([1, 17, 64, 200], [16, 64, 128], [1, 4], [True, False], DTYPES))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,D,group,causal,dtype_name", FORWARD_GRID)
def test_forward_matches_sdpa(device, T, D, group, causal, dtype_name, kernel_launches):
    dtype = DTYPES[dtype_name]
    B, H = batch_and_heads(T, group)
    q, k, v, _ = make_inputs(B, H, group, T, D, dtype, device)
    o = flash(q, k, v, causal=causal)
    assert kernel_launches["attn_fwd_kernel"] == 1
    assert o.shape == q.shape and o.dtype == dtype and torch.isfinite(o).all()
    ref = sdpa(q.float(), k.float(), v.float(), causal)
    torch_err = 0.0 if dtype == torch.float32 else max_err(sdpa(q, k, v, causal), ref)
    assert max_err(o, ref) <= tolerance(dtype, torch_err)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_saved_logsumexp_matches_reference_and_torch(device, causal):
    """The kernel saves LSE_i = log sum_j exp(S_ij) in fp32, the same as the tiled reference."""
    q, k, v, _ = make_inputs(2, 4, 2, 50, 32, torch.float32, device)
    o, lse = fa._forward(q, k, v, causal, 1 / math.sqrt(32), "ieee")
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 50)
    ref_o, ref_lse = reference_forward(q, k, v, causal)
    s = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) / math.sqrt(32)
    if causal:
        s = s.masked_fill(torch.ones(50, 50, dtype=torch.bool, device=device).triu(1), -math.inf)
    assert max_err(lse, torch.logsumexp(s, dim=-1)) < 1e-4
    assert max_err(lse, ref_lse) < 1e-4 and max_err(o, ref_o) < 1e-5


# Rows that see no key at all (l = 0): the public API cannot make one (queries and keys have the same length,
# so with causal masking every row still sees key 0), so these tests make every score of chosen rows -inf,
# which is what a mask does: a query row of -inf against strictly positive keys. T = 48 is a whole number
# of interpreter key tiles (a zero-padded key would give -inf * 0 = NaN before the mask replaces it) and a
# ragged number of query tiles. DEAD: the first row, one in the second query tile, the last row.
T_DEAD, DEAD = 48, [0, 37, 47]


def dead_row_inputs(device: str):
    """q (1, 4, T_DEAD, 16) with the DEAD rows -inf, k/v (1, 2, T_DEAD, 16) with k > 0, dO; fp32."""
    q, k, v, do = make_inputs(1, 4, 2, T_DEAD, 16, torch.float32, device, seed=4)
    q[:, :, DEAD] = -math.inf
    return q, k.abs() + 0.5, v, do


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_fully_masked_rows_give_zero_output_and_infinite_lse(device, causal):
    """Forward, l = 0 branch: O = 0 and LSE = +inf on rows with no visible key, never NaN; other rows exact.

    The reference's l = 0 branch is tested the same way in test_flash_reference.py."""
    q, k, v, _ = dead_row_inputs(device)
    o, lse = fa._forward(q, k, v, causal, 0.25, "ieee")
    assert not o.isnan().any() and not lse.isnan().any()
    assert torch.equal(o[:, :, DEAD], torch.zeros_like(o[:, :, DEAD]))
    assert torch.equal(lse[:, :, DEAD], torch.full_like(lse[:, :, DEAD], math.inf))
    live = [t for t in range(T_DEAD) if t not in DEAD]
    truth = sdpa(q.nan_to_num(neginf=0.0), k, v, causal)  # the live rows do not depend on the others
    assert max_err(o[:, :, live], truth[:, :, live]) < 1e-5
    assert torch.equal(flash(q, k, v, causal=causal), o)  # the public op returns the same O


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [True, False])
def test_rows_saved_with_infinite_lse_get_no_gradient(device, causal):
    """Backward, l = 0 branch: a row saved with O = 0, LSE = +inf has P = exp(S - LSE) = 0 everywhere, so
    it adds nothing to dK, dV and gets dQ = 0 whatever its dO. The truth is SDPA's gradient with that row's
    dO set to 0 (the row then contributes nothing either). Called on the internal ``_backward`` with finite
    q, k, v: through the -inf queries above dK would be 0 * -inf."""
    q, k, v, do = make_inputs(1, 4, 2, T_DEAD, 16, torch.float32, device, seed=5)
    scale = 1 / math.sqrt(16)
    o, lse = fa._forward(q, k, v, causal, scale, "ieee")
    o[:, :, DEAD], lse[:, :, DEAD] = 0.0, math.inf
    do_live = do.clone()
    do_live[:, :, DEAD] = 0.0
    _, *truth = with_grads(sdpa, q, k, v, do_live, causal)
    grads = fa._backward(q, k, v, o, lse, do, causal, scale, "ieee")
    for name, g, t in zip(["dQ", "dK", "dV"], grads, truth):
        assert not g.isnan().any() and max_err(g, t) < 1e-5, name
    assert torch.equal(grads[0][:, :, DEAD], torch.zeros_like(grads[0][:, :, DEAD]))


# Gradients at T <= 32: every dtype x causal x group, with (T, D) covering tails, a single token and D sizes.
GRAD_GRID = [
    (T, D, group, causal, dt)
    for (T, D), group, causal, dt in itertools.product(
        [(1, 16), (17, 128), (32, 64)], [1, 4], [True, False], DTYPES
    )
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,D,group,causal,dtype_name", GRAD_GRID)
def test_gradients_match_sdpa(device, T, D, group, causal, dtype_name, kernel_launches):
    dtype = DTYPES[dtype_name]
    q, k, v, do = make_inputs(2, max(2, group), group, T, D, dtype, device, seed=1)  # B*H = 4 or 8
    got = with_grads(flash, q, k, v, do, causal)
    assert kernel_launches["attn_bwd_dkdv_kernel"] == kernel_launches["attn_bwd_dq_kernel"] == 1
    ref = with_grads(sdpa, q.float(), k.float(), v.float(), do.float(), causal)
    same_dtype_torch = with_grads(sdpa, q, k, v, do, causal) if dtype != torch.float32 else ref
    for name, g, r, t in zip(["O", "dQ", "dK", "dV"], got, ref, same_dtype_torch):
        assert g.dtype == dtype and g.shape == r.shape and torch.isfinite(g).all(), name
        assert max_err(g, r) <= tolerance(dtype, max_err(t, r)), name


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic_with_gqa(device):
    """dK/dV are owned by one program per key tile (no atomics): two runs give identical bits."""
    q, k, v, do = make_inputs(1, 8, 4, 40, 16, torch.float32, device, seed=2)
    first = with_grads(flash, q, k, v, do, True)
    second = with_grads(flash, q, k, v, do, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_and_custom_scale(device):
    """Views from a (B, T, H, D) projection work without copies; softmax_scale is honoured."""
    x = torch.randn(2, 24, 3, 4, 32, generator=torch.Generator().manual_seed(3)).to(device)  # (B, T, 3, H, D)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), non-contiguous
    o = flash(q, k, v, causal=True, softmax_scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert max_err(o, ref) < 1e-4


def test_unsupported_head_dim_is_a_clear_error():
    q = torch.randn(1, 2, 8, 48)
    with pytest.raises(ConfigError, match="head_dim"):
        flash_attention(q, q, q)


def test_unknown_input_precision_is_a_clear_error():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="input_precision"):
        flash_attention(q, q, q, input_precision="bf16x3")


def test_not_available_on_cpu_so_models_use_sdpa():
    ok, reason = flash_available(torch.device("cpu"))
    assert ok is False and "CUDA" in reason


class FakeKernel:
    """Stands in for a compiled kernel: ``kernel[grid](...)`` records its tiles; ``too_big`` tiles raise
    Triton's OutOfResources, as a configuration that does not fit the GPU's shared memory does at load."""

    def __init__(self, too_big: set[int]):
        self.too_big, self.runs = too_big, []

    def __getitem__(self, grid):
        def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, **meta):
            from triton.runtime.errors import OutOfResources

            if BLOCK_M in self.too_big:
                raise OutOfResources(300_000, 232_448, "shared memory")
            self.runs.append((grid, BLOCK_M, BLOCK_N, num_warps, num_stages))

        return run


def test_fixed_tiles_take_the_first_configuration_that_fits(monkeypatch):
    """SCRATCHLM_FLASH_TILES=fixed (the GPU tests' mode), exercised on the CPU with a stand-in kernel."""
    kernel = FakeKernel(too_big={128})
    monkeypatch.setattr(fa, "_kernels", lambda: types.SimpleNamespace(INTERPRETED=False, k=kernel))
    monkeypatch.setattr(fa, "_fixed_choice", {})
    monkeypatch.setenv("SCRATCHLM_FLASH_TILES", "fixed")
    configs = [(128, 64, 4, 3), (64, 64, 4, 3), (32, 32, 4, 2)]
    x = torch.zeros(1)
    for _ in range(2):
        fa._launch("k", "fwd", configs, lambda bm, bn: (bm, bn), x, GROUP=1)
    assert kernel.runs == [((64, 64), 64, 64, 4, 3)] * 2  # (128, ...) failed once, then was remembered
    kernel.too_big = {128, 64, 32}
    with pytest.raises(Exception, match="out of resource"):
        fa._launch("k", "fwd", configs, lambda bm, bn: (bm, bn), x, GROUP=2)
    monkeypatch.setenv("SCRATCHLM_FLASH_TILES", "fastest")
    with pytest.raises(ValueError, match="SCRATCHLM_FLASH_TILES"):
        fa._launch("k", "fwd", configs, lambda bm, bn: (bm, bn), x, GROUP=1)
