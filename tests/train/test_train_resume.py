"""Exact resume through real processes: SIGKILL and SIGTERM mid-run, then resume -> bit-identical weights.

The runs use a sequential loader over several shards for 2.5 epochs and dropout 0.1, so a resumed run must
restore the loader position across shard and epoch boundaries and the torch RNG (dropout masks) exactly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ByteTokenizer, corpus_text

from scratchlm.corpus import FileSource
from scratchlm.train.checkpoint import find_checkpoint, load_model_state
from scratchlm.train.metrics import read_metrics

CHILD = Path(__file__).with_name("train_child.py")
OVERRIDES = [
    "train.max_steps=40",
    "train.ckpt_interval=5",
    "train.log_interval=1",
    "eval.interval=10",
    "eval.sample_interval=10",  # samples at every evaluation: their replay after a kill is checked too
    "train.deterministic=true",
    "data.loader=sequential",
    "model.dropout=0.1",
    "train.keep_last=3",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """~2,400 tokens in 8 documents (files), shards of ~600 tokens: an epoch is ~16 steps of 4x32."""
    from scratchlm.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("resume-data")
    text = corpus_text(2_700)
    paths = []
    for i in range(9):
        p = tmp / f"doc{i}.txt"
        p.write_text(text[i * 300 : (i + 1) * 300])
        paths.append(p)
    out = tmp / "shards"
    meta = prepare(
        FileSource(paths, description="resume test"),
        ByteTokenizer(),
        out,
        val_fraction=0.15,
        num_workers=1,
        progress=False,
        shard_tokens=600,
    )
    assert len(meta["splits"]["train"]["shards"]) >= 3 and meta["splits"]["val"]["tokens"] > 0
    return out


def run_child(run_dir: Path, data_dir: Path, stop_at: int | None = None, sig: int = signal.SIGKILL):
    """Run the child; with ``stop_at``, send ``sig`` once it logged step >= stop_at (after a checkpoint)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(run_dir), str(data_dir), *OVERRIDES],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    if stop_at is not None:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            steps = [r["step"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
            if steps and steps[-1] >= stop_at and (run_dir / "checkpoints" / "LATEST").exists():
                proc.send_signal(sig)
                break
            time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(find_checkpoint(run_dir, "latest"))


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r.get("kind") == "train"}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    rc, out, err = run_child(run_dir, data_dir)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 40 and result["stopped_reason"] == "max_steps"
    return run_dir


def assert_same_run(run_dir: Path, reference: Path) -> None:
    ref, got = final_weights(reference), final_weights(run_dir)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert train_losses(run_dir) == train_losses(reference)  # every step replayed, nothing logged twice
    samples = (reference / "samples.txt").read_text(encoding="utf-8")
    assert samples.count("=== step ") == 4  # evaluations at steps 10, 20, 30, 40: each written once
    assert (run_dir / "samples.txt").read_text(encoding="utf-8") == samples


def test_sigkill_then_resume_is_bit_exact(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    stop_at = random.Random().randint(8, 36)
    rc, _, err = run_child(run_dir, data_dir, stop_at=stop_at, sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL, f"child finished before the kill at step {stop_at}: {err[-500:]}"
    killed_at = max(train_losses(run_dir))
    rc, out, err = run_child(run_dir, data_dir)
    assert rc == 0, err
    assert "resumed from" in out, out
    assert json.loads(out.strip().splitlines()[-1])["step"] == 40
    assert killed_at < 40
    assert_same_run(run_dir, reference)


def test_sigterm_checkpoints_after_an_epoch_then_resume_is_bit_exact(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    stop_at = random.Random().randint(20, 36)  # past the first epoch boundary (~16 steps)
    rc, out, err = run_child(run_dir, data_dir, stop_at=stop_at, sig=signal.SIGTERM)
    assert rc == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped_reason"] == "interrupted" and stop_at <= result["step"] < 40
    ckpt = find_checkpoint(run_dir)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == result["step"]  # the checkpoint is of the last finished step, not an older one
    assert state["loader"] is not None
    rc, out, err = run_child(run_dir, data_dir)
    assert rc == 0, err
    assert_same_run(run_dir, reference)
