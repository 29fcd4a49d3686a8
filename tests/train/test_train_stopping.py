"""The stop sentences of train/stopping.py (the trainer tests check them in real runs)."""

from __future__ import annotations

from scratchlm.config import TrainConfig
from scratchlm.train.stopping import describe_stop
from scratchlm.train.trainer import TrainState


def test_each_stop_reason_in_words():
    state = TrainState(step=1454, elapsed=137.4, best_val_loss=1.81234)
    tc = TrainConfig(max_steps=100000, max_time=137.0, early_stopping_patience=3)
    assert describe_stop("max_steps", state, tc) == "reached train.max_steps=100000"
    assert (
        describe_stop("max_time", state, tc)
        == "reached train.max_time=137 s at step 1454 (137 s of training)"
    )
    assert (
        describe_stop("early_stopping", state, tc)
        == "early stopping at step 1454 after 3 evaluations without improvement (best val loss 1.8123)"
    )
    assert describe_stop("interrupted", state, tc, "SIGTERM") == "interrupted by SIGTERM after step 1454"


def test_warmup_longer_than_the_budget_is_named():
    """A 2-minute run of a 200-warmup-step recipe ended before its learning rate peaked, and nothing said so."""
    from scratchlm.train.stopping import warmup_warning

    assert warmup_warning(TrainConfig(max_steps=1000, warmup_steps=100)) is None
    msg = warmup_warning(TrainConfig(max_steps=50, warmup_steps=200, lr=1e-3))
    assert msg == (
        "train.warmup_steps=200 exceeds the 50 steps that train.max_steps=50 allows: the learning rate will "
        "not reach train.lr=0.001; lower train.warmup_steps (e.g. 5) or give the run more steps"
    )
    # max_time: the steps left at the measured pace; 0.5 s per step, 10 s in, 120 s budget -> 20 + 220 steps
    tc = TrainConfig(max_steps=100_000, warmup_steps=300, max_time=120.0)
    msg = warmup_warning(tc, step=20, elapsed=10.0, seconds_per_step=0.5)
    assert msg.startswith(
        "train.warmup_steps=300 exceeds the 240 steps that train.max_time=120 s (about 240 steps"
    )
    assert warmup_warning(tc, step=20, elapsed=10.0, seconds_per_step=0.1) is None  # 1,120 steps: room
    assert warmup_warning(tc) is None  # no measurement yet: max_steps alone


def test_train_warns_once_when_warmup_exceeds_max_steps(tmp_path, monkeypatch, capsys):
    from scratchlm.cli import main

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200, encoding="utf-8")
    args = [
        "train",
        "preset=cpu-tiny",
        f"data.source={tmp_path / 'a.txt'}",
        f"train.run_dir={tmp_path / 'r'}",
    ]
    overrides = ["train.max_steps=3", "train.warmup_steps=10", "train.lr=0.003", "eval.sample_tokens=0"]
    assert main([*args, *overrides, "--quiet"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warned == [
        "warning: train.warmup_steps=10 exceeds the 3 steps that train.max_steps=3 allows: the learning rate "
        "will not reach train.lr=0.003; lower train.warmup_steps (e.g. 1) or give the run more steps"
    ]
