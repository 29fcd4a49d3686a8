"""The course's get_batch draws the fast loader's batches; its checkpoint resumes training exactly and holds
what the fast trainer's checkpoint holds."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.data.loader import TokenLoader
from scratchlm.reference.checkpoint import load_checkpoint, save_checkpoint
from scratchlm.reference.data import get_batch
from scratchlm.reference.optim import AdamW
from scratchlm.reference.transformer import TransformerLM
from scratchlm.train.checkpoint import load_model_state, load_optimizer_file
from scratchlm.train.checkpoint import save_checkpoint as fast_save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import make_data  # noqa: E402


def test_get_batch_draws_the_fast_loaders_batches(tmp_path):
    data_dir = make_data(tmp_path, chars=20_000)
    seed, B, T = 5, 4, 16
    loader = TokenLoader(data_dir, "train", B, T, mode="random", seed=seed)
    assert len(loader.shards) == 1  # get_batch samples one array
    tokens = np.memmap(data_dir / loader.shards[0]["file"], dtype=loader.dtype, mode="r")
    for step in range(3):
        want_x, want_y = loader.next_batch()
        x, y = get_batch(tokens, B, T, "cpu", rng=np.random.default_rng([seed, 0, step]))
        assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_get_batch_windows():
    data = np.arange(100, 140)  # token i is 100 + i: a window's start is readable from its first token
    x, y = get_batch(data, 64, 8, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (64, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(x - x[:, :1], torch.arange(8).expand(64, 8))  # consecutive tokens
    starts = set((x[:, 0] - 100).tolist())
    assert min(starts) >= 0 and max(starts) <= 40 - 8 - 1  # every window has its T + 1 tokens
    assert 40 - 8 - 1 in set((get_batch(data, 2000, 8, rng=np.random.default_rng(1))[0][:, 0] - 100).tolist())
    with pytest.raises(ValueError, match="at least context_length"):
        get_batch(np.arange(8), 1, 8)


def _setup():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=31, n_layer=1, n_head=2, d_model=16, context_length=8, pos="rope", norm="rmsnorm"
    )
    model = TransformerLM(cfg)
    return model, AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _steps(model, opt, n: int) -> list[float]:
    losses = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, 31, (2, 9), generator=g)
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_checkpoint_resumes_exactly_and_matches_the_fast_checkpoint(tmp_path):
    model, opt = _setup()
    _steps(model, opt, 3)
    save_checkpoint(model, opt, 3, tmp_path / "ckpt.pt")
    fast_dir = fast_save_checkpoint(tmp_path / "run", 3, model, opt.state_dict(), {"step": 3}, keep_last=1)
    after = _steps(model, opt, 3)

    model2, opt2 = _setup()  # fresh weights and empty optimizer state
    assert load_checkpoint(tmp_path / "ckpt.pt", model2, opt2) == 3
    assert _steps(model2, opt2, 3) == after  # bit for bit

    # what the fast trainer's checkpoint directory holds for the same moment
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fast_weights = load_model_state(fast_dir)
    assert saved["model"].keys() == fast_weights.keys()
    for name, w in fast_weights.items():
        assert torch.equal(saved["model"][name], w), name
    fast_opt = load_optimizer_file(fast_dir)
    assert len(fast_opt["state"]) == len(list(model.parameters()))
    for pid, state in fast_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(saved["optimizer"]["state"][pid][key]), torch.as_tensor(value))


class NotATensor:
    pass


def test_load_checkpoint_refuses_pickled_objects_and_foreign_files(tmp_path):
    model, opt = _setup()
    evil = tmp_path / "evil.pt"
    torch.save({"model": NotATensor(), "optimizer": {}, "iteration": 0}, evil)
    with pytest.raises(ValueError, match="not a tensors-only checkpoint"):
        load_checkpoint(evil, model, opt)
    other = io.BytesIO()
    torch.save({"weights": torch.zeros(1)}, other)
    other.seek(0)
    with pytest.raises(ValueError, match="needs model, optimizer, iteration"):
        load_checkpoint(other, model, opt)
