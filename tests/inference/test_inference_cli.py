"""`scratchlm generate` / `sample` / `chat` on a run directory built in the test, and the chat REPL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from scratchlm.api import load
from scratchlm.cli import main
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.inference.chat import ChatSession, run_repl
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint

TEXTS = ["User: hello\nAssistant: hi there\n", "def main():\n    return 0\n", "the quick brown fox"] * 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory in the trainer's format: config.yaml, tokenizer.json, checkpoints/step_*/ + LATEST."""
    d = tmp_path_factory.mktemp("run")
    tok = train_bpe_from_iterator(TEXTS, vocab_size=300, progress=False)
    cfg = Config(
        model=ModelConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=2,
            d_model=32,
            context_length=48,
            pos="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
        )
    )
    save_config(cfg, d / "config.yaml")
    tok.save(d / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    save_checkpoint(d, 1, model, {}, {"step": 1}, keep_last=1)
    return d


@pytest.fixture(scope="module")
def lm(run_dir):
    return load(run_dir, which="latest", device="cpu")


def test_generate_prints_prompt_and_greedy_completion(run_dir, lm, capsys):
    rc = main(
        [
            "generate",
            str(run_dir),
            "--prompt",
            "def ",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
            "--stats",
        ]
    )
    out, err = capsys.readouterr()
    expected = lm.engine.generate("def ", temperature=0, max_new_tokens=12)[0].text
    assert rc == 0 and out == "def " + expected + "\n"
    assert "tok/s" in err
    assert lm.generate("def ", temperature=0, max_new_tokens=12) == expected  # the Python API agrees
    assert "".join(lm.stream("def ", temperature=0, max_new_tokens=12)) == expected


def test_sample_alias_and_seed(run_dir, capsys):
    args = [
        "sample",
        str(run_dir),
        "--prompt",
        "the",
        "--max-new-tokens",
        "10",
        "--seed",
        "3",
        "--top-k",
        "20",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_prompts_file_to_jsonl(run_dir, lm, tmp_path):
    prompts = ["def ", "the quick", "User: hi\\nAssistant:"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "results.jsonl"
    rc = main(
        [
            "generate",
            str(run_dir),
            "--prompts-file",
            str(tmp_path / "p.txt"),
            "--out",
            str(out),
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
            "--num-samples",
            "2",
            "--batch-size",
            "2",
            "--stop",
            "\\n",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rc == 0 and len(rows) == 6
    assert [r["prompt"] for r in rows] == [
        p for p in ["def ", "the quick", "User: hi\nAssistant:"] for _ in "ab"
    ]
    for r in rows:
        assert {
            "completion",
            "finish_reason",
            "prompt_tokens",
            "new_tokens",
            "token_ids",
            "seconds",
            "tokens_per_second",
        } <= set(r)
        alone = lm.engine.generate(r["prompt"], temperature=0, max_new_tokens=8, stop=["\n"])[0]
        assert r["completion"] == alone.text and "\n" not in r["completion"]


def test_bad_option_is_one_line_error(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "x", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: top_p") and err.count("\n") == 1
    assert main(["generate", str(run_dir), "--prompt", "x" * 60, "--max-new-tokens", "10"]) == 2
    assert "context_length 48" in capsys.readouterr().err


def test_chat_through_piped_stdin(run_dir, lm):
    stdin = "/set temperature 0\n/set max_new_tokens 8\nhello\n/set top_p 7\n/reset\n/quit\nnot read\n"
    proc = subprocess.run(
        [sys.executable, "-m", "scratchlm", "chat", str(run_dir), "--device", "cpu"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "(temperature = 0.0)" and lines[1] == "(max_new_tokens = 8)"
    reply = lm.engine.generate("User: hello\nAssistant:", temperature=0, max_new_tokens=8, stop=["\nUser:"])[
        0
    ]
    assert lines[2] == reply.text.strip()
    assert lines[3].startswith("error: top_p") and lines[4] == "(history cleared)" and len(lines) == 5


class FakeEngine:
    """Engine stand-in for the REPL: replies 'reply N' in pieces, records prompts, can raise Ctrl-C."""

    context_length = 30

    def __init__(self, interrupt_at: int | None = None):
        self.prompts: list[str] = []
        self.interrupt_at = interrupt_at

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(range(len(prompt) // 4))  # ~4 characters per token

    def stream(self, prompt, **kw):
        self.prompts.append(prompt)
        assert "\nUser:" in kw["stop"] and kw["context"] == "slide"
        for i, piece in enumerate([" reply", " ", str(len(self.prompts))]):
            if i == self.interrupt_at:
                raise KeyboardInterrupt
            yield piece


def test_repl_history_window_reset_and_ctrl_c():
    engine = FakeEngine()
    session = ChatSession(engine, max_new_tokens=8)
    out = io.StringIO()
    run_repl(session, io.StringIO("first message\nsecond one\nthird\n/reset\nfourth\n"), out)
    assert out.getvalue().splitlines() == ["reply 1", "reply 2", "reply 3", "(history cleared)", "reply 4"]
    assert engine.prompts[1] == "User: first message\nAssistant: reply 1\nUser: second one\nAssistant:"
    # with all turns the third prompt exceeds (30 - 8) tokens: the oldest turn is dropped
    assert engine.prompts[2] == "User: second one\nAssistant: reply 2\nUser: third\nAssistant:"
    assert engine.prompts[3] == "User: fourth\nAssistant:"  # after /reset

    engine = FakeEngine(interrupt_at=2)  # Ctrl-C during the reply: stopped, the REPL goes on
    session = ChatSession(engine)
    out = io.StringIO()
    assert run_repl(session, io.StringIO("hi\n/show\n"), out) == 0  # EOF exits with 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "reply  [stopped]" and "temperature=0.8" in lines[1]
    assert session.history == [("hi", "reply")]
