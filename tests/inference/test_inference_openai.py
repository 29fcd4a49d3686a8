"""The OpenAI API with the real ``openai`` client against a server on 127.0.0.1 (port 0, a thread): models,
completions, chat, streaming (equal to non-streamed at temperature 0), stop strings, max_tokens, n, seed,
log-probabilities checked against the model's own log-softmax, errors in OpenAI's shape, the API key,
16 concurrent clients, and the server's limits (slow client, connection cap, queue, disconnects)."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from scratchlm.api import LoadedModel
from scratchlm.config import Config, ModelConfig
from scratchlm.inference.chat import STOP
from scratchlm.inference.openai_api import render_chat
from scratchlm.inference.server import GenerationServer
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator

openai = pytest.importorskip("openai")

TEXTS = [
    "hello world, hello there",
    "the quick brown fox jumps",
    "def main():\n    return 0\n",
    "naïve café ü",
] * 3
TIMEOUT = 20  # seconds, for every request and join


@pytest.fixture(scope="module")
def lm():
    tok = train_bpe_from_iterator(TEXTS, vocab_size=280, progress=False)
    cfg = Config(
        model=ModelConfig(
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=2,
            d_model=32,
            context_length=64,
            pos="rope",
            norm="rmsnorm",
            mlp="swiglu",
            bias=False,
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # larger weights: varied greedy output
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return LoadedModel(model.eval(), tok, cfg, Path("runs/tiny/checkpoints/step_00000001"), Path("runs/tiny"))


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
    srv = start(lm)
    yield srv
    stop(srv)


def client_for(srv, **kwargs):
    kwargs.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=srv.url + "/v1", timeout=TIMEOUT, max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def greedy(lm, prompt: str, **kw) -> str:
    return lm.generate(prompt, temperature=0, **kw)


def test_models_and_completion_equal_the_python_api(client, lm):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=20, temperature=0)
    ref = lm.engine.generate("hello", max_new_tokens=20, temperature=0)[0]
    assert out.object == "text_completion" and out.model == "tiny" and len(out.choices) == 1
    assert out.choices[0].text == ref.text and out.choices[0].finish_reason == (
        "length" if ref.new_tokens == 20 else "stop"
    )
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode("hello"))
    assert out.usage.completion_tokens == ref.new_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # a list of prompts and token-id prompts; echo
    out = client.completions.create(model="tiny", prompt=["def ", "the quick"], max_tokens=8, temperature=0)
    assert [c.text for c in out.choices] == [greedy(lm, p, max_new_tokens=8) for p in ["def ", "the quick"]]
    ids = lm.tokenizer.encode("naïve")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert out.choices[0].text == "naïve" + greedy(lm, "naïve", max_new_tokens=8)
    # the default max_tokens is OpenAI's 16
    out = client.completions.create(model="tiny", prompt="a", temperature=0, extra_body={"top_k": 1})
    assert out.usage.completion_tokens <= 16


def test_chat_uses_the_plain_transcript(client, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    prompt, stops = render_chat(messages)
    assert prompt == "Be brief.\nUser: hello\nAssistant:" and stops == [STOP]
    ref = lm.generate(prompt, max_new_tokens=20, temperature=0, stop=[STOP]).lstrip()
    msg = out.choices[0].message
    assert out.object == "chat.completion" and msg.role == "assistant" and msg.content == ref
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode(prompt))


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_non_stream_at_temperature_0(client, chat):
    kw = dict(model="tiny", max_tokens=24, temperature=0)
    if chat:
        kw["messages"] = [{"role": "user", "content": "the quick"}]
        full = client.chat.completions.create(**kw)
        chunks = list(
            client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert text == full.choices[0].message.content
    else:
        kw["prompt"] = "the quick"
        full = client.completions.create(**kw)
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full.choices[0].text
    assert len(chunks) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 5, "stream": True}),
    )
    resp = conn.getresponse()
    events = [b for b in resp.read().decode().split("\n\n") if b]
    conn.close()
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_stop_strings_and_max_tokens(client, lm):
    free = greedy(lm, "hello", max_new_tokens=30, stop_token_ids=[])
    stop_at = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i].strip())
    stop_string = free[stop_at]
    for stream in (False, True):
        kw = dict(
            model="tiny", prompt="hello", max_tokens=30, temperature=0, stop=[stop_string], extra_body={}
        )
        if stream:
            chunks = list(client.completions.create(**kw, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(**kw)
            text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert text == free[:stop_at] and reason == "stop"
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens <= 5
    if out.choices[0].finish_reason == "length":
        assert out.usage.completion_tokens == 5


def test_n_seed_and_logprobs(client, lm):
    kw = dict(model="tiny", prompt="the", max_tokens=10, temperature=1.0, seed=7, n=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # the n samples differ (seed + i)
    # the first choice is the Python API's sample with the same seed
    assert a.choices[0].text == lm.generate("the", max_new_tokens=10, temperature=1.0, seed=7)
    # log-probabilities: the model's log-softmax at each step, the top ones in order
    out = client.completions.create(model="tiny", prompt="the", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    ids = lm.tokenizer.encode("the")
    new = lm.engine.generate("the", max_new_tokens=6, temperature=0)[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(torch.tensor([ids + new]))[0][0].float(), -1)
    expected = [float(ref[len(ids) - 1 + i, t]) for i, t in enumerate(new)]
    assert lp.token_logprobs[: len(new)] == pytest.approx(expected, abs=1e-4)
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):  # keyed by token text: equal texts merge
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-4)
    assert "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


@pytest.mark.parametrize(
    "kwargs, status, fragment",
    [
        ({"model": "nope", "prompt": "a"}, 404, "does not exist"),
        ({"model": "tiny", "prompt": 3}, 400, "'prompt' must be"),
        ({"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "'max_tokens' must be an integer"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 5000}, 400, "exceeds this server's limit"),
        ({"model": "tiny", "prompt": "a", "temperature": "hot"}, 400, "'temperature' must be a number"),
        ({"model": "tiny", "prompt": "a", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
        ({"model": "tiny", "prompt": "a", "n": 0}, 400, "'n' must be in"),
        ({"model": "tiny", "prompt": "a", "stop": [3]}, 400, "'stop' must be"),
        ({"model": "tiny", "prompt": "a", "logprobs": 50}, 400, "at most 20"),
        ({"model": "tiny", "prompt": "a", "suffix": "x"}, 400, "unrecognized request argument 'suffix'"),
        (
            {"model": "tiny", "prompt": "hello " * 80, "max_tokens": 10},
            400,
            "exceeds the model's context_length 64",
        ),
        ({"model": "tiny", "prompt": [[1, 2, 99999]]}, 400, "outside the vocabulary"),
    ],
)
def test_bad_completion_requests_are_4xx_in_the_openai_shape(client, kwargs, status, fragment):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(
            **{k: v for k, v in kwargs.items() if k in ("model", "prompt")},
            extra_body={k: v for k, v in kwargs.items() if k not in ("model", "prompt")},
        )
    e = info.value
    assert e.status_code == status
    err = e.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"]
    assert "\n" not in err["message"] and "Traceback" not in e.response.text


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1]", 400, "JSON object"),
        (b'{"model": "tiny", "messages": []}', 400, "'messages' must be"),
        (b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}', 400, "role"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', 400, "content must be"),
        (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": []}', 400, "'tools'"),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            400,
            "'stream'",
        ),
        (
            b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": '
            + b"9" * 5000
            + b"}",
            400,
            "not valid JSON",
        ),
        (b'{"model": "tiny", "messages": "' + b"a" * (1 << 20) + b'"}', 413, "exceeds the limit"),
    ],
)
def test_malformed_and_oversized_chat_requests(server, body, status, fragment):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", body)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == status, text
    err = json.loads(text)["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error" and "Traceback" not in text


def test_api_key(lm):
    srv = start(lm, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client_for(srv, api_key="wrong").models.list()
        assert [m.id for m in client_for(srv, api_key="s3cret").models.list().data] == ["tiny"]
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=TIMEOUT)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200  # health checks need no key
        conn.close()
    finally:
        stop(srv)


def test_sixteen_concurrent_clients_are_batched_and_all_served(lm):
    srv = start(lm, max_batch=16)
    prompts = [f"{w} {i}" for i, w in enumerate(["hello", "the", "def", "naïve"] * 4)]
    got: dict[int, str] = {}
    errors: list[Exception] = []
    barrier = threading.Barrier(16, timeout=TIMEOUT)

    def worker(i: int) -> None:
        try:
            c = client_for(srv)
            barrier.wait()
            got[i] = (
                c.completions.create(model="tiny", prompt=prompts[i], max_tokens=24, temperature=0)
                .choices[0]
                .text
            )
        except Exception as e:  # reported below
            errors.append(e)

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 3)
        assert not errors and len(got) == 16
        assert [got[i] for i in range(16)] == [greedy(lm, p, max_new_tokens=24) for p in prompts]
        assert srv.batcher.stats.max_rows_in_step > 4  # requests shared decoder steps
        with urllib.request.urlopen(srv.url + "/info", timeout=TIMEOUT) as r:
            batching = json.load(r)["batching"]
        assert (
            batching["requests"] == 16 and batching["max_rows_in_step"] > 4 and batching["active_rows"] == 0
        )
        assert client_for(srv).models.list().data[0].id == "tiny"  # alive afterwards
    finally:
        stop(srv)


# --------------------------------------------------------------------------------------------------------
# the server's limits (issue 20: 12-14)


def test_slow_client_is_cut_off_at_the_request_deadline(lm):
    srv = start(lm, request_deadline_s=1.0)
    try:
        s = socket.create_connection(srv.server_address[:2], timeout=5)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\n")
        start_t, reply = time.monotonic(), b""
        for i in range(40):  # a header line every 0.1 s (each read is quick: the idle timeout never fires)
            try:
                s.sendall(f"X-Slow-{i}: 1\r\n".encode())
            except OSError:
                break
            time.sleep(0.1)
        s.settimeout(3)
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except OSError:
            pass
        s.close()
        elapsed = time.monotonic() - start_t
        assert reply.split(b" ")[1] == b"408" and b"did not arrive within 1 s" in reply
        assert elapsed < 8
        assert client_for(srv).models.list().data  # still serving
    finally:
        stop(srv)


def test_connection_cap_answers_503_and_backlog_fits(lm):
    srv = start(lm, max_connections=4)
    assert srv.request_queue_size >= srv.max_connections
    if shutil.which("ss"):  # the kernel's backlog of the listening socket (ss: Send-Q of a LISTEN socket)
        port = srv.server_address[1]
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=5)
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        assert int(out.stdout.split()[2]) == min(srv.request_queue_size, somaxconn) > 5  # Python's default: 5
    idle = [socket.create_connection(srv.server_address[:2], timeout=5) for _ in range(4)]
    try:
        deadline = time.monotonic() + 5
        while srv._connections < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as info:
            client_for(srv).models.list()
        assert (
            info.value.status_code == 503
            and "limit of 4 connections" in info.value.response.json()["error"]["message"]
        )
        for s in idle:
            s.close()
        deadline = time.monotonic() + 5
        while srv._connections > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client_for(srv).models.list().data  # room again
    finally:
        for s in idle:
            s.close()
        stop(srv)


def test_full_queue_answers_503(lm, monkeypatch):
    srv = start(lm, max_batch=1, max_queue=1)
    gate, step = threading.Event(), srv.batcher._step

    def held_step():  # the scheduler waits at the gate: requests stay queued
        gate.wait(TIMEOUT)
        step()

    monkeypatch.setattr(srv.batcher, "_step", held_step)
    result: dict = {}

    def first() -> None:
        result["text"] = (
            client_for(srv).completions.create(model="tiny", prompt="hello", max_tokens=4).choices[0].text
        )

    waiting = threading.Thread(target=first)
    try:
        waiting.start()
        deadline = time.monotonic() + 5
        while srv.batcher.queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.APIStatusError) as info:
            client_for(srv).completions.create(model="tiny", prompt="a", max_tokens=2)
        assert (
            info.value.status_code == 503 and "retry later" in info.value.response.json()["error"]["message"]
        )
        assert info.value.response.headers["Retry-After"] == "1"
        gate.set()
        waiting.join(TIMEOUT)
        assert "text" in result  # the queued request is served once the scheduler moves
    finally:
        gate.set()
        stop(srv)


def test_disconnecting_clients_free_their_rows_without_tracebacks(lm, capfd):
    srv = start(lm, max_batch=16)
    try:
        for i in range(12):  # send a request and leave before the answer, streamed or not
            s = socket.create_connection(srv.server_address[:2], timeout=5)
            body = json.dumps(
                {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 60, "stream": i % 2 == 0}
            ).encode()
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
            if i % 4 == 0:
                s.recv(64)  # leave mid-stream
            s.close()
        deadline = time.monotonic() + 10
        while (srv.batcher.active_rows or srv.batcher.queued) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.batcher.active_rows == 0 and srv.batcher.queued == 0
        assert srv.batcher.stats.cancelled_rows > 0  # some left before their rows had finished
        assert client_for(srv).completions.create(model="tiny", prompt="a", max_tokens=3).choices
    finally:
        stop(srv)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err.replace("(BrokenPipeError)", "")


def test_models_retrieve_with_the_client(client, server):
    model = client.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "scratchlm")
    assert model.created == server.created
    assert model == client.models.list().data[0]  # the same object as in the list
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4")
    error = info.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model" and "'gpt-4'" in error["message"]
    assert info.value.code == "model_not_found"  # the client read OpenAI's shape


def test_lowercase_bearer_scheme_is_accepted(lm):
    srv = start(lm, api_key="s3cret")
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=TIMEOUT)
        for scheme in ("bearer", "BEARER", "Bearer"):
            conn.request("GET", "/v1/models", headers={"Authorization": f"{scheme} s3cret"})
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["data"][0]["id"] == "tiny"
        conn.close()
    finally:
        stop(srv)
