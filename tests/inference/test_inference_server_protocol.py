"""The server's HTTP surface beyond the happy path (issue 29), on 127.0.0.1 only: every method answered in the
right shape (405 + Allow, OPTIONS 204, HEAD without a body, an unknown method 501), the bearer scheme in any
case, a burst over --max-connections all answered 503, and shutdown: requests in flight get 503, every
thread the server started is joined, the engine path is cancelled rather than waited for."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from scratchlm.api import LoadedModel
from scratchlm.config import Config, ModelConfig
from scratchlm.inference.http_errors import error_body, raw_error_response
from scratchlm.inference.server import GenerationServer
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator

TEXTS = ["hello world, hello there", "the quick brown fox jumps", "def main():\n    return 0\n"] * 3
TIMEOUT = 20  # seconds, for every socket operation and join


@pytest.fixture(scope="module")
def lm():
    tok = train_bpe_from_iterator(TEXTS, vocab_size=270, progress=False)
    cfg = Config(
        model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, context_length=48)
    )
    torch.manual_seed(0)
    return LoadedModel(build_model(cfg.model).eval(), tok, cfg, Path("runs/tiny/best"), Path("runs/tiny"))


def start(lm, **kwargs) -> GenerationServer:
    srv = GenerationServer(lm, host="127.0.0.1", port=0, **kwargs)
    srv.thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    srv.thread.start()
    return srv


def stop(srv: GenerationServer) -> None:
    srv.shutdown()
    srv.server_close()
    srv.thread.join(TIMEOUT)


@pytest.fixture(scope="module")
def server(lm):
    srv = start(lm, api_key="k3y")
    yield srv
    stop(srv)


def exchange(srv, raw: bytes, half_close: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes on a fresh connection, read until the server closes: (status, headers, body).

    ``half_close``: shut the write side after the request (the server answers, then reads end-of-file and
    closes); else the request must say ``Connection: close``."""
    with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as s:
        s.sendall(raw)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(1 << 16):
            reply += chunk
    return parse(reply)


def parse(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def req(method: str, path: str, body: bytes = b"", auth: str | None = "Bearer k3y") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if auth:
        head += f"Authorization: {auth}\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


# ---------------------------------------------------------------------------------------------------------
# methods


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "TRACE"])
def test_other_methods_are_405_with_allow_in_the_shape_of_the_path(server, method):
    status, headers, body = exchange(server, req(method, "/v1/completions", b'{"x": 1}'))
    assert status == 405 and headers["Allow"] == "POST, OPTIONS"
    assert json.loads(body) == error_body(405, f"/v1/completions takes POST, not {method}", openai=True)
    status, headers, body = exchange(server, req(method, "/health"))
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"
    assert json.loads(body) == {"error": f"/health takes GET, not {method}"}
    status, _, body = exchange(server, req(method, "/v1/nope"))
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_an_unknown_method_is_501_in_the_shape_of_the_path(server):
    status, _, body = exchange(server, req("BREW", "/v1/models"))
    err = json.loads(body)["error"]
    assert status == 501 and err["type"] == "server_error" and "'BREW' is not supported" in err["message"]
    status, _, body = exchange(server, req("BREW", "/generate"))
    assert status == 501 and "'BREW' is not supported" in json.loads(body)["error"]


def test_options_is_204_with_allow_and_no_body(server):
    for path, allow in (("/v1/chat/completions", "POST, OPTIONS"), ("/info", "GET, HEAD, OPTIONS")):
        status, headers, body = exchange(server, req("OPTIONS", path, auth=None))
        assert (status, headers["Allow"], body) == (204, allow, b"")
        assert "Content-Length" not in headers  # RFC 9110: none on a 204
    status, headers, _ = exchange(server, req("OPTIONS", "*", auth=None))
    assert status == 204 and headers["Allow"] == "GET, HEAD, POST, OPTIONS"
    assert exchange(server, req("OPTIONS", "/nope"))[0] == 404


def test_head_answers_the_get_headers_without_a_body(server):
    _, get_headers, get_body = exchange(server, req("GET", "/health", auth=None))
    status, headers, body = exchange(server, req("HEAD", "/health", auth=None))
    assert status == 200 and body == b""
    assert headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))
    status, _, body = exchange(server, req("HEAD", "/v1/models", auth="Bearer wrong"))
    assert status == 401 and body == b""
    status, headers, body = exchange(server, req("HEAD", "/generate"))
    assert status == 405 and headers["Allow"] == "POST, OPTIONS" and body == b""


def test_an_unread_body_closes_the_connection_instead_of_becoming_the_next_request(server):
    # a 405 does not read the body: were the connection kept, '{"GET /health ...' would be parsed next
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(server.server_address[:2], timeout=TIMEOUT) as s:
        s.sendall(req("DELETE", "/generate", smuggled))
        reply = b""
        while chunk := s.recv(1 << 16):
            reply += chunk
    assert reply.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in reply
    assert parse(reply)[0] == 405


# ---------------------------------------------------------------------------------------------------------
# authorization


@pytest.mark.parametrize("auth", ["Bearer k3y", "bearer k3y", "BEARER k3y", "  bEaReR   k3y  "])
def test_the_bearer_scheme_is_case_insensitive(server, auth):
    status, _, body = exchange(server, req("GET", "/v1/models", auth=auth))
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("auth", [None, "Basic k3y", "Bearer", "Bearer k3yy", "k3y", "Bearerk3y"])
def test_a_wrong_or_missing_key_is_401_with_www_authenticate(server, auth):
    status, headers, body = exchange(server, req("GET", "/v1/models", auth=auth))
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    status, _, body = exchange(server, req("GET", "/info", auth=auth))
    assert status == 401 and json.loads(body)["error"].startswith("missing or wrong API key")


