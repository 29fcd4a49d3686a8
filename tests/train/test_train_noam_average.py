"""The paper's inverse-square-root schedule against its closed form; checkpoint averaging = mean of weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.config import TrainConfig, load_config
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.train import checkpoint as ckpt
from scratchlm.train.average import average_checkpoints, average_run, last_checkpoints
from scratchlm.train.optim import lr_at, noam_peak_lr


@pytest.mark.parametrize("d_model,warmup,factor", [(512, 4000, 1.0), (256, 400, 2.0), (64, 1, 0.5)])
def test_noam_equals_the_papers_closed_form(d_model, warmup, factor):
    cfg = TrainConfig(schedule="noam", lr=noam_peak_lr(d_model, warmup, factor), warmup_steps=warmup)
    for step in [0, 1, warmup // 2, warmup - 1, warmup, 2 * warmup, 10 * warmup, 100_000]:
        n = step + 1  # the paper counts steps from 1; ours are 0-based (the lr *used by* step s)
        paper = factor * d_model**-0.5 * min(n**-0.5, n * warmup**-1.5)
        assert lr_at(step, cfg) == pytest.approx(paper, rel=1e-12)
    assert noam_peak_lr(512, 4000) == pytest.approx(6.99e-4, rel=1e-3)  # the base model's peak


def test_noam_is_scaled_by_train_lr_and_needs_warmup():
    one = TrainConfig(schedule="noam", lr=1e-3, warmup_steps=100)
    two = TrainConfig(schedule="noam", lr=2e-3, warmup_steps=100)
    assert max(lr_at(s, one) for s in range(1000)) == pytest.approx(1e-3)  # peak = train.lr at n = W
    assert all(lr_at(s, two) == pytest.approx(2 * lr_at(s, one)) for s in range(0, 1000, 37))
    assert lr_at(399, one) == pytest.approx(1e-3 * math.sqrt(100 / 400))
    with pytest.raises(ConfigError, match="warmup_steps >= 1"):
        load_config(overrides=["train.schedule=noam", "train.warmup_steps=0"])


def _write(run_dir, step, weights):
    ckpt.save_checkpoint(run_dir, step, weights, {"optimizers": []}, {"step": step}, keep_last=10)


def test_averaging_equals_the_mean_of_the_weights(tmp_path):
    torch.manual_seed(0)
    shared = [torch.randn(5, 3) for _ in range(4)]
    states = [
        {"emb.weight": shared[i], "head.weight": shared[i], "b": torch.randn(3), "n": torch.tensor([7])}
        for i in range(4)
    ]  # emb and head tied (one tensor under two names), as in a model with a tied output head
    for i, sd in enumerate(states):
        _write(tmp_path, 10 * (i + 1), sd)
    paths = last_checkpoints(tmp_path, 3)
    assert [p.name for p in paths] == ["step_00000020", "step_00000030", "step_00000040"]
    out, n = average_run(tmp_path, 3)
    assert n == 3
    got = ckpt.load_model_state(out)
    for name in ("emb.weight", "b"):
        want = torch.stack([sd[name] for sd in states[1:]]).double().mean(0).float()
        assert torch.equal(got[name], want)
    torch.testing.assert_close(got["head.weight"], got["emb.weight"])  # still tied
    assert torch.equal(got["n"], torch.tensor([7]))
    state = ckpt.verify_checkpoint(out)  # a checkpoint like the others: sizes and hashes recorded
    assert state["step"] == 40 and len(state["averaged_from"]) == 3
    # averaging one checkpoint returns it; a second run replaces the first average
    one = average_checkpoints(paths[-1:], tmp_path / "averaged")
    torch.testing.assert_close(ckpt.load_model_state(one)["b"], states[3]["b"])


def test_averaging_refuses_too_few_mismatched_and_foreign_outputs(tmp_path):
    _write(tmp_path / "a", 1, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="fewer than the 3"):
        average_run(tmp_path / "a", 3)
    assert len(last_checkpoints(tmp_path / "a", 3, allow_fewer=True)) == 1  # the end of a short run
    _write(tmp_path / "a", 2, {"w": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="w is"):
        average_run(tmp_path / "a", 2)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "state.json").write_text(json.dumps({"step": 1, "files": {}}))
    _write(tmp_path / "b", 1, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="not an averaged checkpoint"):
        average_run(tmp_path / "b", 1, tmp_path / "foreign")
    with pytest.raises(ConfigError, match="train.keep_last"):
        load_config(overrides=["train.average_last=5", "train.keep_last=2"])


def test_seq2seq_tokenizer_cache_key_includes_the_special_tokens(tmp_path, monkeypatch):
    from scratchlm.pipeline import _seq2seq_tokenizer

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "p.tsv").write_text("ein hund\ta dog\nder mann\tthe man\n" * 5, encoding="utf-8")
    base = [f"data.source={tmp_path / 'p.tsv'}", "model.arch=seq2seq", "tokenizer.vocab_size=270"]
    plain = _seq2seq_tokenizer(load_config(overrides=base), progress=False)
    extra = _seq2seq_tokenizer(
        load_config(overrides=[*base, "tokenizer.special_tokens=<|endoftext|>,<|sep|>"]), progress=False
    )
    assert "<|sep|>" in extra.special_tokens and "<|sep|>" not in plain.special_tokens
    again = _seq2seq_tokenizer(load_config(overrides=base), progress=False)  # and the cache still serves
    assert again.fingerprint == plain.fingerprint
