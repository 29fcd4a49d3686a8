"""End to end on a GPU: a tiny GPT trained a few steps with attention=flash_triton tracks the sdpa one.

The test proves the Triton kernels ran (it counts their launches: the model would otherwise fall back to
SDPA with a once-per-process warning and the comparison would be sdpa against itself), and runs with fp32
matmuls without TF32, restoring the global flag afterwards. Tiles are fixed (conftest.py).
"""

from __future__ import annotations

import collections

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

N_LAYER, STEPS = 2, 5


def _train(attention: str, steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of a tiny GQA + RoPE GPT trained in fp32 with AdamW on random tokens."""
    from scratchlm.config import ModelConfig
    from scratchlm.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=96,
        context_length=64,
        n_layer=N_LAYER,
        n_head=4,
        n_kv_head=2,
        d_model=128,
        pos="rope",
        norm="rmsnorm",
        mlp="swiglu",
        attention=attention,
    )
    model = build_model(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 96, (4, 65), generator=g).cuda()
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def no_tf32():
    """fp32 matmuls without TF32 for the test; the global flag is put back afterwards."""
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32


def test_flash_triton_training_matches_sdpa(monkeypatch, no_tf32):
    from scratchlm.model.kernels import flash_attention as fa

    ok, reason = fa.flash_available(torch.device("cuda"))
    if not ok:
        pytest.skip(reason)
    launches: collections.Counter = collections.Counter()
    launch = fa._launch

    def counting_launch(name, *args, **kwargs):
        launches[name] += 1
        return launch(name, *args, **kwargs)

    monkeypatch.setattr(fa, "_launch", counting_launch)
    flash_losses, flash_weights = _train("flash_triton")
    # Every layer's attention ran the kernels on every step: forward, and the dK/dV and dQ passes.
    expected = N_LAYER * STEPS
    assert launches == {
        "attn_fwd_kernel": expected,
        "attn_bwd_dkdv_kernel": expected,
        "attn_bwd_dq_kernel": expected,
    }
    sdpa_losses, sdpa_weights = _train("sdpa")
    assert launches["attn_fwd_kernel"] == expected  # the sdpa model did not touch them
    assert flash_losses == pytest.approx(sdpa_losses, rel=1e-4, abs=1e-5)
    for name, w in flash_weights.items():
        assert torch.allclose(w, sdpa_weights[name], rtol=1e-3, atol=1e-5), name
