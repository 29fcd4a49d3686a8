"""`scratchlm export RUN_DIR --out DIR` on a run directory made here (config, tokenizer, one checkpoint)."""

from __future__ import annotations

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config import load_config, save_config
from scratchlm.model import build_model

transformers = pytest.importorskip("transformers")
tokenizer_mod = pytest.importorskip("scratchlm.tokenizer")
if not hasattr(tokenizer_mod, "load_tokenizer"):  # the tokenizer package is written concurrently
    pytest.skip("scratchlm.tokenizer is not available yet", allow_module_level=True)


def test_export_cli_writes_a_checkpoint_transformers_loads(tmp_path, capsys):
    checkpoint = pytest.importorskip("scratchlm.train.checkpoint")
    tok = tokenizer_mod.CharTokenizer.train(["hello world, the quick brown fox"])
    cfg = load_config(
        overrides=[
            "preset=cpu-tiny",
            f"model.vocab_size={tok.vocab_size}",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
        ]
    )
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    model = build_model(cfg.model).eval()
    checkpoint.save_checkpoint(run, 1, model, {}, {"step": 1}, keep_last=1)

    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--which", "latest"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-5, rtol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").is_file()

    # a non-empty --out (here: the run itself) is refused untouched; --force re-exports over an export
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()  # transformers' loading bar
    assert main(["export", str(run), "--out", str(run), "--which", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {run} is not empty") and err.count("\n") == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--which", "latest"]) == 2
    assert main(["export", str(run), "--out", str(tmp_path / "hf"), "--which", "latest", "--force"]) == 0
    assert main(["export", str(run), "--out", str(run / "config.yaml")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_export_cli_reports_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")]) == 2
    assert "error:" in capsys.readouterr().err
