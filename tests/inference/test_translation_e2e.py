"""Translation end to end on a copy task: train with BLEU at each evaluation, then the CLI (translate,
eval with sacreBLEU, average) on the run, and its errors."""

from __future__ import annotations

import json
import os
import random

import pytest

from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.pipeline import run

WORDS = ["red", "blue", "cat", "dog", "sun", "sky"]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)]


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory):
    """A tiny encoder-decoder trained to copy word sequences (a few seconds on 2 cores)."""
    pytest.importorskip("sacrebleu")
    root = tmp_path_factory.mktemp("copy")
    (root / "train.tsv").write_text("".join(f"{s}\t{s}\n" for s in sentences(400, 0)), encoding="utf-8")
    val = sentences(40, 1)
    (root / "val.tsv").write_text("".join(f"{s}\t{s}\n" for s in val), encoding="utf-8")
    old = os.environ.get("SCRATCHLM_CACHE")
    os.environ["SCRATCHLM_CACHE"] = str(root / "cache")
    try:
        cfg = load_config(
            overrides=[
                "model.arch=seq2seq", "model.n_layer=2", "model.d_model=64", "model.n_head=4",
                "model.d_ff=128", "model.pos=sinusoidal", "model.norm_position=pre", "model.mlp=relu",
                "model.context_length=16", "tokenizer.vocab_size=300",
                f"data.source={root / 'train.tsv'}", f"data.val_source={root / 'val.tsv'}",
                f"train.run_dir={root / 'run'}", "train.batch_size=32", "train.max_steps=400",
                "train.lr=5e-3", "train.min_lr=5e-4", "train.warmup_steps=20", "train.weight_decay=0",
                "train.dtype=float32", "train.device=cpu", "train.progress=false", "train.seed=0",
                "train.ckpt_interval=100", "train.keep_last=3", "train.average_last=2",
                "eval.interval=200", "eval.batches=2", "eval.bleu_sentences=40", "eval.metric=bleu",
                "eval.sample_tokens=12",
            ]
        )  # fmt: skip
        summary = run(cfg, progress=False)
    finally:
        if old is None:
            os.environ.pop("SCRATCHLM_CACHE", None)
        else:
            os.environ["SCRATCHLM_CACHE"] = old
    return root, summary, val


