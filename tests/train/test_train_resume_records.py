"""Resume equals uninterrupted in metrics.jsonl too: the evaluation records' train_loss averages the same
steps, and a finished run resumed again gains no second ``stop`` record (issue 29, (d) and (e))."""

from __future__ import annotations

import os
import signal

import pytest
from train_helpers import ByteTokenizer, make_data, tiny_config

import scratchlm.train.trainer as trainer
from scratchlm.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _train(run_dir, data_dir, *overrides):
    short = ["train.max_steps=8", "eval.interval=4"]  # evaluations at 4 and 8
    cfg = tiny_config(run_dir, data_dir, "train.deterministic=true", *short, *overrides)
    return trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)


def _records(run_dir, kind):
    return [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir) if r["kind"] == kind]


def test_eval_train_loss_after_a_resume_equals_an_uninterrupted_run(tmp_path, data_dir, monkeypatch):
    _train(tmp_path / "whole", data_dir)  # 8 steps, evaluations at 4 and 8

    real, calls = trainer.train_step, {"n": 0}

    def interrupt_after_step_2(*a, **k):  # a checkpoint at step 2, before the first evaluation
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer, "train_step", interrupt_after_step_2)
    assert _train(tmp_path / "split", data_dir)["step"] == 2
    monkeypatch.setattr(trainer, "train_step", real)
    assert _train(tmp_path / "split", data_dir)["step"] == 8

    whole, split = _records(tmp_path / "whole", "eval"), _records(tmp_path / "split", "eval")
    assert [r["step"] for r in whole] == [4, 8]
    # the eval at step 4 averages steps 1..4, two of them before the resume (the old code: only 3 and 4)
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]
    assert split == whole
    assert [r["loss"] for r in _records(tmp_path / "split", "train")] == [
        r["loss"] for r in _records(tmp_path / "whole", "train")
    ]
    assert [r["step"] for r in _records(tmp_path / "split", "stop")] == [8]


def test_resuming_a_finished_run_adds_no_second_stop_record(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    _train(run_dir, data_dir)
    before = read_metrics(run_dir)
    for _ in range(2):  # `scratchlm train --resume` of the finished run, twice
        assert _train(run_dir, data_dir)["stopped_reason"] == "max_steps"
    after = read_metrics(run_dir)
    assert [r["kind"] for r in after].count("stop") == 1
    assert [r for r in after if r["kind"] != "stop"] == [r for r in before if r["kind"] != "stop"]
    _train(run_dir, data_dir, "train.max_steps=10")  # a longer run: still one stop record, at its end
    assert [r["step"] for r in read_metrics(run_dir) if r["kind"] == "stop"] == [10]
