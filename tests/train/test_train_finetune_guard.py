"""`scratchlm finetune runs/A DATA train.name=A` is refused before anything is written; a failed fine-tune
leaves no runs/NAME behind and never rewrites its source (issue 29, (c))."""

from __future__ import annotations

import errno

import pytest

from scratchlm.cli import main
from scratchlm.config import load_config, save_config
from scratchlm.model import build_model
from scratchlm.tokenizer import CharTokenizer
from scratchlm.train import checkpoint as ckpt

TEXT = "the quick brown fox jumps over the lazy dog; " * 200


@pytest.fixture
def run_a(tmp_path, monkeypatch):
    """runs/A: config.yaml, tokenizer.json and one checkpoint of a tiny model (cwd = tmp_path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    tok = CharTokenizer.train([TEXT])
    cfg = load_config(
        overrides=[
            "preset=cpu-tiny",
            f"model.vocab_size={tok.vocab_size}",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.context_length=32",
            "train.name=A",
        ]
    )
    run = tmp_path / "runs" / "A"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    ckpt.save_checkpoint(run, 3, build_model(cfg.model), {}, {"step": 3}, keep_last=1)
    (tmp_path / "data.txt").write_text(TEXT)
    return run


def _snapshot(run):
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


FAST = [
    "train.max_steps=2",
    "train.progress=false",
    "eval.interval=2",
    "eval.batches=1",
    "data.num_workers=1",
]


@pytest.mark.parametrize("source", ["runs/A", "runs/A/", "runs/A/checkpoints/step_00000003"])
def test_finetune_into_its_own_source_is_refused_before_anything_is_written(run_a, capsys, source):
    before = _snapshot(run_a)
    assert main(["finetune", source, "data.txt", "train.name=A", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: train.init_from={source} is inside the run directory being written")
    assert "train.name=A-ft" in err and err.count("\n") == 1
    assert _snapshot(run_a) == before
    assert main(["finetune", "runs/A", "data.txt", f"train.run_dir={run_a}", *FAST]) == 2
    assert _snapshot(run_a) == before


def test_a_finetune_failing_while_it_sets_up_its_run_leaves_nothing(run_a, capsys, monkeypatch):
    from scratchlm.train import init_from

    def disk_full(run_dir, source):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "init_from.json"))

    monkeypatch.setattr(init_from, "record_init_source", disk_full)
    before = _snapshot(run_a)
    assert main(["finetune", "runs/A", "data.txt", "train.name=B", *FAST]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert not (run_a.parent / "B").exists()
    assert _snapshot(run_a) == before


def test_a_finetune_failing_in_training_leaves_nothing(run_a, capsys, monkeypatch):
    from scratchlm.errors import DataError
    from scratchlm.train import trainer

    def fail(*args, **kwargs):
        raise DataError("the val split is too small")

    monkeypatch.setattr(trainer, "train_model", fail)
    assert main(["finetune", "runs/A", "data.txt", "train.name=B", *FAST]) == 2
    assert not (run_a.parent / "B").exists()
