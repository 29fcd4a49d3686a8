"""Checkpoints written in the background (train.background_checkpoints): the same files, errors not lost.

Exact resume after SIGKILL and SIGTERM with background writes (the default) is proven by
tests/train/test_train_resume.py, whose runs checkpoint every 5 steps on a helper thread.
"""

from __future__ import annotations

import threading

import pytest
import torch
from train_helpers import ByteTokenizer, make_data, tiny_config

import scratchlm.train.trainer as trainer
from scratchlm.errors import CheckpointError
from scratchlm.train import checkpoint as ckpt


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def run(tmp_path, data_dir, name, *overrides):
    run_dir = tmp_path / name
    cfg = tiny_config(run_dir, data_dir, "train.ckpt_interval=2", "train.keep_last=100", *overrides)
    return trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir), run_dir


def same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b


def test_background_writes_give_the_synchronous_checkpoints(tmp_path, data_dir):
    """Every checkpoint, while training went on: the weights file byte for byte, the optimizer state equal
    tensor for tensor (torch.save's file has a random serialization id: never equal bytes), state.json
    equal but for the wall clock (and the optimizer file's hash), and best/ the same."""
    background, bg_dir = run(tmp_path, data_dir, "bg")
    synchronous, sync_dir = run(tmp_path, data_dir, "sync", "train.background_checkpoints=false")
    assert background["step"] == synchronous["step"] == 12
    names = sorted(p.name for p in (bg_dir / "checkpoints").glob("step_*"))
    assert names == sorted(p.name for p in (sync_dir / "checkpoints").glob("step_*"))
    assert names == [f"step_{s:08d}" for s in range(2, 13, 2)]
    for sub in [f"checkpoints/{n}" for n in names] + ["best"]:
        a, b = bg_dir / sub, sync_dir / sub
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(), sub
        assert same_tree(ckpt.load_optimizer_file(a), ckpt.load_optimizer_file(b)), sub
        sa, sb = ckpt.read_state(a), ckpt.read_state(b)
        for s in (sa, sb):
            del s["train_state"]["elapsed"], s["files"]["optimizer.pt"]
        assert sa == sb, sub
    assert (bg_dir / "checkpoints" / "LATEST").read_text().strip() == "step_00000012"


def test_a_failed_background_write_stops_the_run_and_keeps_the_previous_checkpoint(
    tmp_path, data_dir, monkeypatch
):
    real, calls = ckpt.save_checkpoint, []

    def failing_second(run_dir, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise CheckpointError(f"could not write checkpoint file for step {step}: disk full")
        return real(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", failing_second)
    with pytest.raises(CheckpointError, match="step 4: disk full"):
        run(tmp_path, data_dir, "fail")
    assert calls == [2, 4]  # raised at the next save (step 6), which therefore was not written
    assert ckpt.latest_checkpoint(tmp_path / "fail").name == "step_00000002"


def test_the_writer_runs_one_write_at_a_time_and_raises_its_error():
    writer, started, release = ckpt.BackgroundWriter(), threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return "done"

    writer.submit(slow)
    assert started.wait(5) and not release.is_set()  # submit returned while the write is still running
    release.set()
    assert writer.wait() == "done"
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.submit(lambda: "next")  # the next submit waits for the failed write and raises its error
    writer.submit(lambda: "after")
    assert writer.wait() == "after"


def test_snapshot_is_out_of_reach_of_the_training_steps_and_keeps_ties():
    w = torch.randn(4, 3)
    before = w.clone()
    state = {"wte.weight": w.detach(), "lm_head.weight": w.detach(), "opt": [{"step": torch.tensor(3.0)}]}
    snap = ckpt.snapshot(state)
    w.add_(1.0)
    state["opt"][0]["step"].add_(1)
    assert torch.equal(snap["wte.weight"], before) and float(snap["opt"][0]["step"]) == 3.0
    assert snap["wte.weight"] is snap["lm_head.weight"]  # one tensor: save_weights stores it once
