"""The chunked output-layer cross-entropy (model/loss.py) equals F.cross_entropy on the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.model import build_model
from scratchlm.model.loss import chunked_cross_entropy


def full_loss(h, w, y, smoothing=0.0):
    return F.cross_entropy((h @ w.t()).float().flatten(0, -2), y.flatten(), label_smoothing=smoothing)


def grads(fn, h, w, y, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [1, 7, 24, 1000])  # one row, a ragged last chunk, exact, one chunk
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_equals_full_forward_and_gradients(chunk_rows, smoothing):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 12, 16, generator=g, dtype=torch.float64)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (2, 12), generator=g)
    y[0, :5] = -100  # ignored positions (padding)
    ref = grads(full_loss, h, w, y, smoothing=smoothing)
    ours = grads(
        lambda h, w, y, smoothing: chunked_cross_entropy(h, w, y, chunk_rows, label_smoothing=smoothing),
        h,
        w,
        y,
        smoothing=smoothing,
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-7)


def test_upstream_gradient_scales_the_result_and_bf16_autocast_matches_the_plain_path():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g) * 0.2
    y = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = grads(lambda h, w, y: 3.0 * full_loss(h, w, y), h, w, y)
        ours = grads(lambda h, w, y: 3.0 * chunked_cross_entropy(h, w, y, 16), h, w, y)
    assert ours[1].dtype == h.dtype and ours[2].dtype == w.dtype
    for a, b in zip(ours, ref):  # same bf16 matmuls, summed in another order: bf16-level agreement
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_all_targets_ignored_gives_zero_and_bad_chunk_size_is_refused():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    loss = chunked_cross_entropy(h, w, torch.full((4,), -100), 2)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), 0)


@pytest.mark.parametrize("tied", [True, False])
def test_gpt_with_loss_chunks_trains_the_same(tied):
    """model.loss_chunk_rows: same loss and parameter gradients, no logits in training; eval unchanged."""
    cfg = ModelConfig(
        vocab_size=97, context_length=16, n_layer=2, n_head=2, d_model=32, tie_embeddings=tied,
        label_smoothing=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    results = []
    for rows in (0, 10):
        model.loss_chunk_rows = rows
        model.zero_grad(set_to_none=True)
        logits, loss = model(x, y)
        loss.backward()
        assert (logits is None) == (rows > 0)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    logits, loss = model(x, y)
    assert logits.shape == (3, 16, 97)


@pytest.mark.slow
def test_chunked_loss_and_activation_checkpointing_compile_fullgraph():
    """torch.compile traces both (no graph break): the same loss and gradients as eager."""
    from scratchlm.train.memory import apply_activation_checkpointing

    cfg = ModelConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.loss_chunk_rows = 10
    apply_activation_checkpointing(model)
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    eager = model(x, y)[1]
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, y)[1]
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
