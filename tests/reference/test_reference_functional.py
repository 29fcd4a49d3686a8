"""Each hand-written block equals torch and the fast path, in value and gradient (fp32, random shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.model import functional as fast
from scratchlm.model.layers import RotaryEmbedding
from scratchlm.reference import functional as ref

TOL = dict(atol=1e-6, rtol=1e-6)


def same(fn_a, fn_b, *inputs, tol=TOL, **kw):
    """fn_a and fn_b agree on the output and on the gradients of every floating input."""
    xs_a = [x.clone().requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x for x in inputs]
    xs_b = [x.clone().requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x for x in inputs]
    out_a, out_b = fn_a(*xs_a, **kw), fn_b(*xs_b, **kw)
    torch.testing.assert_close(out_a, out_b, **tol)
    upstream = torch.randn_like(out_a)
    (out_a * upstream).sum().backward()
    (out_b * upstream).sum().backward()
    for a, b in zip(xs_a, xs_b):
        if torch.is_tensor(a) and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_linear_and_embedding():
    x, w, b = torch.randn(3, 5, 7), torch.randn(11, 7), torch.randn(11)
    same(ref.linear, F.linear, x, w, b)
    same(ref.linear, F.linear, x, w)
    ids, table = torch.randint(0, 13, (4, 6)), torch.randn(13, 8)
    same(lambda i, t: ref.embedding(i, t), lambda i, t: F.embedding(i, t), ids, table)


@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_softmax_and_log_softmax(dim):
    x = torch.randn(4, 9, 6) * 5
    for fn in ("softmax", "log_softmax"):
        same(getattr(ref, fn), getattr(F, fn), x, dim=dim)
        same(getattr(ref, fn), getattr(fast, fn), x, dim=dim)


def test_softmax_is_stable_for_huge_logits():
    x = torch.tensor([[1000.0, 1001.0, -1000.0]])
    torch.testing.assert_close(ref.softmax(x), torch.softmax(x, -1))
    torch.testing.assert_close(ref.log_softmax(x), torch.log_softmax(x, -1))
    assert ref.softmax(x).isfinite().all()


def test_activations():
    x = torch.randn(5, 33)
    same(ref.relu, F.relu, x)
    same(ref.silu, F.silu, x)
    same(ref.gelu, F.gelu, x)
    same(ref.gelu, fast.gelu, x)
    same(ref.gelu_tanh, lambda t: F.gelu(t, approximate="tanh"), x)
    same(ref.gelu_tanh, fast.gelu_tanh, x)
    gate, up = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    same(ref.swiglu, fast.swiglu, gate, up)
    same(ref.swiglu, lambda g, u: F.silu(g) * u, gate, up)
    # exact and tanh GELU are different functions (up to ~5e-4 apart): the names must not be swapped
    assert (ref.gelu(x) - ref.gelu_tanh(x)).abs().max() > 1e-4


def test_activations_far_out_in_float64():
    """Over [-10, 10] fp32 rounding of 1 + tanh(z) (z << 0) reaches 2e-6 in the gradient; in float64 the
    hand-written formulas and torch's kernels agree to 1e-12: the same math."""
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    tight = dict(tol=dict(atol=1e-12, rtol=1e-12))
    same(ref.silu, F.silu, x, **tight)
    same(ref.gelu, F.gelu, x, **tight)
    same(ref.gelu_tanh, lambda t: F.gelu(t, approximate="tanh"), x, **tight)


def test_norms():
    x, w, b = torch.randn(3, 4, 24) * 2 + 1, torch.randn(24), torch.randn(24)
    same(ref.layer_norm, lambda *a: F.layer_norm(a[0], (24,), *a[1:]), x, w, b, 1e-5)
    same(ref.layer_norm, fast.layer_norm, x, w, b, 1e-5)
    same(ref.layer_norm, fast.layer_norm, x, None, None, 1e-5)
    same(ref.rms_norm, lambda x, w, eps: F.rms_norm(x, (24,), w, eps), x, w, 1e-6)
    same(ref.rms_norm, fast.rms_norm, x, w, 1e-6)
    xb = x.bfloat16()  # 16-bit: normalised in float32 on both paths
    torch.testing.assert_close(ref.rms_norm(xb, w.bfloat16(), 1e-6), fast.rms_norm(xb, w.bfloat16(), 1e-6))


def test_dropout_keeps_the_expectation():
    x = torch.ones(200_000)
    y = ref.dropout(x, 0.25)
    assert ((y == 0) | (y == 1 / 0.75)).all()
    assert abs((y == 0).float().mean().item() - 0.25) < 0.01 and abs(y.mean().item() - 1.0) < 0.01
    assert ref.dropout(x, 0.0) is x


@pytest.mark.parametrize("style", ["half", "interleaved"])
@pytest.mark.parametrize("B,H,T,D", [(2, 3, 5, 8), (1, 4, 4, 16), (3, 2, 7, 6)])
def test_rope_from_positions_equals_the_fast_tables(style, B, H, T, D):
    x = torch.randn(B, H, T, D)
    positions = torch.randint(0, 50, (B, T))
    tables = RotaryEmbedding(D, 500.0, style)(positions)
    same(lambda t: ref.rope(t, positions, 500.0, style), lambda t: fast.apply_rope(t, *tables, style), x)
    same(lambda t: ref.apply_rope(t, *tables, style), lambda t: fast.apply_rope(t, *tables, style), x)


