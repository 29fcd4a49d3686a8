"""Runs a careless user or a crash can damage: a re-run after a kill before the first checkpoint, a LATEST
that points out of checkpoints/, a damaged config.yaml, checks that must come before the expensive work,
and a failed new run that must not leave a half-made run directory.

The generated versions (truncated and bit-flipped run files) are in tests/fuzz/test_fuzz_files.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import ByteTokenizer, corpus_text, make_data, tiny_config

import scratchlm.pipeline as pipeline
import scratchlm.train.trainer as trainer
from scratchlm.cli import main
from scratchlm.config import load_config, load_run_config, save_config
from scratchlm.errors import ConfigError, DataError
from scratchlm.model import build_model
from scratchlm.train.checkpoint import latest_checkpoint, save_checkpoint
from scratchlm.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    monkeypatch.setattr(trainer, "_plots", lambda run_dir: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), chars=20_000)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A saved BPE tokenizer, a text file and the shards pipeline.run prepared from it with that tokenizer."""
    from scratchlm.tokenizer import train_bpe_from_iterator

    tmp = tmp_path_factory.mktemp("real")
    text = corpus_text(20_000)
    tok = train_bpe_from_iterator([text], vocab_size=300, num_workers=1, progress=False)
    tok.save(tmp / "tokenizer.json")
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    real = tmp / "tokenizer.json", tmp / "corpus.txt", tmp / "shards"
    pipeline.get_shards(_pipeline_cfg(tmp / "unused", real), tok, progress=False)
    return real


def _pipeline_cfg(run_dir: Path, real, *overrides: str):
    tok_path, corpus, shards = real
    return tiny_config(
        run_dir,
        shards,
        "model.vocab_size=0",
        f"tokenizer.path={tok_path}",
        f"data.source={corpus}",
        "data.num_workers=1",
        *overrides,
    )


# ---- 3. train.name must name a directory under runs/ ----------------------------------------------------------


@pytest.mark.parametrize("name", ["", " ", ".", "..", "../../x", "a/b", "/tmp/x", "a\\b", "x\0y"])
def test_train_name_must_be_a_plain_name(name):
    with pytest.raises(ConfigError, match="train.name"):
        load_config(None, [f"train.name={name}"])


def test_a_plain_name_is_a_child_of_runs():
    cfg = load_config(None, ["train.name=my run-1.2"])
    assert cfg.run_dir.parent == Path("runs") and cfg.run_dir.name == "my run-1.2"


# ---- 4. a kill before the first checkpoint, then a re-run: each step is logged once --------------------------


def test_rerun_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # what a run killed at step 3, before its first checkpoint, leaves behind
    killed = [{"kind": "train", "step": s, "loss": 9.0, "lr": 0.0, "grad_norm": 0.0} for s in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in killed) + '{"kind": "tr')
    (run_dir / "samples.txt").write_text("=== step 2 ===\nold sample\n")
    cfg = tiny_config(run_dir, data_dir, "train.max_steps=4", "train.ckpt_interval=4", "eval.interval=4")
    trainer.train_model(cfg, run_dir, ByteTokenizer(), data_dir)
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert steps == [1, 2, 4]
    assert all(r["loss"] != 9.0 for r in read_metrics(run_dir) if r["kind"] == "train")
    assert "old sample" not in (run_dir / "samples.txt").read_text()


# ---- 5. LATEST naming something that is not one of the step directories ------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    model = build_model(cfg.model)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, {}, {"step": step}, keep_last=5)
    return tmp_path


@pytest.mark.parametrize(
    "pointer",
    [
        "step_00000002/..",
        "step_00000001/../..",
        "../../etc",
        "/tmp",
        "step_",
        ".",
        "",
        "\0",
        "step_00000001\0",
    ],
)
def test_latest_pointing_outside_the_step_dirs_falls_back(two_checkpoints, pointer):
    (two_checkpoints / "checkpoints" / "LATEST").write_text(pointer)
    with pytest.warns(UserWarning, match="LATEST is corrupt"):
        found = latest_checkpoint(two_checkpoints)
    assert found == two_checkpoints / "checkpoints" / "step_00000002"


