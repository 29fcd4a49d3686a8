"""Training on a streamed source (data.stream=true): the token budget, exact resume, the CLI, the offline error.

The resume test crashes the run mid-way (an exception after the step-4 checkpoint, in this process) and
trains again from the checkpoint: the stream position, the mixture generator, dropout RNG and the optimizer
are restored, so the final weights must equal those of an unbroken run bit for bit (CPU, deterministic).
The same through real processes killed with SIGKILL is the slow test at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import ByteTokenizer, corpus_text, tiny_config

import scratchlm.train.trainer as trainer
from scratchlm.cli import main as cli_main
from scratchlm.train.checkpoint import find_checkpoint, load_model_state, read_state
from scratchlm.train.metrics import read_metrics

STEP_TOKENS = 4 * 32  # batch_size x context_length of tiny_config


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)  # matplotlib is slow; plots tested elsewhere


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory) -> dict[str, Path]:
    """Two jsonl sources (~20k and ~8k tokens) and a validation file, from real text."""
    tmp = tmp_path_factory.mktemp("stream-train")
    text = corpus_text(40_000)
    out = {}
    for name, lo, hi in (("code", 0, 20_000), ("more", 20_000, 28_000), ("val", 28_000, 32_000)):
        lines = [json.dumps({"text": text[i : i + 700]}) for i in range(lo, hi, 700)]
        out[name] = tmp / f"{name}.jsonl"
        out[name].write_text("\n".join(lines) + "\n")
    return out


def stream_overrides(files: dict[str, Path], *extra: str, val: bool = True) -> list[str]:
    return [
        "data.stream=true",
        f"data.mixture=0.7:{files['code']},0.3:{files['more']}",
        *([f"data.val_source={files['val']}"] if val else []),
        "train.deterministic=true",
        "model.dropout=0.1",
        *extra,
    ]


def run(run_dir: Path, files, *extra: str, val: bool = True) -> dict:
    cfg = tiny_config(run_dir, run_dir / "unused", *stream_overrides(files, *extra, val=val))
    return trainer.train_model(cfg, run_dir, ByteTokenizer(), None)


def test_token_budget_is_honoured_exactly(tmp_path, stream_files, capsys):
    result = run(
        tmp_path / "a", stream_files, f"data.max_tokens={7 * STEP_TOKENS}", "data.stream_workers=0", val=False
    )
    assert result["step"] == 7 and result["tokens"] == 7 * STEP_TOKENS
    state = read_state(find_checkpoint(tmp_path / "a"))
    assert state["train_state"]["tokens"] == 7 * STEP_TOKENS and state["loader"]["step"] == 7
    # not a multiple of a step: whole steps only, never more than the budget, and said so
    result = run(
        tmp_path / "b", stream_files, f"data.max_tokens={3 * STEP_TOKENS + 5}", "data.stream_workers=0"
    )
    assert result["step"] == 3 and result["tokens"] == 3 * STEP_TOKENS
    assert "the 5 left over are not read" in capsys.readouterr().out


def test_crash_and_resume_is_bit_identical_to_an_unbroken_run(tmp_path, stream_files, monkeypatch):
    common = ("train.max_steps=7", "train.ckpt_interval=3", "eval.interval=4", "data.stream_workers=1")
    run(tmp_path / "ref", stream_files, *common)
    real_step, calls = trainer.train_step, [0]

    def crashing_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # after the step-4 checkpoint (best val): step 5 is lost and replayed
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "run", stream_files, *common)
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert read_state(find_checkpoint(tmp_path / "run"))["train_state"]["step"] == 4  # (best val at 4)
    result = run(tmp_path / "run", stream_files, *common)
    assert result["step"] == 7
    ref, got = (load_model_state(find_checkpoint(tmp_path / d)) for d in ("ref", "run"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    losses = {
        d: [m["loss"] for m in read_metrics(tmp_path / d) if m.get("kind") == "train"] for d in ("ref", "run")
    }
    assert losses["run"] == losses["ref"]


def test_cli_trains_on_a_stream_with_a_tokenizer_from_its_head(tmp_path, stream_files, monkeypatch, capsys):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    args = [
        "train",
        "preset=cpu-tiny",
        "data.stream=true",
        f"data.source={stream_files['code']}",
        "tokenizer.vocab_size=300",
        f"train.run_dir={tmp_path / 'run'}",
        "train.max_steps=3",
        "train.progress=false",
    ]
    assert cli_main(args) == 0
    out = capsys.readouterr()
    assert "the head of the stream" in out.out and "no validation loss" in out.err
    assert not (tmp_path / "cache" / "shards").exists()  # no prepare pass
    assert read_state(find_checkpoint(tmp_path / "run"))["loader"]["kind"] == "stream"


def test_cli_unreachable_hub_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    tok = tmp_path / "tok.json"
    from scratchlm.tokenizer import train_bpe_from_iterator

    train_bpe_from_iterator(iter(["some text"] * 3), 260, num_workers=1, progress=False).save(tok)
    args = ["train", "preset=cpu-tiny", "data.stream=true", "data.source=hf:someone/missing-corpus"]
    args += [f"tokenizer.path={tok}", f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2"]
    t0 = time.perf_counter()
    assert cli_main(args) == 2
    elapsed = time.perf_counter() - t0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[-1].startswith("error: HF dataset 'someone/missing-corpus' is unavailable: cannot reach")
    assert "local files" in err[-1] and not any(line.startswith("Traceback") for line in err)
    assert elapsed < 10  # torch, datasets and the model imports included; the Hub itself costs < 1 s


@pytest.mark.slow
def test_sigkill_and_resume_through_real_processes(tmp_path, stream_files):
    """SIGKILL the training process (its stream workers die with it), resume: bit-identical weights."""
    child = Path(__file__).with_name("train_child.py")
    extra = stream_overrides(stream_files, "train.max_steps=24", "train.ckpt_interval=5", "eval.interval=8")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(run_dir: Path) -> subprocess.Popen:
        cmd = [sys.executable, str(child), str(run_dir), str(tmp_path / "unused"), *extra]
        with open(tmp_path / f"{run_dir.name}.log", "a") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    assert launch(tmp_path / "ref").wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    proc = launch(tmp_path / "run")
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "step_00000010").is_dir():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert launch(tmp_path / "run").wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "run.log").read_text()
    ref, got = (load_model_state(find_checkpoint(tmp_path / d)) for d in ("ref", "run"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_two_gloo_ranks_stream_disjoint_documents(tmp_path):
    """torchrun, 2 CPU ranks: the documents each rank trained on are disjoint (record k -> rank k % 2)."""
    import re

    source = tmp_path / "tagged.jsonl"
    body = corpus_text(20_000)
    lines = [json.dumps({"text": f"<doc {i:05d}> " + body[i * 97 : i * 97 + 150]}) for i in range(120)]
    source.write_text("\n".join(lines) + "\n")
    child = Path(__file__).with_name("stream_dist_child.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(child), str(tmp_path), str(source)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = []
    for r in range(2):
        rows = torch.load(tmp_path / f"rows_rank{r}.pt", weights_only=True)
        text = bytes(t for t in rows.flatten().tolist() if t < 256).decode("utf-8", errors="replace")
        tags.append({int(m) for m in re.findall(r"<doc (\d{5})>", text)})
    assert tags[0] and tags[1] and not tags[0] & tags[1]
    assert {k % 2 for k in tags[0]} == {0} and {k % 2 for k in tags[1]} == {1}
