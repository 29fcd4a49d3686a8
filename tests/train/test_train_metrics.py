"""MetricsLogger: metrics.jsonl records, loss lines without a progress bar, a bar that counts seconds."""

from __future__ import annotations

import json

from scratchlm.train.metrics import MetricsLogger


def _record(step: int, time: float) -> dict:
    return {
        "kind": "train",
        "step": step,
        "loss": 2.5,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 1000.0,
        "mfu": None,
        "time": time,
    }


def test_loss_lines_are_printed_when_the_bar_is_off(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, max_steps=20, start_step=0, progress=False, tensorboard=False)
    logger.log(_record(5, 1.2))
    logger.close()
    out = capsys.readouterr()
    assert "step 5/20: loss 2.5000 lr 1.00e-03 gnorm 0.50 tok/s 1,000 mfu n/a" in out.out + out.err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 5


def test_a_wall_clock_run_counts_seconds(tmp_path, capsys):
    logger = MetricsLogger(
        tmp_path,
        max_steps=100_000,
        start_step=7,
        progress=True,
        tensorboard=False,
        max_time=120,
        start_time=30.2,
    )
    assert (logger.bar.total, logger.bar.n, logger.bar.unit) == (120, 30, "s")  # resumed at 30 s, not step 7
    logger.advance(41.6)
    assert logger.bar.n == 42
    logger.advance(500.0)  # the last step may end past max_time: the bar stops at its total
    assert logger.bar.n == 120
    logger.close()
    quiet = MetricsLogger(
        tmp_path / "q", max_steps=100_000, start_step=0, progress=False, tensorboard=False, max_time=120
    )
    quiet.log(_record(5, 3.4))
    quiet.close()
    out = capsys.readouterr()
    assert "step 5 (3/120 s): loss 2.5000" in out.out + out.err