# ---------------------------------------------------------------------------------------------------------
# the connection cap


def test_a_burst_over_the_connection_cap_gets_503_on_every_connection(lm):
    """8 connections held open (the cap), then 100 at once: each gets a whole 503 in its path's shape."""
    srv = start(lm, max_connections=8)
    held = [socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) for _ in range(8)]
    burst: list[socket.socket] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while srv._connections < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv._connections == 8
        t0 = time.monotonic()
        burst = [socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) for _ in range(100)]
        for i, s in enumerate(burst):  # every request sent before any answer is read
            s.sendall(req("GET", "/v1/models" if i % 2 else "/health", auth=None))
        replies = []
        for s in burst:
            reply = b""
            while chunk := s.recv(1 << 16):  # a reset (no answer) raises here
                reply += chunk
            replies.append(reply)
        elapsed = time.monotonic() - t0
        for i, reply in enumerate(replies):
            assert reply, f"connection {i} was closed without a response"
            status, headers, body = parse(reply)
            assert status == 503 and headers["Retry-After"] == "1" and headers["Connection"] == "close"
            message = "the server is at its limit of 8 connections; retry later"
            assert json.loads(body) == error_body(503, message, openai=i % 2 == 1)
        assert elapsed < 15
        assert srv.rejecter.answered >= 100
        for s in held:
            s.close()
        deadline = time.monotonic() + TIMEOUT
        while srv._connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exchange(srv, req("GET", "/health", auth=None))[0] == 200  # room again
    finally:
        for s in held + burst:
            s.close()
        stop(srv)


def test_raw_error_response_takes_the_shape_and_method_of_the_request_line():
    full = raw_error_response(503, "busy", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    status, headers, body = parse(full)
    assert status == 503 and json.loads(body) == error_body(503, "busy", openai=True)
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(parse(raw_error_response(503, "busy", b"GET /info HTTP/1.1\r\n"))[2]) == {
        "error": "busy"
    }
    assert json.loads(parse(raw_error_response(503, "busy", b""))[2]) == {"error": "busy"}  # nothing came
    assert parse(raw_error_response(503, "busy", b"HEAD /health HTTP/1.1\r\n"))[2] == b""


# ---------------------------------------------------------------------------------------------------------
# shutdown


def test_server_close_answers_requests_in_flight_503_and_joins_every_thread(lm):
    srv = start(lm, max_new_tokens_limit=100_000)
    before = {t for t in threading.enumerate() if t.name.startswith("scratchlm-")}
    step = srv.batcher._step

    def held_step():  # the batcher's request stays queued until the server closes
        deadline = time.monotonic() + TIMEOUT
        while not srv.closing.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        step()

    srv.batcher._step = held_step
    replies: dict[str, bytes] = {}

    def client(name: str, raw: bytes) -> None:
        with socket.create_connection(srv.server_address[:2], timeout=TIMEOUT) as s:
            s.sendall(raw)
            reply = b""
            while chunk := s.recv(1 << 16):
                reply += chunk
            replies[name] = reply

    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 8}).encode()
    # the engine's own path ("context": "slide"): far more tokens than would finish before the close
    engine = json.dumps({"prompt": "hello", "context": "slide", "max_new_tokens": 100_000}).encode()
    idle = socket.create_connection(srv.server_address[:2], timeout=TIMEOUT)  # a kept-alive idle client
    threads = [
        threading.Thread(target=client, args=("batcher", req("POST", "/v1/completions", body, auth=None))),
        threading.Thread(target=client, args=("engine", req("POST", "/generate", engine, auth=None))),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT
    while (srv.batcher.queued < 1 or not srv.lock.locked()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.batcher.queued == 1 and srv.lock.locked()  # both requests are being served
    t0 = time.monotonic()
    srv.shutdown()
    srv.server_close()
    closed_in = time.monotonic() - t0
    for t in threads:
        t.join(TIMEOUT)
    idle.settimeout(TIMEOUT)
    assert idle.recv(1) == b""  # the idle connection was closed
    idle.close()
    status, _, answer = parse(replies["batcher"])
    assert status == 503 and json.loads(answer) == error_body(
        503, "the server is shutting down; retry later", openai=True
    )
    status, _, answer = parse(replies["engine"])
    assert status == 503 and json.loads(answer) == {"error": "the server is shutting down; retry later"}
    assert closed_in < 10  # the 100,000-token generation was cancelled, not waited for
    left = {t for t in threading.enumerate() if t.name.startswith("scratchlm-")} - before
    assert not left, f"threads still running after server_close: {sorted(t.name for t in left)}"
    srv.thread.join(TIMEOUT)


def test_a_connection_on_a_file_descriptor_over_1024_is_served(lm):
    """select() cannot watch a descriptor >= FD_SETSIZE (1024): the check for a departed client must not
    take such a connection for gone (its request was cancelled and never answered)."""
    resource = pytest.importorskip("resource")
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("the open-file limit is under 1200")
    srv = start(lm)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # push new descriptors past 1024
    try:
        for stream in (False, True):  # a stream's [DONE] is sent only to a client still there
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": stream}
            raw = req("POST", "/v1/completions", json.dumps(body).encode(), auth=None)
            raw = raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            status, _, answer = exchange(srv, raw, half_close=False)
            assert status == 200
            assert answer.rstrip().endswith(b"data: [DONE]") if stream else json.loads(answer)["choices"]
    finally:
        for fd in filler:
            os.close(fd)
        stop(srv)