def test_rope_against_the_paper_and_hf():
    """Interleaved: complex multiplication by e^{i pos w} (Su et al. eq. 34); half: HF's rotate_half."""
    D, T = 8, 6
    x, pos = torch.randn(1, 1, T, D), torch.arange(T)
    w = 10000.0 ** (-torch.arange(0, D, 2).double() / D)
    angles = pos.double()[:, None] * w  # (T, D/2)
    z = torch.view_as_complex(x.double().reshape(1, 1, T, D // 2, 2).contiguous())
    paper = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(ref.rope(x, pos, style="interleaved").double(), paper, **TOL)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rotate_half = torch.cat((-x[..., D // 2 :], x[..., : D // 2]), -1).double()
    torch.testing.assert_close(
        ref.rope(x, pos, style="half").double(), x.double() * cos + rotate_half * sin, **TOL
    )


def test_rope_relative_position_property():
    """<rope(q, m), rope(k, n)> depends on m - n only."""
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dots = [
        (ref.rope(q, torch.tensor([m])) * ref.rope(k, torch.tensor([m - 3]))).sum().item()
        for m in (3, 10, 40)
    ]
    assert max(dots) - min(dots) < 1e-5


def _sdpa_torch(q, k, v, mask=None, causal=False):
    """torch's own math: sdpa with GQA done by repeating the heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("kind", ["none", "causal", "padding", "cross"])
def test_attention(H, Hkv, kind):
    B, T, D = 2, 5, 8
    S = 7 if kind == "cross" else T
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    kw = {}
    if kind == "causal":
        kw = dict(causal=True)
    elif kind == "padding":  # causal and left padding, each row keeps at least one key
        keys = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
        kw = dict(
            mask=fast.causal_mask(T, T)[None, None] & keys[:, None, None, :] | torch.eye(T, dtype=torch.bool)
        )
    elif kind == "cross":  # a source padding mask (B, 1, 1, S)
        kw = dict(mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)[:, None, None, :])
    same(ref.scaled_dot_product_attention, fast.scaled_dot_product_attention, q, k, v, **kw)
    same(ref.scaled_dot_product_attention, _sdpa_torch, q, k, v, **kw)
    explicit = dict(kw, explicit=True)
    same(ref.scaled_dot_product_attention, fast.scaled_dot_product_attention, q, k, v, **explicit)


def test_attention_records_the_same_intermediates():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    rec_ref, rec_fast = {}, {}
    ref.scaled_dot_product_attention(q, k, v, causal=True, record=rec_ref)
    fast.scaled_dot_product_attention(q, k, v, causal=True, record=rec_fast)
    for key in ("scores", "probs"):
        torch.testing.assert_close(rec_ref[key], rec_fast[key], **TOL)
    assert torch.equal(rec_ref["mask"], rec_fast["mask"])
    torch.testing.assert_close(rec_ref["scores"][0, 0], (q[0, 0] @ k[0, 0].T) / math.sqrt(8), **TOL)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy(label_smoothing):
    logits, targets = torch.randn(12, 17) * 3, torch.randint(0, 17, (12,))
    targets[[1, 5, 6]] = -100
    kw = dict(ignore_index=-100, label_smoothing=label_smoothing)
    same(ref.cross_entropy, F.cross_entropy, logits, targets, **kw)
    same(ref.cross_entropy, fast.cross_entropy, logits, targets, **kw)
    targets[:] = -100
    assert ref.cross_entropy(logits, targets).isnan() and fast.cross_entropy(logits, targets).isnan()


def test_wrong_shapes_are_refused_not_broadcast():
    with pytest.raises(ValueError, match="cross_entropy"):
        fast.cross_entropy(torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="cross_entropy"):
        ref.cross_entropy(torch.randn(10, 7), torch.zeros(5, dtype=torch.long))
    q = torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match="mask"):  # a (T, S) float mask would be added, not masked
        fast.scaled_dot_product_attention(q, q, q, torch.zeros(5, 5))
    with pytest.raises(ValueError, match="mask"):
        fast.scaled_dot_product_attention(q, q, q, torch.ones(2, 1, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        ref.scaled_dot_product_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(ValueError, match="weight"):
        fast.layer_norm(q, torch.ones(4), None, 1e-5)
    with pytest.raises(ValueError, match="one shape"):
        ref.swiglu(torch.randn(3, 4), torch.randn(4))


def test_rope_refuses_tables_that_broadcast_over_heads():
    """n_head == T: (T, 1, D) tables from 1-D positions used to broadcast along heads, silently wrong."""
    D, T = 8, 4
    x = torch.randn(2, T, T, D)  # H == T
    rotary = RotaryEmbedding(D)
    cos, sin = rotary.cos_table[:T][:, None], rotary.sin_table[:T][:, None]  # (T, 1, D): the old bug's shape
    with pytest.raises(ValueError, match="RoPE tables"):
        fast.apply_rope(x, cos, sin, "half")
    one_d, two_d = rotary(torch.arange(T)), rotary(torch.arange(T)[None])  # 1-D positions now mean (1, T)
    for a, b in zip(one_d, two_d):
        assert torch.equal(a, b) and a.shape == (1, 1, T, D)
    expected = ref.rope(x, torch.arange(T))
    torch.testing.assert_close(fast.apply_rope(x, *one_d, "half"), expected, **TOL)
