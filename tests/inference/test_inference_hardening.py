"""Careless generation input: --prompts-file records that are not strings, an empty prompts file, and a
server whose default max_new_tokens is longer than the model's context.

The generated version of the jsonl cases is tests/fuzz/test_fuzz_records.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scratchlm.api import LoadedModel
from scratchlm.cli import main
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.inference.server import GenerationServer, RequestError
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint

TEXTS = ["hello world, hello there", "the quick brown fox jumps", "def main():\n    return 0\n"] * 3


def _model(context_length: int):
    tok = train_bpe_from_iterator(TEXTS, vocab_size=280, progress=False)
    cfg = Config(
        model=ModelConfig(
            vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=context_length
        )
    )
    torch.manual_seed(0)
    return tok, cfg, build_model(cfg.model).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    tok, cfg, model = _model(32)
    save_config(cfg, d / "config.yaml")
    tok.save(d / "tokenizer.json")
    save_checkpoint(d, 1, model, {}, {"step": 1}, keep_last=1)
    return d


# ---- 2. a jsonl record whose prompt is not a string is an error, not the text "None" / "5" --------------------


@pytest.mark.parametrize(
    "record",
    [
        '{"prompt": null}',
        '{"prompt": 5}',
        '{"prompt": ["a"]}',
        '{"prompt": {"text": "a"}}',
        '{"text": "a"}',
        '"just a string"',
        "[1, 2]",
        "5",
        '{"prompt": ' + "9" * 5000 + "}",
        "[" * 100_000,
    ],
)
def test_prompts_file_record_without_a_string_prompt_is_refused(run_dir, tmp_path, record, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n' + record + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(
        ["generate", str(run_dir), "--prompts-file", str(path), "--max-new-tokens", "2", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {path}:2 ") and err.count("\n") == 1, err
    assert not out.exists()  # nothing generated, nothing written


def test_string_prompts_are_generated_from(run_dir, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"prompt": "", "id": 7}\n')
    out = tmp_path / "out.jsonl"
    rc = main(
        ["generate", str(run_dir), "--prompts-file", str(path), "--max-new-tokens", "2", "--out", str(out)]
    )
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", ""]


# ---- 11. an empty prompts file is an error, not "wrote 0 completions" with exit 0 -------------------------------


@pytest.mark.parametrize(
    "name, text", [("p.jsonl", ""), ("p.jsonl", "\n  \n"), ("p.txt", ""), ("p.txt", "\n\n")]
)
def test_empty_prompts_file_is_an_error(run_dir, tmp_path, name, text, capsys):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(run_dir), "--prompts-file", str(path), "--out", str(out)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert not out.exists()


# ---- 11. the server's default max_new_tokens (128) fits a model whose context is shorter -----------------------


def test_server_default_length_fits_a_short_context():
    tok, cfg, model = _model(16)
    lm = LoadedModel(model, tok, cfg, Path("runs/x/checkpoints/step_00000001"), Path("runs/x"))
    srv = GenerationServer(lm, host="127.0.0.1", port=0)
    try:
        answer = srv.generate(srv.parse(b'{"prompt": "hello", "temperature": 0}'))
        (completion,) = answer["completions"]
        assert completion["finish_reason"] == "context"
        # generated until the window was full (the last token is predicted from a full window of 16)
        assert completion["prompt_tokens"] + completion["new_tokens"] in (16, 17)
        # an explicit length is still checked against the context: the client asked for it
        req = srv.parse(b'{"prompt": "hello", "max_new_tokens": 100}')
        with pytest.raises(Exception, match="context_length 16"):
            srv.generate(req)
        with pytest.raises(RequestError):
            srv.parse(b'{"prompt": "hello", "max_new_tokens": 100000}')
    finally:
        srv.server_close()
