"""End to end on a GPU: a tiny GPT trained a few steps with attention=flash_triton tracks the sdpa one."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _train(attention: str, steps: int = 5) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of a tiny GQA + RoPE GPT trained in fp32 with AdamW on random tokens."""
    from scratchlm.config import ModelConfig
    from scratchlm.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=96,
        context_length=64,
        n_layer=2,
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


def test_flash_triton_training_matches_sdpa():
    from scratchlm.model.kernels.flash_attention import flash_available

    ok, reason = flash_available(torch.device("cuda"))
    if not ok:
        pytest.skip(reason)
    torch.backends.cuda.matmul.allow_tf32 = False
    flash_losses, flash_weights = _train("flash_triton")
    sdpa_losses, sdpa_weights = _train("sdpa")
    assert flash_losses == pytest.approx(sdpa_losses, rel=1e-4, abs=1e-5)
    for name, w in flash_weights.items():
        assert torch.allclose(w, sdpa_weights[name], rtol=1e-3, atol=1e-5), name
