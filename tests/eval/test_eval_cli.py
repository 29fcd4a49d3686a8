"""`scratchlm eval RUN` on a decoder run: the whole validation split once by default, and what it scored."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import load_run_config
from scratchlm.data.loader import TokenLoader


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A cpu-tiny run on 40 small text files whose final evaluation covers the whole validation split
    (eval.batches far beyond one pass: capped at one pass, it no longer wraps around)."""
    tmp = tmp_path_factory.mktemp("evalrun")
    src = tmp / "src"
    src.mkdir()
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    for i in range(40):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60 + 9 * i))
        (src / f"doc{i:02d}.txt").write_text(f"def f{i}():\n    return '{text}'\n", encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv("SCRATCHLM_CACHE", str(tmp / "cache"))
    overrides = [
        "preset=cpu-tiny",
        f"data.source={src}",
        "data.val_fraction=0.25",
        f"train.run_dir={tmp / 'run'}",
        "train.max_steps=2",
        "eval.interval=2",
        "eval.batches=100000",
        "eval.sample_tokens=0",
    ]
    try:
        assert main(["train", *overrides]) == 0
    finally:
        mp.undo()
    return tmp / "run"


def _val_loader(run_dir):
    cfg = load_run_config(run_dir)
    return TokenLoader(
        cfg.data.data_dir,
        split="val",
        batch_size=cfg.train.batch_size,
        context_length=cfg.model.context_length,
        mode="sequential",
    )


def _eval_json(run_dir, capsys, *extra):
    assert main(["eval", str(run_dir), "--which", "latest", "--device", "cpu", "--json", *extra]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_eval_scores_the_whole_split_once_and_equals_the_final_evaluation(run_dir, capsys):
    loader = _val_loader(run_dir)
    whole = loader.batches_per_epoch
    assert whole >= 2  # the test means something: more than one batch
    result, err = _eval_json(run_dir, capsys)
    assert err == ""
    assert result["batches"] == whole and result["whole_split"]
    assert result["tokens"] == whole * loader.B * loader.T
    # the run's last evaluation covered the whole split (eval.batches capped at one pass): the same number
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r["kind"] == "eval"][-1]
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-5, abs=1e-6)

    # documents: every document with a scored target token; documents end with end-of-text, so that is the
    # end-of-text tokens among the targets plus the document the last target is in (when it is not one)
    from scratchlm.tokenizer import load_tokenizer

    eot_id = load_tokenizer(run_dir / "tokenizer.json").eot_id
    targets = torch.cat([loader.next_batch()[1].flatten() for _ in range(whole)])
    expected = int((targets == eot_id).sum()) + int(targets[-1] != eot_id)
    assert result["documents"] == expected > 1


def test_eval_batches_is_a_subset_capped_at_one_pass(run_dir, capsys):
    loader = _val_loader(run_dir)
    whole = loader.batches_per_epoch
    one, err = _eval_json(run_dir, capsys, "--batches", "1")
    assert one["batches"] == 1 and not one["whole_split"] and one["tokens"] == loader.B * loader.T
    assert err == ""
    # past the end of the split it wrapped around and scored tokens twice; now one pass and one warning
    many, err = _eval_json(run_dir, capsys, "--batches", str(whole * 3 + 1))
    full, _ = _eval_json(run_dir, capsys)
    assert many["tokens"] == full["tokens"] and many["loss"] == full["loss"] and many["whole_split"]
    assert err.startswith(f"warning: --batches {whole * 3 + 1} is more than the val split holds ({whole} ")
    assert err.count("\n") == 1


def test_eval_says_what_it_scored(run_dir, capsys):
    assert main(["eval", str(run_dir), "--which", "latest", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    loader = _val_loader(run_dir)
    whole = loader.batches_per_epoch
    tokens = whole * loader.B * loader.T
    assert f"scored {tokens:,} of the val split's {loader.num_tokens:,} tokens, " in out
    assert f"documents (the whole split: {whole} batches of {loader.B} x {loader.T})" in out
