"""Optimizers and schedules: closed forms, torch's reference scheduler, parameter grouping, loss goes down."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.config import ModelConfig, TrainConfig
from scratchlm.model import build_model
from scratchlm.train.optim import build_optimizers, lr_at, param_groups, schedule_lr, set_lr


def tiny_gpt(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, context_length=32, n_layer=2, n_head=2, d_model=32)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg))


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear(schedule):
    for s in range(10):
        assert schedule_lr(
            s, schedule=schedule, lr=1.0, min_lr=0.1, max_steps=100, warmup_steps=10
        ) == pytest.approx((s + 1) / 10)


def test_cosine_closed_form_and_torch_reference():
    lr, min_lr, W, N = 3e-3, 3e-4, 10, 110
    assert schedule_lr(
        W, schedule="cosine", lr=lr, min_lr=min_lr, max_steps=N, warmup_steps=W
    ) == pytest.approx(lr)
    mid = schedule_lr(W + (N - W) // 2, schedule="cosine", lr=lr, min_lr=min_lr, max_steps=N, warmup_steps=W)
    assert mid == pytest.approx((lr + min_lr) / 2)
    assert schedule_lr(
        N, schedule="cosine", lr=lr, min_lr=min_lr, max_steps=N, warmup_steps=W
    ) == pytest.approx(min_lr)
    assert schedule_lr(
        N + 50, schedule="cosine", lr=lr, min_lr=min_lr, max_steps=N, warmup_steps=W
    ) == pytest.approx(min_lr)
    # torch's CosineAnnealingLR (closed form eta_min + (base - eta_min)(1 + cos(pi t / T_max)) / 2) after warmup
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=N - W, eta_min=min_lr)
    for t in range(N - W):
        ours = schedule_lr(W + t, schedule="cosine", lr=lr, min_lr=min_lr, max_steps=N, warmup_steps=W)
        assert ours == pytest.approx(ref.get_last_lr()[0], rel=1e-9)
        opt.step()
        ref.step()


def test_wsd_and_constant():
    kw = dict(lr=1.0, min_lr=0.0, max_steps=100, warmup_steps=10, decay_fraction=0.2)
    assert [schedule_lr(s, schedule="wsd", **kw) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    for s in range(80, 101):
        assert schedule_lr(s, schedule="wsd", **kw) == pytest.approx(1.0 - (s - 80) / 20)
    assert schedule_lr(500, schedule="constant", **kw) == 1.0


def test_set_lr_scales_every_group():
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, warmup_steps=4, max_steps=20)
    opts = build_optimizers(tiny_gpt(), cfg)
    lr = set_lr(opts, 1, cfg)
    assert lr == pytest.approx(lr_at(1, cfg)) == pytest.approx(0.5e-3)
    muon, adamw = opts
    assert isinstance(muon, torch.optim.Optimizer) and isinstance(adamw, torch.optim.AdamW)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(g["lr"] == pytest.approx(0.5e-3) for g in adamw.param_groups)


def test_param_groups_decay_only_matrices_and_muon_only_hidden():
    model = tiny_gpt(tie_embeddings=False)
    names = {id(p): n for n, p in model.named_parameters()}
    g = param_groups(model, "adamw")
    assert all(p.ndim >= 2 for p in g["decay"]) and all(p.ndim < 2 for p in g["no_decay"])
    assert not g["muon"]
    g = param_groups(model, "muon")
    muon_names = {names[id(p)] for p in g["muon"]}
    assert muon_names and all(p.ndim == 2 for p in g["muon"])
    assert not any(k in n for n in muon_names for k in ("wte", "wpe", "lm_head"))
    rest = {names[id(p)] for p in g["decay"]}
    assert {"wte.weight", "lm_head.weight"} <= rest
    # every trainable parameter is in exactly one group
    total = sum(len(v) for v in g.values())
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_reduces_loss_on_builtin_corpus(optimizer):
    from scratchlm.corpus import builtin_corpus

    corpus = builtin_corpus(0.1)
    text = "".join(d for _, d in zip(range(20), corpus.train.documents()))[:200_000]
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    model = tiny_gpt()
    cfg = TrainConfig(optimizer=optimizer, lr=3e-3, muon_lr=0.02, warmup_steps=5, max_steps=60)
    opts = build_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(0)

    def batch():
        ix = torch.randint(len(data) - 33, (8,), generator=gen)
        x = torch.stack([data[i : i + 32] for i in ix])
        y = torch.stack([data[i + 1 : i + 33] for i in ix])
        return x, y

    losses = []
    for step in range(cfg.max_steps):
        set_lr(opts, step, cfg)
        _, loss = model(*batch())
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isclose(first, math.log(256), rel_tol=0.1)  # starts near uniform
    assert last < first - 1.5, (optimizer, first, last)


def test_time_clock_follows_elapsed_fraction():
    cfg = TrainConfig(
        schedule="cosine",
        schedule_clock="time",
        max_time=100.0,
        max_steps=1000,
        warmup_steps=10,
        lr=1.0,
        min_lr=0.0,
    )
    assert lr_at(5, cfg, elapsed=1.0) == pytest.approx(0.6)  # warmup still counts steps
    assert lr_at(20, cfg, elapsed=50.0) == pytest.approx(0.5)  # half the time = half the cosine
    assert lr_at(30, cfg, elapsed=100.0) == pytest.approx(0.0)
    assert lr_at(30, cfg, elapsed=500.0) == pytest.approx(0.0)
