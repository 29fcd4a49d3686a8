"""`scratchlm serve` stopped under load by Ctrl-C (SIGINT) or SIGTERM exits 0, cleanly (issue 29).

A thread still inside torch when the interpreter exits aborts the process with "terminate called without
an active exception" (exit 134). The server here is loaded with what keeps threads busy: a generation on the
engine's path (``"context": "slide"``, far more tokens than finish before the signal), a streamed completion
on the batcher, requests waiting for the engine's lock and an idle kept-alive connection. After the signal:
exit code 0 within seconds, no abort and no traceback on stderr, and every client gets an end (the streams an
error event saying the server is shutting down, the others a 503 or a closed connection), none hangs.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import scratchlm
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint

TIMEOUT = 60  # seconds: server start on a busy machine, every socket read

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("serve") / "shutdown"
    run.mkdir()
    tok = train_bpe_from_iterator(["hello world, hello there", "the quick brown fox"] * 3, vocab_size=270)
    cfg = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=128, context_length=64)
    )
    torch.manual_seed(0)
    save_config(cfg, run / "config.yaml")
    tok.save(run / "tokenizer.json")
    save_checkpoint(run, 1, build_model(cfg.model), {}, {"step": 1}, keep_last=1)
    return run


def post(port: int, path: str, body: dict) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def read_until(s: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = s.recv(4096)
        assert chunk, f"closed before {marker!r}: {got[-300:]!r}"
        got += chunk
    return got


def read_to_end(s: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := s.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return got


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_cleanly_under_load(run_dir, sig):
    src = Path(scratchlm.__file__).resolve().parents[1]  # the code under test, in the child too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a hang below is reported with every thread's traceback
    cmd = [sys.executable, "-m", "scratchlm", "serve", str(run_dir), "--port", "0", "--device", "cpu"]
    cmd += ["--which", "latest", "--max-new-tokens-limit", "100000"]
    proc = subprocess.Popen(  # SIGINT as a terminal's Ctrl-C sends it, even where this suite runs with it
        cmd,  # ignored (a background job of a non-interactive shell, nohup), which the child would inherit
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    clients: list[socket.socket] = []
    try:
        line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (Ctrl-C to stop)"
        assert " on http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])

        engine = post(port, "/generate", {"prompt": "hello", "context": "slide", "max_new_tokens": 100_000,
                                          "stream": True, "stop_token_ids": []})  # fmt: skip
        read_until(engine, b"data: ")  # generating on the engine path (it holds the engine's lock)
        batched = post(port, "/v1/completions", {"model": "shutdown", "prompt": "the", "max_tokens": 60,
                                                 "stream": True})  # fmt: skip
        waiting = [
            post(port, "/generate", {"prompt": "hi", "context": "stop", "max_new_tokens": 5})
            for _ in range(3)
        ]
        idle = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        clients = [engine, batched, *waiting, idle]
        time.sleep(0.3)  # the waiting requests reach the lock
        t0 = time.monotonic()
        proc.send_signal(sig)
        replies = [read_to_end(s) for s in clients]  # none hangs
        try:
            rc = proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:  # say where it stopped: the server's last words and its threads
            proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's traceback on stderr
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(
                f"serve did not exit {TIMEOUT} s after {sig!r}; stderr:\n{proc.stderr.read()[-3000:]}"
            )
        elapsed = time.monotonic() - t0
        err = proc.stderr.read()
    finally:
        for s in clients:
            s.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert rc == 0, f"exit code {rc}; stderr:\n{err[-2000:]}"
    assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
    assert err.rstrip().endswith("stopped")
    assert elapsed < 20  # the 100,000-token generation was cancelled, not waited for
    events = [e for e in replies[0].split(b"\n\n") if e.startswith(b"data: {")]  # headers were read before
    assert json.loads(events[-1][len(b"data: ") :]) == {"error": "the server is shutting down; retry later"}
    # the batcher's stream: finished, or cut with an error event, or (not started yet on a slow machine) a 503
    assert replies[1].startswith(b"HTTP/1.1 503") or b"data: " in replies[1], replies[1][:200]
    for reply in replies[2:5]:  # waited for the lock: answered before the stop, or 503
        assert reply.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")), reply[:200]
    assert replies[5] == b""  # the idle connection was closed
