"""`scratchlm eval RUN` on a decoder run: the whole validation split once by default, and what it scored."""

from __future__ import annotations

import json

import pytest

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


def test_eval_scores_every_token_of_the_split_once(run_dir, capsys):
    """The whole split: one pass of full batches, which the run's last evaluation scored too (eval.batches
    capped at one pass), then the windows they leave out; every token but a shard's first is a target."""
    from scratchlm.api import load
    from scratchlm.eval import evaluate_lm

    loader = _val_loader(run_dir)
    whole = loader.batches_per_epoch
    assert whole >= 2  # the test means something: more than one batch
    result, err = _eval_json(run_dir, capsys)
    assert err == ""
    assert result["batches"] == whole and result["whole_split"] and result["remainder_windows"] >= 1
    assert result["tokens"] == loader.num_tokens - len(loader.shards) > whole * loader.B * loader.T
    # = the run's last evaluation (the full batches, a mean of equal-sized batch means) combined, token
    # weighted, with the loss over the windows the full batches leave out
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if r["kind"] == "eval"][-1]
    rest = evaluate_lm(load(run_dir, which="latest", device="cpu").model, loader.remainder_batches())
    full_tokens = whole * loader.B * loader.T
    assert rest["tokens"] + full_tokens == result["tokens"]
    combined = (final["val_loss"] * full_tokens + rest["loss"] * rest["tokens"]) / result["tokens"]
    assert result["loss"] == pytest.approx(combined, rel=1e-5, abs=1e-6)

    # documents: every document with a target token; documents end with end-of-text, so over the whole
    # split that is each shard's end-of-text tokens, plus its last document when that one is not ended
    import numpy as np

    from scratchlm.tokenizer import load_tokenizer

    eot_id = load_tokenizer(run_dir / "tokenizer.json").eot_id
    documents = 0
    for s in loader.shards:
        tokens = np.fromfile(loader.data_dir / s["file"], dtype=loader.dtype)
        documents += int((tokens == eot_id).sum()) + int(tokens[-1] != eot_id)
    assert result["documents"] == documents > 1


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
    whole, windows = loader.batches_per_epoch, len(loader.remainder_windows())
    tokens, shards = loader.num_tokens - len(loader.shards), len(loader.shards)
    first = "its first" if shards == 1 else f"the first of each of its {shards} shards"
    assert (
        f"scored {tokens:,} of the val split's {loader.num_tokens:,} tokens (all but {first}, which " in out
    )
    assert (
        f"documents (the whole split: {whole} batches of {loader.B} x {loader.T}, then the {windows} " in out
    )
    assert main(["eval", str(run_dir), "--which", "latest", "--device", "cpu", "--batches", "1"]) == 0
    out = capsys.readouterr().out
    part = loader.B * loader.T
    assert f"scored {part:,} of the val split's {loader.num_tokens:,} tokens, " in out
    assert f"documents (the first 1 of {whole} batches of {loader.B} x {loader.T})" in out
