"""`scratchlm generate` / `sample` / `chat` on a run directory built in the test, and the chat REPL."""

from __future__ import annotations

import dataclasses
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
from scratchlm.inference.beam import sequence_score, translate
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


@pytest.fixture(scope="module")
def seq2seq_run_dir(tmp_path_factory):
    """A seq2seq run directory as the trainer writes it (tokenizer with <|bos|> and <|pad|>)."""
    d = tmp_path_factory.mktemp("seq2seq_run")
    tok = train_bpe_from_iterator(
        ["ein hund läuft", "a dog runs", "ein mann fährt", "a man rides"] * 3,
        vocab_size=280,
        special_tokens=("<|endoftext|>", "<|bos|>", "<|pad|>"),
        progress=False,
    )
    cfg = Config(
        model=ModelConfig(
            arch="seq2seq",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=2,
            d_model=32,
            context_length=24,
            pos="sinusoidal",
            norm_position="pre",
            mlp="relu",
        )
    )
    save_config(cfg, d / "config.yaml")
    tok.save(d / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # larger weights: outputs that differ between sources and searches
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    save_checkpoint(d, 1, model, {}, {"step": 1}, keep_last=1)
    return d


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


def test_generate_int8_decodes_with_int8_weights(run_dir, capsys, monkeypatch):
    """--int8: every matmul of the loaded model is an int8 Linear, and generation still works end to end."""
    import scratchlm.inference.quantize as quantize

    models = []
    original = quantize.quantize_int8
    monkeypatch.setattr(quantize, "quantize_int8", lambda m: models.append(original(m)) or m)
    args = ["generate", str(run_dir), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "8"]
    assert main([*args, "--device", "cpu", "--int8", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and "8 new tokens" in err
    assert len(models) == 1 and not any(isinstance(m, torch.nn.Linear) for m in models[0].modules())
    assert any(isinstance(m, quantize.Int8Linear) for m in models[0].modules())


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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "1.5"], "error: top_p"),
        (["--seed", str(2**70)], "error: seed must be in [0, 2**64)"),  # was an OverflowError traceback
        (["--seed", "-3"], "error: seed must be in [0, 2**64)"),
        (["--repetition-penalty", "1e-40"], "error: repetition_penalty must be in [0.01, 100]"),  # was NaN
        (["--frequency-penalty=-1e38"], "error: frequency_penalty must be in [-100, 100]"),
        (["--presence-penalty", "nan"], "error: presence_penalty must be finite"),
        (["--temperature", "inf"], "error: temperature must be finite"),
        (["--stop-token-id", "300"], "error: --stop-token-id 300 is not in the vocabulary (0..299)"),
        (["--stop-token-id", "-1"], "error: stop_token_ids must be a list of token ids"),
        (["--beams", "2"], "error: --beams and --length-penalty are for translation"),
        (["--length-penalty", "0.5"], "error: --beams and --length-penalty are for translation"),
    ],
)
def test_bad_values_are_one_line_errors(run_dir, capsys, flags, message):
    assert main(["generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "4", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_bad_out_path_is_refused_before_generating(run_dir, tmp_path, capsys):
    cases = [
        (
            tmp_path / "missing" / "x.jsonl",
            "the directory",
        ),  # was a FileNotFoundError traceback, after the work
        (tmp_path, "is a directory"),
    ]
    for out, fragment in cases:
        assert (
            main(["generate", str(run_dir), "--prompt", "x", "--max-new-tokens", "4", "--out", str(out)]) == 2
        )
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: --out {out}") and fragment in captured.err
        assert captured.err.count("\n") == 1 and captured.out == ""
    assert not (tmp_path / "missing").exists()
    if not torch.cuda.is_available():  # the message names the flag's value (it said train.device)
        assert main(["generate", str(run_dir), "--prompt", "x", "--device", "cuda"]) == 2
        assert capsys.readouterr().err.startswith("error: device='cuda' but CUDA is not available")


def test_prompt_too_long_is_one_line_error(run_dir, capsys):
    args = ["generate", str(run_dir), "--prompt", "x" * 60, "--max-new-tokens", "10", "--context", "error"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "context_length 48" in err and err.count("\n") == 1
    # the hint names the flags a user types, never the Python keywords (it said context='slide')
    assert "--max-new-tokens 10" in err and "--context slide" in err and "context=" not in err


def test_generation_past_the_context_slides_by_default(run_dir, capsys):
    """The README's `scratchlm sample RUN --prompt "def "` on a context-128 run asks for 2 + 128 tokens: HF and
    nanoGPT users expect it to generate, not to fail; the default slides the window and says so once."""
    args = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "60", "--temperature", "0"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert err.count("warning:") == 1 and err.count("\n") == 1
    assert "exceeds the model's context_length 48: the window slides" in err
    assert "--context stop" in err and "--context error" in err and "context=" not in err
    assert main([*args, "--context", "slide"]) == 0
    explicit = capsys.readouterr()
    assert explicit.out == out and explicit.err == ""  # the same text; no warning when asked for by name


def test_tiny_temperature_is_greedy(run_dir, lm, capsys):
    """1e-40 used to overflow l / T to inf, NaN probabilities, and a RuntimeError in torch.multinomial."""
    args = ["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12", "--device", "cpu"]
    assert main([*args, "--temperature", "1e-40", "--seed", "0"]) == 0
    assert capsys.readouterr().out == "def " + lm.generate("def ", temperature=0, max_new_tokens=12) + "\n"


def test_stop_token_id_flag(run_dir, lm, tmp_path):
    free = lm.engine.generate("def ", temperature=0, max_new_tokens=12, stop_token_ids=[])[0].token_ids
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token first sampled at step k
    j = next(i for i in range(1, k) if free[i] not in free[:i])  # another one, earlier
    for command, ids, stops_at in [("generate", [free[k]], k), ("sample", [free[k], free[j]], j)]:
        out = tmp_path / f"{command}.jsonl"
        flags = [f for t in ids for f in ("--stop-token-id", str(t))]
        rc = main(
            [command, str(run_dir), "--prompt", "def ", "--temperature", "0", "--max-new-tokens", "12"]
            + ["--out", str(out), *flags]
        )
        (row,) = [json.loads(line) for line in out.read_text().splitlines()]
        assert rc == 0 and row["finish_reason"] == "stop"
        assert row["token_ids"] == free[:stops_at] and row["new_tokens"] == stops_at
        assert row["completion"] == lm.generate("def ", temperature=0, max_new_tokens=12, stop_token_ids=ids)


def test_generate_translates_on_a_seq2seq_run(seq2seq_run_dir, capsys):
    """It used to stop with 'Seq2Seq is not a decoder-only model'; now greedy or beam search."""
    s2s = load(seq2seq_run_dir, which="latest", device="cpu")
    src = "ein mann fährt"
    base = ["generate", str(seq2seq_run_dir), "--prompt", src, "--device", "cpu"]
    assert main(base) == 0
    greedy = translate(s2s.model, s2s.tokenizer, [src])[0]
    assert greedy and capsys.readouterr().out == greedy + "\n"
    assert main([*base, "--beams", "1"]) == 0
    assert capsys.readouterr().out == greedy + "\n"
    assert main(["sample", *base[1:], "--beams", "3", "--length-penalty", "0.6", "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == translate(s2s.model, s2s.tokenizer, [src], beam_size=3, length_penalty=0.6)[0] + "\n"
    assert "tok/s" in err


def test_translate_prompts_file_to_jsonl(seq2seq_run_dir, tmp_path):
    s2s = load(seq2seq_run_dir, which="latest", device="cpu")
    sources = ["ein hund läuft", "ein mann", "läuft"]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(seq2seq_run_dir), "--prompts-file", str(tmp_path / "src.txt"), "--out", str(out)]
    assert main([*args, "--beams", "2", "--length-penalty", "0", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == sources
    want = translate(s2s.model, s2s.tokenizer, sources, beam_size=2, length_penalty=0.0)
    assert [r["completion"] for r in rows] == want
    eos = s2s.tokenizer.eot_id
    for r in rows:
        assert s2s.tokenizer.decode(r["token_ids"]) == r["completion"] and eos not in r["token_ids"]
        assert r["new_tokens"] == len(r["token_ids"]) and r["finish_reason"] in ("stop", "length")
        n = r["new_tokens"] + (r["finish_reason"] == "stop")  # the score counts EOS
        assert r["score"] == pytest.approx(sequence_score(r["logprob"], n, 0.0), abs=1e-3)
    assert main([*args, "--max-new-tokens", "3"]) == 0  # caps the output (EOS included)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["new_tokens"] + (r["finish_reason"] == "stop") <= 3 for r in rows)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0.5"], "error: --temperature does not apply to"),
        (["--top-k", "5"], "error: --top-k does not apply to"),
        (["--stop-token-id", "5"], "error: --stop-token-id does not apply to"),
        (["--num-samples", "2"], "error: --num-samples is for decoder runs"),
        (["--context", "slide"], "error: --context is for decoder runs"),
        (["--int8"], "error: --int8 is for decoder runs"),
        (["--beams", "0"], "error: --beams must be >= 1"),
        (["--length-penalty=-1"], "error: --length-penalty must be a finite number >= 0"),
        (["--prompt", ""], "error: a seq2seq run translates a source text"),
        (["--prompt", "ein " * 30], "error: a source has"),  # longer than context_length 24
    ],
)
def test_translation_flag_errors_are_one_line(seq2seq_run_dir, capsys, flags, message):
    assert main(["generate", str(seq2seq_run_dir), "--prompt", "ein hund", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def test_chat_on_a_seq2seq_run_is_one_line_error(seq2seq_run_dir, capsys):
    assert main(["chat", str(seq2seq_run_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "scratchlm generate" in err and err.count("\n") == 1


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


def test_repl_bad_set_input_is_one_line_error_and_goes_on():
    """Every /set problem is one 'error: ...' line; the options stay as they were and the REPL goes on."""
    engine = FakeEngine()
    session = ChatSession(engine, max_new_tokens=8)
    before = session.params
    bad = [
        "/set stop_token_ids a,b",  # was an uncaught ValueError
        "/set max_new_tokens none",  # None for fields that cannot be None: was a TypeError
        "/set temperature none",
        "/set top_p none",
        "/set seed 99999999999999999999999",  # was accepted, then crashed in manual_seed
        "/set seed -1",
        "/set temperature nan",
        "/set repetition_penalty 1e-40",
        "/set stop abc\\",  # a trailing backslash: a bad escape
        "/set top_k 2.5",
        "/set stop_token_ids 1,-2",
    ]
    good = ["/set top_k none", "/set seed none", "/set stop_token_ids 5,7", "/set stop_token_ids none"]
    out = io.StringIO()
    assert run_repl(session, io.StringIO("\n".join([*bad, "hello", *good]) + "\n"), out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == len(bad) + 1 + len(good)
    for cmd, line in zip(bad, lines):
        assert line.startswith("error: "), (cmd, line)
    assert "max_new_tokens" in lines[1] and "none" in lines[1] and "int" in lines[1]
    assert "seed must be in [0, 2**64)" in lines[4]
    assert lines[len(bad)] == "reply 1"  # the REPL went on with the old options
    assert lines[len(bad) + 1 :] == [
        "(top_k = None)",
        "(seed = None)",
        "(stop_token_ids = [5, 7])",
        "(stop_token_ids = None)",
    ]
    assert dataclasses.replace(session.params, stop_token_ids=None) == before


def test_repl_set_stop_unescapes():
    session = ChatSession(FakeEngine())
    session.set_option("stop", "\\n\\n")
    session.set_option("stop", "née")  # non-ASCII stays as typed
    assert session.params.stop == ["née"]
    session.set_option("stop", "\\n\\n")
    assert session.params.stop == ["\n\n"]
    session.set_option("stop", "\\u00e9\\t")
    assert session.params.stop == ["é\t"]


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


def test_repl_unencodable_message_is_one_line_error_and_not_a_turn():
    """A character the (char) tokenizer never saw: one error line, the REPL goes on, and the message stays
    out of the history (else every later prompt would contain it and fail again)."""
    from scratchlm.inference.engine import Engine
    from scratchlm.tokenizer.char import CharTokenizer

    tok = CharTokenizer.train(["User: hello there\nAssistant: hi, abcdefghijklmnopqrstuvwxyz\n"])
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=64)
    )
    session = ChatSession(Engine(model.eval(), tok), max_new_tokens=4, temperature=0)
    out = io.StringIO()
    assert run_repl(session, io.StringIO("caf\u00e9\nhello\n"), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("error: char tokenizer") and "\u00e9" in lines[0]
    assert len(lines) == 2 and not lines[1].startswith("error")
    assert [u for u, _ in session.history] == ["hello"]


def test_interactive_chat_labels_the_turns():
    """At a terminal each reply is labelled (it followed the `> ` prompt unmarked); piped output stays bare."""
    from scratchlm.inference.chat import MODEL_LABEL, USER_LABEL

    out = io.StringIO()
    assert run_repl(ChatSession(FakeEngine()), io.StringIO("hi\nagain\n"), out, interactive=True) == 0
    lines = out.getvalue().splitlines()
    assert lines[1:] == [f"{USER_LABEL}{MODEL_LABEL}reply 1", f"{USER_LABEL}{MODEL_LABEL}reply 2", USER_LABEL]
    assert USER_LABEL.strip() == "you>" and MODEL_LABEL.strip() == "model>"
    piped = io.StringIO()
    run_repl(ChatSession(FakeEngine()), io.StringIO("hi\n"), piped)
    assert piped.getvalue() == "reply 1\n"