def test_latest_that_is_a_directory_falls_back(two_checkpoints):
    pointer = two_checkpoints / "checkpoints" / "LATEST"
    pointer.unlink()
    pointer.mkdir()
    with pytest.warns(UserWarning, match="LATEST is corrupt"):
        assert latest_checkpoint(two_checkpoints).name == "step_00000002"


# ---- 7. a damaged config.yaml in a run directory ------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"- a\n- b\n",
        b"",
        b"\n",
        b"5\n",
        b"null\n",
        b"\xbd\xb2=\x10\xff\xfe",
        b"model:\n  n_layer: [",
        b"train: {}\n",
    ],
    ids=["list", "empty", "blank", "scalar", "null", "binary", "truncated-yaml", "sections-missing"],
)
def test_damaged_run_config_is_one_error_naming_the_file(tmp_path, content, capsys):
    cfg = tiny_config(tmp_path, tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "config.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match="config.yaml"):
        load_run_config(tmp_path)
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="config.yaml"):  # train --resume: refused before any work
        pipeline.resume_config(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.yaml" in err and err.count("\n") == 1


def test_a_bad_value_in_a_run_config_names_the_file(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(text.replace("seed: 1337", "seed:"))  # cut off after the key
    with pytest.raises(ConfigError, match=r"config\.yaml: train\.seed"):
        load_run_config(tmp_path)


# ---- 8. checks before the expensive work; a failed new run leaves no run directory ---------------------------


@pytest.mark.parametrize("seed", [-1, 2**32, 10**30])
def test_seed_out_of_range_is_refused_when_the_config_loads(seed):
    with pytest.raises(ConfigError, match="train.seed"):
        load_config(None, [f"train.seed={seed}"])
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def _no_expensive_work(monkeypatch):
    def expensive(*args, **kwargs):
        raise AssertionError("the tokenizer/shards were built before a check that needs neither")

    monkeypatch.setattr(pipeline, "training_sources", expensive)
    monkeypatch.setattr(pipeline, "get_tokenizer", expensive)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.device=mps" if not torch.backends.mps.is_available() else "train.device=cuda:99",
            "train.device",
        ),
        ("model.d_model=32768", "memory"),
    ],
)
def test_device_and_model_size_are_checked_before_the_tokenizer(tmp_path, monkeypatch, override, message):
    _no_expensive_work(monkeypatch)
    cfg = load_config(
        None, ["preset=cpu-tiny", f"train.run_dir={tmp_path / 'run'}", "model.n_layer=24", override]
    )
    with pytest.raises(ConfigError, match=message):
        pipeline.run(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path, real):
    tok_path, corpus, shards = real
    bad = tmp_path / "shards"
    bad.mkdir()
    for p in shards.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    ids = np.memmap(bad / "train_000000.bin", dtype="<u2", mode="r+")
    ids[::20] = 60_000  # beyond the vocabulary: every window meets one
    ids.flush()
    del ids
    run_dir = tmp_path / "runs" / "new"
    with pytest.raises(DataError, match="token id 60000"):
        pipeline.run(_pipeline_cfg(run_dir, (tok_path, corpus, bad)), progress=False)
    assert not run_dir.exists()
    # a directory that was there before keeps what it held, and only that
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        pipeline.run(_pipeline_cfg(run_dir, (tok_path, corpus, bad)), progress=False)
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]


# ---- 11. a fallback warning is said once, even when two stages meet it --------------------------------------


def test_resume_fallback_warning_is_printed_once(tmp_path, real, capsys):
    run_dir = tmp_path / "run"
    pipeline.run(_pipeline_cfg(run_dir, real, "train.max_steps=4", "train.ckpt_interval=2"), progress=False)
    (run_dir / "checkpoints" / "LATEST").write_text("garbage\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "train.max_steps=5"]) == 0
    err = capsys.readouterr().err
    assert err.count("LATEST is corrupt") == 1, err
