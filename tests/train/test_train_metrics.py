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


def test_a_wall_clock_run_counts_seconds(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scratchlm.console.is_terminal", lambda: True)  # a bar is drawn at a terminal only
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


def test_no_bar_when_the_console_is_not_a_terminal(tmp_path, capsys):
    """Output redirected to a file (capsys: not a terminal): plain lines, one per log interval, and the
    evaluation on its own line; a bar's carriage-return redraws used to fill the log, the evaluation line
    landing inside the bar."""
    logger = MetricsLogger(tmp_path, max_steps=20, start_step=0, progress=True, tensorboard=False)
    for step in (10, 20):
        for _ in range(10):
            logger.advance(0.0)
        logger.log(_record(step, step / 10))
    logger.log({"kind": "eval", "step": 20, "val_loss": 2.0, "val_ppl": 7.389})
    logger.close()
    out, err = capsys.readouterr()
    assert "\r" not in out + err and err == ""
    assert out.splitlines() == [
        "step 10/20: loss 2.5000 lr 1.00e-03 gnorm 0.50 tok/s 1,000 mfu n/a",
        "step 20/20: loss 2.5000 lr 1.00e-03 gnorm 0.50 tok/s 1,000 mfu n/a",
        "step 20: val loss 2.0000, ppl 7.39",
    ]


def test_start_line_says_up_to_for_seq2seq_token_batches(tmp_path):
    """A seq2seq run batched by data.batch_tokens takes up to that many padded tokens a step, not rows x context
    (the start line said 8,192 tokens/step for 2,000-token batches)."""
    import dataclasses

    import torch

    from scratchlm.config import load_config
    from scratchlm.model import build_model
    from scratchlm.train.metrics import start_line

    cfg = load_config(
        None,
        [
            "preset=cpu-tiny",
            "model.arch=seq2seq",
            "model.vocab_size=64",
            "data.batch_tokens=2000",
            "train.max_steps=10",
        ],
    )
    with torch.device("meta"):
        model = build_model(cfg.model)
    line = start_line(cfg, model, torch.device("cpu"), torch.float32, tmp_path, 2000)
    assert "up to 2,000 tokens/step x 10 steps = up to 20K tokens" in line, line
    gpt = load_config(None, ["preset=cpu-tiny", "train.max_steps=4"])
    with torch.device("meta"):
        model = build_model(dataclasses.replace(gpt.model, vocab_size=64))
    assert "up to" not in start_line(gpt, model, torch.device("cpu"), torch.float32, tmp_path, 128)
