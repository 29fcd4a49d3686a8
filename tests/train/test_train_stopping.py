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
