"""train.threads (torch's count by default; -1 = auto: fewer threads on busy cores) and eval.sample_interval (samples at the end by default)."""

from __future__ import annotations

import re

import pytest
import torch
from train_helpers import ByteTokenizer, make_data, tiny_config

import scratchlm.train.trainer as trainer
import scratchlm.train.validation as validation
from scratchlm.config import load_config
from scratchlm.errors import ConfigError
from scratchlm.train import threads


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def sample_steps(run_dir) -> list[int]:
    text = (run_dir / "samples.txt").read_text() if (run_dir / "samples.txt").exists() else ""
    return [int(s) for s in re.findall(r"^=== step (\d+) ===$", text, re.MULTILINE)]


@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        ((), [12]),  # default: at the end only, not at the evaluation of step 6
        (("eval.sample_interval=6",), [6, 12]),  # every evaluation
        (("eval.sample_interval=4", "eval.interval=2"), [4, 8, 12]),  # the evaluations on multiples of 4
        (("eval.num_samples=0", "eval.sample_interval=6"), []),  # off
    ],
)
def test_samples_at_the_end_unless_asked(tmp_path, data_dir, overrides, want):
    cfg = tiny_config(tmp_path / "run", data_dir, *overrides)
    trainer.train_model(cfg, tmp_path / "run", ByteTokenizer(), data_dir)
    assert sample_steps(tmp_path / "run") == want


def test_early_stopping_writes_the_final_samples(tmp_path, data_dir, monkeypatch):
    calls = iter([1.0, 2.0, 3.0])  # never improves after the first evaluation: stops at step 6 (patience 2)
    real = validation.evaluate_metrics
    monkeypatch.setattr(
        validation, "evaluate_metrics", lambda *a, **k: {**real(*a, **k), "val_loss": next(calls)}
    )
    cfg = tiny_config(tmp_path / "run", data_dir, "eval.interval=2", "train.early_stopping_patience=2")
    result = trainer.train_model(cfg, tmp_path / "run", ByteTokenizer(), data_dir)
    assert result["stopped_reason"] == "early_stopping" and result["step"] == 6
    assert sample_steps(tmp_path / "run") == [6]


@pytest.mark.parametrize(
    ("default", "cores", "load", "want"),
    [
        (2, 2, 0.1, 2),  # idle: one thread per core
        (2, 2, 0.9, 1),  # one core busy
        (2, 2, 13.0, 1),  # oversubscribed: never below 1
        (8, 8, 3.2, 5),  # the free cores
        (4, 8, 0.0, 4),  # never above torch's default
    ],
)
def test_auto_threads(default, cores, load, want):
    assert threads.auto_threads(default, cores, load) == want


def test_set_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (99.0, 0.0, 0.0))
        assert threads.set_cpu_threads(0, torch.device("cpu")) is None  # the default: torch's own count
        assert torch.get_num_threads() == before
        note = threads.set_cpu_threads(-1, torch.device("cpu"))
        if before > 1:
            assert torch.get_num_threads() == 1 and note.startswith("threads: 1 of ")
        assert threads.set_cpu_threads(-1, torch.device("cuda")) is None  # GPU runs: untouched
        assert threads.set_cpu_threads(3, torch.device("cpu")) == "threads: 3 (train.threads)"
        assert torch.get_num_threads() == 3
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))  # the user's (or torchrun's) choice stands
        assert threads.set_cpu_threads(-1, torch.device("cpu")) is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_train_restores_the_thread_count(tmp_path, data_dir):
    before = torch.get_num_threads()
    cfg = tiny_config(tmp_path / "run", data_dir, "train.threads=1", "train.max_steps=2", "eval.interval=2")
    trainer.train_model(cfg, tmp_path / "run", ByteTokenizer(), data_dir)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.threads=-2", r"train.threads must be >= -1 \(0 = torch's default, -1 = auto\), got -2"),
        ("eval.sample_interval=-2", r"eval.sample_interval must be >= 0 \(0 = at the end only\), got -2"),
    ],
)
def test_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
