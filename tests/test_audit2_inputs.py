"""The second outside audit's input findings (issue 29): each was a traceback, a silent exit 0 or a message
that named neither the file nor the fix. Each test failed on the code before the fix."""

from __future__ import annotations

import gzip
import json
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.errors import ConfigError, DataError
from scratchlm.tokenizer import CharTokenizer

REPO = Path(__file__).resolve().parents[1]
DOCS = [f"document {i}: the quick brown fox jumps over the lazy dog. " * 8 for i in range(60)]


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture
def truncated_gz(tmp_path) -> Path:
    """A .jsonl.gz cut in the middle of its compressed stream (a download that stopped)."""
    data = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def char_tok(tmp_path) -> Path:
    path = tmp_path / "tok.json"
    CharTokenizer.train(DOCS).save(path)
    return path


def test_truncated_jsonl_gz_in_data_prepare_is_one_line_naming_it(tmp_path, truncated_gz, char_tok, capsys):
    argv = ["data", "prepare", str(truncated_gz), "--tokenizer", str(char_tok), "--out", str(tmp_path / "s")]
    assert main([*argv, "--workers", "1", "--no-progress"]) == 2
    _one_line_error(capsys, str(truncated_gz), "truncated or corrupt")


def test_truncated_jsonl_gz_in_train_and_tokenizer_train(tmp_path, truncated_gz, capsys, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    argv = ["tokenizer", "train", "--input", str(truncated_gz), "--vocab-size", "270", "--workers", "1"]
    assert main([*argv, "--out", str(tmp_path / "t.json"), "--no-progress"]) == 2
    _one_line_error(capsys, str(truncated_gz), "truncated or corrupt")
    run = ["train", f"data.source={truncated_gz}", "tokenizer.kind=char", f"train.run_dir={tmp_path / 'r'}"]
    assert main([*run, "preset=cpu-tiny", "train.progress=false", "data.num_workers=1"]) == 2
    _one_line_error(capsys, str(truncated_gz), "truncated or corrupt")
    assert not (tmp_path / "r").exists()


def test_truncated_jsonl_gz_in_a_stream_names_the_file(truncated_gz):
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from stream_helpers import ByteTok

    from scratchlm.data.stream import StreamLoader, candidates

    cfg = load_config(overrides=[f"data.source={truncated_gz}", "data.stream=true"])
    with pytest.raises(DataError, match=f"'{truncated_gz}' is truncated or corrupt"):
        loader = StreamLoader(candidates(cfg.data), ByteTok(), 2, 16, workers=0, verbose=False)
        for _ in range(10_000):
            loader.next_batch()


def test_stream_worker_errors_name_the_source(monkeypatch):
    """An unexpected error in a worker (not a DataError of a reader) still says which source it read."""
    from scratchlm.corpus import JsonlSource
    from scratchlm.data import stream_worker

    class Exploding(JsonlSource):  # a path that is no path: an AttributeError inside the reader
        description = "exploding.jsonl (jsonl, field 'text')"

    sent = []
    monkeypatch.setattr(stream_worker, "_send", lambda out, chunk, stop, parent: sent.append(chunk) or True)
    args = (
        Exploding([None]),
        ("object", CharTokenizer.train(DOCS)),
        {"epoch": 0, "pos": None, "idx": 0},
        0,
        1,
        0,
        1,
    )
    stream_worker._worker_main(args, None, None, os.getpid())
    assert sent and sent[0][0][0] == "error" and "exploding.jsonl" in sent[0][0][1], sent


def test_stream_workers_are_bounded(tmp_path):
    with pytest.raises(ConfigError, match=r"data.stream_workers must be in \[0, 64\], got 100000"):
        load_config(overrides=["data.stream_workers=100000"])


def test_a_failed_worker_start_closes_the_workers_already_started(tmp_path, monkeypatch):
    from scratchlm.data import stream

    started, closed = [], []

    class FakeProducer:
        def __init__(self, ctx, args):
            if len(started) == 3:
                raise OSError(11, "Resource temporarily unavailable")  # fork/semaphore limit reached
            started.append(self)

        def close(self):
            closed.append(self)

    monkeypatch.setattr(stream, "ProcessProducer", FakeProducer)
    s = stream.SourceStream(object.__new__(type("Src", (), {"fingerprint": "x"})), ("file", "t"), 0, 1, 8)
    with pytest.raises(OSError):
        s.launch()
    s.close()  # what StreamLoader._open does on the way out (_close_all)
    assert len(started) == 3 and closed == started


def test_max_tokens_in_float_notation_as_documented(tmp_path):
    assert load_config(overrides=["data.max_tokens=1e9"]).data.max_tokens == 1_000_000_000
    assert load_config(overrides=["data.max_tokens=2.5e9"]).data.max_tokens == 2_500_000_000
    (tmp_path / "c.yaml").write_text("data:\n  max_tokens: 1e9\n")
    assert load_config(tmp_path / "c.yaml").data.max_tokens == 1_000_000_000
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(overrides=["data.max_tokens=1.5"])
    doc = (REPO / "docs" / "streaming.md").read_text()
    assert "data.max_tokens=1e9" in doc  # the spelling the docs use


def test_empty_src_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.de"
    empty.write_text("")
    assert main(["translate", str(tmp_path / "no-run"), "--src-file", str(empty)]) == 2
    _one_line_error(capsys, f"--src-file {empty} is empty")


def test_non_utf8_inputs_name_the_file(tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert main(["translate", str(tmp_path / "no-run"), "--src-file", str(latin)]) == 2
    _one_line_error(capsys, f"--src-file {latin} is not UTF-8 text", "byte 3")
    assert main(["generate", str(tmp_path / "no-run"), "--prompts-file", str(latin)]) == 2
    _one_line_error(capsys, str(latin), "not UTF-8")


def test_resume_of_a_run_without_a_checkpoint_says_how_to_start_over(tmp_path, capsys):
    from scratchlm.config import save_config

    run = tmp_path / "r"
    run.mkdir()
    save_config(load_config(overrides=["preset=cpu-tiny", "train.ckpt_interval=50"]), run / "config.yaml")
    assert main(["train", "--resume", str(run)]) == 2
    _one_line_error(
        capsys, "stopped before its first checkpoint", "every 50 steps", "start it over", str(run)
    )
    assert main(["train", "--resume", str(tmp_path)]) == 2
    _one_line_error(capsys, "not a run directory")


def test_encode_into_a_closed_pipe_exits_quietly(tmp_path, char_tok):
    text = tmp_path / "big.txt"
    text.write_text("the quick brown fox " * 50_000)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "scratchlm", "tokenizer", "encode", "--tokenizer", str(char_tok)]
    p = subprocess.Popen([*cmd, "--file", str(text)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(10)  # what `| head -c 10` reads, then it exits
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0, err
    assert err == ""  # no "Broken pipe; check the path", no "Exception ignored"


@pytest.mark.parametrize("drop", ["tokens_per_s", "loss", "lr"])
def test_plot_and_report_on_records_without_a_field(tmp_path, capsys, drop):
    pytest.importorskip("matplotlib")
    from scratchlm.config import save_config
    from scratchlm.model import build_model
    from scratchlm.train.checkpoint import save_checkpoint
    from scratchlm.train.metrics import plot_run

    run = tmp_path / "run"
    run.mkdir()
    tok = CharTokenizer.train([*DOCS, string.printable])  # (the report samples from a prompt with "\n")
    tiny = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context_length=16"]
    cfg = load_config(overrides=["preset=cpu-tiny", f"model.vocab_size={tok.vocab_size}", *tiny])
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, 5, build_model(cfg.model), {}, {"step": 5}, keep_last=1)
    records = [
        {"kind": "train", "step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens": 100 * s, "tokens_per_s": 9.0}
        for s in range(1, 6)
    ]
    records += [
        {"kind": "eval", "step": 5, "val_loss": 4.1, "val_ppl": 60.3, "train_loss": "oops"},
        {"kind": "stop", "step": 5, "reason": None, "detail": 7},
    ]
    for r in records[:5]:
        r.pop(drop)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert {p.name for p in plot_run(run)} >= {"loss.png", "throughput.png", "lr.png"}
    assert main(["plot", str(run)]) == 0
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert "error" not in capsys.readouterr().err
    assert (run / "report" / "report.md").is_file()
