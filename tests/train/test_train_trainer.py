"""The training loop in-process: accumulation, NaN handling, signals, early stopping, resume fallbacks."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import warnings

import pytest
import torch
from train_helpers import ByteTokenizer, make_data, tiny_config

import scratchlm.train.step as step_module
import scratchlm.train.trainer as trainer
from scratchlm.config import ModelConfig, TrainConfig, load_config
from scratchlm.errors import CheckpointError, ConfigError, TrainingError
from scratchlm.model import build_model
from scratchlm.train.checkpoint import find_checkpoint, load_model_state, read_state
from scratchlm.train.metrics import read_metrics
from scratchlm.train.optim import build_optimizers


@pytest.fixture(autouse=True)
def _no_plots(request, monkeypatch):
    """matplotlib costs ~1 s per run; only the tests about plots draw them."""
    if "plot" not in request.node.name and "end_to_end" not in request.node.name:
        monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def train(tmp_path, data_dir, *overrides, name="run"):
    run_dir = tmp_path / name
    cfg = tiny_config(run_dir, data_dir, *overrides)
    return trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir), run_dir


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_accumulating_k_micro_batches_equals_one_big_batch(optimizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32)
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    tc = TrainConfig(optimizer=optimizer, lr=1e-2, warmup_steps=0, grad_clip=0.5)
    opt_a, opt_b = build_optimizers(a, tc), build_optimizers(b, tc)
    x = torch.randint(0, 64, (8, 17))
    big = [(x[:, :-1], x[:, 1:])]
    micro = [(x[i : i + 2, :-1], x[i : i + 2, 1:]) for i in range(0, 8, 2)]  # k=4 micro-batches of b=2
    kw = dict(grad_clip=0.5, device=torch.device("cpu"), dtype=torch.float32)
    loss_a, norm_a = trainer.train_step(a, a, opt_a, big, **kw)
    loss_b, norm_b = trainer.train_step(b, b, opt_b, micro, **kw)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4)
    assert norm_a > 0.5  # clipping was active, and the pre-clip norm is what we report
    moved = 0
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        # Muon orthogonalises in bf16 (torch's Newton-Schulz), so its update carries bf16 rounding (~4e-3)
        atol = 1e-5 if optimizer == "adamw" else 1e-2 * tc.muon_lr
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=atol, msg=n)
        moved += 1
    assert moved and all(p.grad is None for p in a.parameters())


def test_end_to_end_outputs_and_accumulation_tokens(tmp_path, data_dir):
    result, run_dir = train(tmp_path, data_dir, "train.tokens_per_step=256")  # 2 micro-batches of 4x32
    assert result["stopped_reason"] == "max_steps" and result["step"] == 12
    assert result["tokens"] == 12 * 256
    records = read_metrics(run_dir)
    train_recs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert all(math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in train_recs)
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert (run_dir / "samples.txt").read_text().count("=== step") == 1  # at the end only (the default)
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == [
        "loss.png",
        "lr.png",
        "perplexity.png",
        "throughput.png",
    ]
    assert evals[-1]["train_ppl"] == pytest.approx(math.exp(evals[-1]["train_loss"]))
    assert read_state(find_checkpoint(run_dir, "best"))["step"] == 12
    state = read_state(find_checkpoint(run_dir))
    assert state["train_state"]["step"] == 12 and "torch" in state["rng"] and state["versions"]["torch"]


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path, data_dir, monkeypatch):
    calls = {"n": 0}
    real = step_module.batch_loss

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] >= 7 else loss

    monkeypatch.setattr(step_module, "batch_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss nan at step 7.*step_00000006"):
        train(tmp_path, data_dir)
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt.name == "step_00000006"  # the best-val checkpoint of the eval at step 6
    assert all(torch.isfinite(t).all() for t in load_model_state(ckpt).values())


def test_nan_skips_are_bounded(tmp_path, data_dir, monkeypatch):
    calls = {"n": 0}
    real = step_module.batch_loss

    def poisoned(model, batch):
        calls["n"] += 1
        loss = real(model, batch)
        return loss * float("inf") if calls["n"] in (3, 5) else loss

    monkeypatch.setattr(step_module, "batch_loss", poisoned)
    result, run_dir = train(tmp_path, data_dir, "train.max_nan_skips=2")
    assert result["step"] == 12 and calls["n"] == 14
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train")
    calls["n"] = 0
    with pytest.raises(TrainingError, match="max_nan_skips"):
        train(tmp_path, data_dir, "train.max_nan_skips=1", name="run2")


def test_sigint_finishes_step_checkpoints_and_restores_handler(tmp_path, data_dir, monkeypatch):
    real, calls = trainer.train_step, {"n": 0}
    before = signal.getsignal(signal.SIGINT)

    def step_then_signal(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    result, run_dir = train(tmp_path, data_dir)
    assert result["stopped_reason"] == "interrupted" and result["step"] == 5
    assert find_checkpoint(run_dir).name == "step_00000005"
    assert signal.getsignal(signal.SIGINT) is before


def test_second_sigint_exits_at_once(tmp_path, data_dir, monkeypatch):
    real, calls = trainer.train_step, {"n": 0}

    def step_then_two_signals(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_step", step_then_two_signals)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, data_dir)
    assert find_checkpoint(tmp_path / "run").name == "step_00000004"  # the earlier one, intact


def test_early_stopping_with_patience(tmp_path, data_dir, monkeypatch, capsys):
    losses = iter([3.0, 3.5, 3.6, 3.7, 3.8, 3.9])
    from scratchlm.train import validation

    monkeypatch.setattr(validation, "evaluate_metrics", lambda *a, **k: {"val_loss": next(losses)})
    result, run_dir = train(
        tmp_path, data_dir, "eval.interval=2", "train.early_stopping_patience=2", "train.max_steps=50"
    )
    assert result["stopped_reason"] == "early_stopping" and result["step"] == 6
    detail = "early stopping at step 6 after 2 evaluations without improvement (best val loss 3.0000)"
    assert result["stop_detail"] == detail
    assert read_metrics(run_dir)[-1] == {
        "kind": "stop",
        "step": 6,
        "reason": "early_stopping",
        "detail": detail,
    }
    assert result["best_val_loss"] == 3.0
    assert read_state(find_checkpoint(run_dir, "best"))["step"] == 2


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, data_dir):
    _, run_dir = train(tmp_path, data_dir, "train.keep_last=3")
    newest = find_checkpoint(run_dir)
    assert newest.name == "step_00000012"
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match="model.safetensors"):
        result, _ = train(tmp_path, data_dir, "train.keep_last=3", "train.max_steps=16")
    assert result["step"] == 16
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # steps 9..12 re-run after the fallback to step 8, not duplicated


def test_run_with_only_corrupt_checkpoints_never_restarts_from_scratch(tmp_path, data_dir):
    _, run_dir = train(tmp_path, data_dir, "train.keep_last=1")
    (find_checkpoint(run_dir) / "state.json").write_text('{"step": 12')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="state.json"):
            train(tmp_path, data_dir, "train.max_steps=16")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=-1", "train.lr"),
        ("train.optimizer=sgd", "train.optimizer"),
        ("train.schedule=linear", "train.schedule"),
        ("train.tokens_per_step=100", "train.tokens_per_step"),
        ("train.keep_last=0", "train.keep_last"),
        ("train.max_time=0", "train.max_time"),
        ("train.decay_fraction=1.5", "train.decay_fraction"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.max_steps=ten", "train.max_steps"),
        ("train.resume=sometimes", "train.resume"),
    ],
)
def test_bad_train_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_dry_run_writes_nothing(tmp_path, data_dir, monkeypatch):
    from scratchlm.train.dryrun import dry_run

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path / "run", data_dir, "train.tokens_per_step=256", "train.optimizer=muon")
    report = dry_run(cfg)
    assert list(tmp_path.iterdir()) == []
    assert "tokens per step: 256" in report and "2 micro-batches" in report
    model = build_model(cfg.model)
    assert f"{model.num_params():,}" in report
    assert f"FLOPs per step:  {model.flops_per_token() * 256:.3g}" in report
    # the expected time is max_steps x the measured (post-warm-up) step time
    step = float(re.search(r"measured step:\s+([\d.]+) s \(mean of two steps", report).group(1))
    expected = re.search(r"expected time:\s+([\d,]+) steps x ([\d.]+) s", report)
    assert int(expected.group(1).replace(",", "")) == cfg.train.max_steps
    assert float(expected.group(2)) == step > 0


def test_a_model_too_large_for_memory_is_refused_up_front(tmp_path, data_dir, monkeypatch):
    """Weights + gradients + AdamW state beyond the device's memory: a one-line ConfigError from a model
    built on the meta device (a billion-row embedding was an allocator traceback, after seconds)."""
    from scratchlm.train import dryrun

    cfg = tiny_config(tmp_path / "run", data_dir, "model.vocab_size=1000000000", "tokenizer.vocab_size=257")
    with pytest.raises(ConfigError, match=r"need [\d,.]+ GiB, more than the [\d,.]+ GiB of cpu memory"):
        dryrun.dry_run(cfg)
    with pytest.raises(ConfigError, match="make the model smaller"):
        trainer.train_model(cfg, tmp_path / "run", ByteTokenizer(), data_dir)
    assert not (tmp_path / "run" / "checkpoints").exists()
    small = tiny_config(tmp_path / "run2", data_dir)
    # exactly at the limit: 16 bytes per parameter (fp32 weights, gradients, two AdamW moments)
    n = build_model(small.model).num_params()
    monkeypatch.setattr(dryrun, "device_memory", lambda device: 16 * n)
    dryrun.check_memory(small, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(dryrun, "device_memory", lambda device: 16 * n - 1)
    with pytest.raises(ConfigError):
        dryrun.check_memory(small, torch.device("cpu"), torch.float32)
    dryrun.check_memory(small, torch.device("cpu"), torch.float32, world_size=2)  # sharded over 2 ranks


def test_plot_cli(tmp_path, data_dir):
    from scratchlm.cli import main

    _, run_dir = train(tmp_path, data_dir)
    for p in (run_dir / "plots").iterdir():
        p.unlink()
    assert main(["plot", str(run_dir)]) == 0
    names = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert names == {"loss.png", "perplexity.png", "lr.png", "throughput.png"}
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_metrics_jsonl_is_json_lines(tmp_path, data_dir):
    _, run_dir = train(tmp_path, data_dir, "train.optimizer=muon")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        assert json.loads(line)["kind"] in ("train", "eval", "stop")
