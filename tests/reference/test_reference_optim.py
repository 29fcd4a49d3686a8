"""Hand-written AdamW, Muon, gradient clipping and schedules against torch.optim and scratchlm.train.optim."""

from __future__ import annotations

import pytest
import torch

from scratchlm.config import ModelConfig, TrainConfig
from scratchlm.model import build_model
from scratchlm.reference import optim as ref
from scratchlm.train.optim import build_optimizers, param_groups, schedule_lr, set_lr


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, context_length=16))


def _run(optimizer: str, steps: int) -> tuple[torch.nn.Module, list]:
    """``steps`` optimizer steps on seeded random gradients (the same for every optimizer), lr scheduled."""
    model = _model()
    tc = TrainConfig(
        optimizer=optimizer, lr=3e-3, min_lr=1e-4, muon_lr=0.02, max_steps=steps, warmup_steps=10
    )
    optimizers = build_optimizers(model, tc)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        set_lr(optimizers, step, tc)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * (0.01 + 0.1 * (step % 7 == 0))
        for opt in optimizers:
            opt.step()
    return model, optimizers


def test_adamw_matches_torch_after_200_steps():
    fast, fast_opts = _run("adamw", 200)
    slow, slow_opts = _run("adamw_reference", 200)
    assert isinstance(slow_opts[0], ref.AdamW) and isinstance(fast_opts[0], torch.optim.AdamW)
    assert [len(g["params"]) for g in slow_opts[0].param_groups] == [
        len(g["params"]) for g in fast_opts[0].param_groups
    ]
    for (name, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    # the same state layout: a checkpoint of one loads into the other
    slow_opts[0].load_state_dict(fast_opts[0].state_dict())


def _muon_steps(make_muon, steps: int = 30) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``steps`` Muon steps on the hidden matrices of a model, with seeded random gradients."""
    model = _model()
    matrices = param_groups(model, "muon")["muon"]
    opt = make_muon(matrices)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in matrices:
            p.grad = torch.randn(p.shape, generator=gen) * (0.01 + 0.1 * (step % 7 == 0))
        opt.step()
    return matrices, opt


def test_muon_matches_torch():
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    fast, fast_opt = _muon_steps(lambda ps: torch.optim.Muon(ps, **kw))
    slow, slow_opt = _muon_steps(lambda ps: ref.Muon(ps, **kw))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    slow_opt.load_state_dict(fast_opt.state_dict())


def test_cpu_muon_is_torch_muon_with_a_float32_newton_schulz():
    """On CPU ``train.optimizer=muon`` orthogonalises in float32 (torch's bf16 one is ~25x slower there):
    the weights stay within bf16 rounding of torch.optim.Muon's, and the two share their state layout."""
    fast, fast_opts = _run("muon", 30)
    assert isinstance(fast_opts[0], ref.Muon) and fast_opts[0].ns_dtype == torch.float32
    kw = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
    ours, ours_opt = _muon_steps(lambda ps: ref.Muon(ps, **kw, ns_dtype=torch.float32))
    torchs, torch_opt = _muon_steps(lambda ps: torch.optim.Muon(ps, **kw))
    for a, b in zip(torchs, ours):
        assert not torch.equal(a, b)  # a different precision: not the same numbers...
        torch.testing.assert_close(b, a, atol=2e-3, rtol=0)  # ...but the same update
    ours_opt.load_state_dict(torch_opt.state_dict())


def test_newton_schulz_orthogonalises():
    G = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    O = ref.newton_schulz(G, steps=5, dtype=torch.float32)
    s = torch.linalg.svdvals(O)
    assert O.shape == G.shape and s.min() > 0.5 and s.max() < 1.5  # ~ U V^T: singular values near 1
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.nn.functional.cosine_similarity(O.flatten(), (U @ Vh).flatten(), dim=0) > 0.95


@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn(5, 3)
        pb.grad = pa.grad.clone()
    norm = ref.clip_grad_norm(a, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(b, max_norm)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-7, rtol=1e-6)


def test_schedules_equal_the_training_schedules():
    kw = dict(lr=1e-3, min_lr=1e-5, warmup_steps=20, max_steps=200)
    for s in range(0, 230):
        assert ref.cosine_schedule(s, **kw) == pytest.approx(
            schedule_lr(s, schedule="cosine", **kw), abs=1e-15
        )
        assert ref.wsd_schedule(s, decay_fraction=0.3, **kw) == pytest.approx(
            schedule_lr(s, schedule="wsd", decay_fraction=0.3, **kw), abs=1e-15
        )
        assert ref.constant_schedule(s, lr=kw["lr"], warmup_steps=20) == schedule_lr(
            s, schedule="constant", **kw
        )
    assert ref.cosine_schedule(0, **kw) == pytest.approx(1e-3 / 20)
    assert ref.cosine_schedule(200, **kw) == pytest.approx(1e-5)
