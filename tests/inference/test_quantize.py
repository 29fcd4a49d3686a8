"""int8 weight-only quantization (inference/quantize.py) against float32 matmuls and the float32 model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.inference.engine import Engine
from scratchlm.inference.quantize import Int8Linear, quantize_int8
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator


def test_int8_linear_computes_x_times_its_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (40, 96) and int(q.weight.abs().max()) == 127
    # rounding: each weight within half a step of the original
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized() - linear.weight).abs() <= 0.5001 * step).all()
    x = torch.randn(3, 5, 96)
    want = (x @ q.dequantized().T + linear.bias).detach()  # (3, 5, 40)
    got = q(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.float32
    # the kernel rounds activations and outputs to bfloat16 (8 bits of mantissa): ~2^-8 of the magnitude
    torch.testing.assert_close(got, want, atol=0.02 * float(want.abs().max()), rtol=0.02)


def test_quantized_model_keeps_its_logits_and_greedy_tokens():
    torch.manual_seed(0)
    tok = train_bpe_from_iterator(
        ["the quick brown fox jumps over the lazy dog. "] * 20, vocab_size=300, progress=False
    )
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        n_layer=2,
        d_model=64,
        n_head=4,
        context_length=64,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        bias=False,
        tie_embeddings=True,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    with torch.inference_mode():
        ref, _ = model(ids)
        quantize_int8(model)
        got, _ = model(ids)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [] and isinstance(model.lm_head, Int8Linear)  # every matmul, the tied head too
    assert model.wte.weight.dtype == torch.float32  # the embedding lookup stays float32
    # per-row int8 weights (~0.8% rounding noise) and bfloat16 activations (~0.4%) through every layer
    err = (got - ref).abs() / ref.std()
    assert float(err.mean()) < 0.03 and float(err.max()) < 0.25, (float(err.mean()), float(err.max()))
    # the greedy token cannot change where float32's top two logits are further apart than twice the error
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * float((got - ref).abs().max())
    assert clear.sum() >= 3 and (got.argmax(-1) == ref.argmax(-1))[clear].all()
    out = Engine(model, tok).generate("the quick", max_new_tokens=8, temperature=0, stop_token_ids=[])[0]
    assert out.new_tokens == 8


def test_int8_refuses_a_model_it_cannot_serve():
    model = build_model(ModelConfig(vocab_size=300, n_layer=1, d_model=32, n_head=4, context_length=16))
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        quantize_int8(model.to(torch.bfloat16))
