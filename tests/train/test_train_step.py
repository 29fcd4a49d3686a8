"""The step's speed changes are exact: prefetched batches, activation checkpointing, the chunked loss."""

from __future__ import annotations

import pytest
import torch
from train_helpers import ByteTokenizer, make_data, tiny_config

import scratchlm.train.trainer as trainer
from scratchlm.config import ModelConfig
from scratchlm.data.loader import TokenLoader
from scratchlm.model import build_model
from scratchlm.train.checkpoint import find_checkpoint, load_model_state
from scratchlm.train.memory import apply_activation_checkpointing, checkpointed_blocks
from scratchlm.train.step import Prefetcher


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), chars=20_000)


def loader(data_dir, mode="random"):
    return TokenLoader(data_dir, batch_size=3, context_length=16, mode=mode, seed=5)


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_prefetched_batches_equal_unprefetched_in_order_and_resume_where_consumed(data_dir, mode):
    plain = loader(data_dir, mode)
    expected = [[plain.next_batch() for _ in range(2)] for _ in range(6)]  # 6 steps of 2 micro-batches
    pre = Prefetcher(loader(data_dir, mode), per_step=2)
    got = []
    for step in range(6):
        got.append(pre.next_step())
        if step % 2 == 0:
            pre.fill()  # read ahead as the trainer does (the position saved must not move)
        assert pre.state_dict()["step"] == 2 * (step + 1)
    for a, b in zip(got, expected):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    state = pre.state_dict()  # after 6 steps, with step 7 already read ahead
    resumed = Prefetcher(loader(data_dir, mode), per_step=2)
    resumed.load_state_dict(state)
    nxt = [plain.next_batch() for _ in range(2)]
    for (xa, _), (xb, _) in zip(resumed.next_step(), nxt):
        assert torch.equal(xa, xb)


def grads_of(model, *inputs):
    torch.manual_seed(123)  # the same dropout masks for both runs
    model.zero_grad(set_to_none=True)
    loss = model(*inputs)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt", "llama", "seq2seq"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(arch):
    """Dropout on: the recomputation must replay the same masks (RNG state restored)."""
    common = dict(vocab_size=61, context_length=16, n_layer=2, n_head=2, d_model=32, dropout=0.2)
    if arch == "llama":
        common.update(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, n_kv_head=1)
    cfg = ModelConfig(arch="seq2seq" if arch == "seq2seq" else "gpt", **common)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    ids = lambda: torch.randint(0, 61, (3, 16), generator=g)
    inputs = (ids(), ids(), ids()) if arch == "seq2seq" else (ids(), ids())
    names = list(model.state_dict())
    loss_a, grads_a = grads_of(model, *inputs)
    n = apply_activation_checkpointing(model)
    assert n == len(checkpointed_blocks(model)) == (4 if arch == "seq2seq" else 2)
    assert list(model.state_dict()) == names  # parameter names unchanged (checkpoints interchangeable)
    loss_b, grads_b = grads_of(model, *inputs)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # evaluation runs the plain blocks
        model(*inputs)


def test_trainer_with_checkpointing_and_chunked_loss_ends_with_the_same_weights(
    tmp_path, data_dir, monkeypatch
):
    """The full loop (prefetching, one sync per step) with both memory savers on vs off, deterministic CPU."""
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)
    common = ["train.max_steps=6", "eval.interval=6", "train.ckpt_interval=6", "train.deterministic=true"]
    weights = []
    for name, extra in [
        ("plain", []),
        ("saver", ["train.activation_checkpointing=true", "train.loss_chunk_rows=48"]),
    ]:
        run_dir = tmp_path / name
        cfg = tiny_config(run_dir, data_dir, *common, *extra)
        summary = trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
        assert summary["step"] == 6
        weights.append(load_model_state(find_checkpoint(run_dir)))
    # Rounding differs between the chunked and the whole loss, and AdamW's normalised step turns a near-zero
    # gradient's rounding into up to ~2.5e-6 of weight after 6 steps on AVX-512/AMX CPUs. A real error moves
    # weights by the size of an update (lr 1e-3), two orders of magnitude above this tolerance.
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-5, atol=1e-5, msg=key)


def test_auto_micro_batch_picks_the_largest_divisor_that_fits(monkeypatch, capsys):
    """Steps of R rows per rank are split into micro-batches of the largest divisor of R that fits."""
    import dataclasses

    from scratchlm.config import load_config
    from scratchlm.errors import ConfigError
    from scratchlm.train import memory

    cfg = load_config(None, ["model.context_length=16", "model.vocab_size=64", "train.batch_size=24"])
    cuda = torch.device("cuda")
    tried = []
    monkeypatch.setattr(memory, "step_fits", lambda c, rows, d, t: tried.append(rows) or rows <= 10)
    out = memory.fit_micro_batch(cfg, cuda, torch.bfloat16)
    assert tried == [24, 12, 8] and out.train.batch_size == 8 and out.train.tokens_per_step == 24 * 16
    assert trainer.micro_steps(out) == 3 and "8 rows, 3 per step" in capsys.readouterr().out
    two_ranks = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tokens_per_step=2 * 6 * 16))
    tried.clear()
    monkeypatch.setattr(memory, "step_fits", lambda c, rows, d, t: tried.append(rows) or True)
    monkeypatch.setattr(memory.dist, "all_gather_objects", lambda b: [b, 3])  # the other rank fits 3 rows
    out = memory.fit_micro_batch(two_ranks, cuda, torch.bfloat16, world_size=2)
    assert tried == [6] and out.train.batch_size == 3 and trainer.micro_steps(out, 2) == 2
    assert memory.fit_micro_batch(cfg, torch.device("cpu"), torch.float32) is cfg  # CUDA only
    monkeypatch.setattr(memory, "step_fits", lambda c, rows, d, t: False)
    with pytest.raises(ConfigError, match="not even one row"):
        memory.fit_micro_batch(cfg, cuda, torch.bfloat16)


def test_step_fits_runs_a_real_step_and_reports_out_of_memory(monkeypatch):
    from scratchlm.config import load_config
    from scratchlm.train import memory, step

    cfg = load_config(
        None, ["model.context_length=8", "model.vocab_size=32", "model.n_layer=1", "model.d_model=16"]
    )
    cpu = torch.device("cpu")
    state = torch.random.get_rng_state()
    assert memory.step_fits(cfg, 2, cpu, torch.float32)
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves the seeds alone

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(step, "train_step", oom)
    assert not memory.step_fits(cfg, 2, cpu, torch.float32)