def test_copy_task_reaches_bleu_100_and_logs_bleu_and_perplexity(copy_run):
    root, summary, _ = copy_run
    run_dir = root / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [200, 400]
    for r in evals:
        assert {"val_loss", "val_ppl", "train_loss", "train_ppl", "val_bleu", "val_chrf", "epoch"} <= r.keys()
        assert r["val_ppl"] == pytest.approx(2.718281828 ** r["val_loss"], rel=1e-6)
    assert evals[-1]["val_bleu"] == pytest.approx(100.0) and evals[0]["epoch"] >= 1
    assert (run_dir / "averaged" / "model.safetensors").is_file()  # train.average_last
    assert {"perplexity.png", "bleu.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
    best_step = json.loads((run_dir / "best" / "state.json").read_text())["step"]
    assert best_step == max(evals, key=lambda r: (r["val_bleu"], -r["step"]))["step"]  # best/ follows BLEU


def test_translate_cli(copy_run, tmp_path, capsys):
    root, _, val = copy_run
    run_dir = str(root / "run")
    assert main(["translate", run_dir, "--src", "cat dog sun"]) == 0
    assert capsys.readouterr().out.strip() == "cat dog sun"  # a copy
    (tmp_path / "in.txt").write_text("\n".join(val[:10]) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    assert (
        main(
            ["translate", run_dir, "--src-file", str(tmp_path / "in.txt"), "--out", str(out), "--beams", "3"]
        )
        == 0
    )
    assert out.read_text(encoding="utf-8").splitlines() == val[:10]  # in input order
    assert main(["translate", run_dir, "--src", "red sky", "--which", "averaged"]) == 0
    capsys.readouterr()
    for argv, message in [
        (["--src", "cat", "--beams", "0"], "--beams must be >= 1"),
        (["--src", "cat", "--out", str(out)], "--out goes with --src-file"),
        (["--src", " "], "--src is empty"),
        (["--src", "cat " * 30, "--strict"], "source 1 has 32 tokens (EOS included) > context_length 16"),
    ]:
        assert main(["translate", run_dir, *argv]) == 2
        assert message in capsys.readouterr().err


def test_eval_cli_scores_with_sacrebleu_and_stores_the_result(copy_run, tmp_path, capsys):
    root, _, val = copy_run
    run_dir = root / "run"
    assert main(["eval", str(run_dir)]) == 0  # default: the run's validation pairs, greedy
    out = capsys.readouterr().out
    assert "| sacreBLEU | 100.00 | nrefs:1|case:mixed|eff:no|tok:13a" in out and "| chrF |" in out
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "eval_translation" and record["val_bleu"] == pytest.approx(100.0)
    assert record["val_ppl"] < 2.0 and record["sentences"] == len(val)
    stored = list((run_dir / "eval").glob("val_*_beam1.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["val_chrf"] == pytest.approx(100.0)
    (tmp_path / "s.txt").write_text("cat dog sun sky\nred blue cat dog\n", encoding="utf-8")
    (tmp_path / "r.txt").write_text("cat dog sun sky\nred blue dog dog\n", encoding="utf-8")
    assert main(["eval", str(run_dir), "--src", str(tmp_path / "s.txt"), "--ref", str(tmp_path / "r.txt"),
                 "--beams", "2", "--json"]) == 0  # fmt: skip
    r = json.loads(capsys.readouterr().out)
    assert 0 < r["bleu"] < 100 and r["beams"] == 2
    assert main(["eval", str(run_dir), "--which", "averaged", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["checkpoint"].endswith("averaged") and r["val_bleu"] > 90
    (tmp_path / "short.txt").write_text("cat dog\n", encoding="utf-8")
    assert (
        main(["eval", str(run_dir), "--src", str(tmp_path / "s.txt"), "--ref", str(tmp_path / "short.txt")])
        == 2
    )
    assert "has 2 lines but" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--src", str(tmp_path / "s.txt")]) == 2
    assert "--src and --ref go together" in capsys.readouterr().err


def test_over_long_sources_are_truncated_with_one_warning(copy_run, tmp_path, capsys):
    """A test file with a sentence longer than the context: it refused the whole file; now (fairseq-like) the
    sentence is cut to the context, one warning names it, and --strict keeps the refusal."""
    root, _, _ = copy_run
    run_dir = str(root / "run")
    (tmp_path / "in.txt").write_text("cat dog\n" + " ".join(["sun"] * 20) + "\nred sky\n", encoding="utf-8")
    assert main(["translate", run_dir, "--src-file", str(tmp_path / "in.txt")]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("warning: 1 of 3 sources are longer than the model's")
    assert "context_length 16" in err and "source 2 (21 tokens)" in err and "--strict refuses" in err
    lines = out.splitlines()
    assert lines[0] == "cat dog" and lines[2] == "red sky"  # the others as before
    # the translation of its first 15 tokens (one per word here; + EOS = the context), which fits as is
    assert main(["translate", run_dir, "--src", " ".join(["sun"] * 15)]) == 0
    alone = capsys.readouterr()
    assert alone.err == "" and alone.out == lines[1] + "\n" and lines[1].split()[0] == "sun"
    assert main(["translate", run_dir, "--src-file", str(tmp_path / "in.txt"), "--strict"]) == 2
    assert "error: source 2 has 21 tokens (EOS included) > context_length 16" in capsys.readouterr().err

    (tmp_path / "ref.txt").write_text("cat dog\n" + " ".join(["sun"] * 20) + "\nred sky\n", encoding="utf-8")
    args = ["eval", run_dir, "--src", str(tmp_path / "in.txt"), "--ref", str(tmp_path / "ref.txt"), "--json"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["sentences"] == 3 and "source 2 (21 tokens)" in err and err.count("\n") == 1
    assert main([*args, "--strict"]) == 2
    assert "source 2 has 21 tokens" in capsys.readouterr().err


def test_average_cli(copy_run, tmp_path, capsys):
    root, _, _ = copy_run
    assert main(["average", str(root / "run"), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    assert "averaged the last 2 checkpoints" in capsys.readouterr().out
    assert (tmp_path / "avg" / "model.safetensors").is_file()
    assert main(["average", str(root / "run"), "--last", "9"]) == 2
    assert "fewer than the 9" in capsys.readouterr().err
