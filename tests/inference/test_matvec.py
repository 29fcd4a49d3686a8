"""Decoding's multiply-and-sum products (inference/matvec.py) against torch's Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.inference import matvec as mv
from scratchlm.inference.quantize import Int8Linear
from scratchlm.model import build_model


@pytest.fixture
def compiling(monkeypatch):
    """Run a layer's forward as it is traced inside torch.compile (without the compiler's seconds)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def test_matvec_is_the_linear_product():
    torch.manual_seed(0)
    w, x = torch.randn(40, 96), torch.randn(3, 1, 96)
    torch.testing.assert_close(mv.matvec(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    q = torch.randint(-127, 128, (40, 96), dtype=torch.int8)  # promoted to x's dtype in the product
    torch.testing.assert_close(mv.matvec(x, q), F.linear(x, q.float()), atol=1e-3, rtol=1e-5)


def test_the_form_is_taken_only_when_compiling_and_for_few_rows(monkeypatch):
    x4, x5 = torch.randn(4, 1, 8), torch.randn(5, 8)
    assert not mv.use_matvec(x4)  # eager: it would build the (M, N, K) temporary
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert mv.use_matvec(x4) and not mv.use_matvec(x5)  # MAX_ROWS = 4: more rows go to the GEMM


def test_matvec_linears_keep_the_model_and_compute_its_products(compiling):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=1, d_model=32, n_head=4, context_length=16, bias=True)
    model = build_model(cfg).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[3, 9, 1]])
    with torch.no_grad():
        want, _ = model(ids)  # plain nn.Linear
        mv.use_matvec_linears(model)
        got, _ = model(ids)  # B*T = 3 rows <= MAX_ROWS: every product is a multiply-and-sum
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is mv.MatVecLinear for m in linears)
    assert model.lm_head.weight is model.wte.weight  # the tied head is still the embedding
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_matvec_linear_adds_its_bias_and_leaves_many_rows_to_the_gemm(compiling):
    torch.manual_seed(0)
    linear = nn.Linear(24, 10)
    ref = nn.Linear(24, 10)
    ref.load_state_dict(linear.state_dict())
    mv.use_matvec_linears(linear)
    for rows in (1, 4, 7):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(linear(x), ref(x), atol=1e-5, rtol=1e-5)


def test_compiled_int8_product_has_only_the_weights_rounding(compiling):
    """Under compile, Int8Linear multiplies float32 activations by its int8 weights: exactly x Q^T s + b,
    without the eager kernel's bfloat16 rounding of the activations."""
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(96, 40))
    x = torch.randn(2, 1, 96)
    want = x @ q.dequantized().T + q.bias
    torch.testing.assert_close(q(x), want.detach(), atol=1e-4, rtol=1e-5)
