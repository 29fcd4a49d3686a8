"""HTTP server on 127.0.0.1 (port 0, a thread) around a tiny model: each endpoint, greedy output over HTTP
equal to LoadedModel.generate, streamed deltas equal to the non-streamed text, each error class, and
`scratchlm serve` on a run directory."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from scratchlm.api import LoadedModel
from scratchlm.cli import main
from scratchlm.config import Config, ModelConfig, save_config
from scratchlm.inference import server as server_module
from scratchlm.inference.server import GenerationServer
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator
from scratchlm.train.checkpoint import save_checkpoint

TEXTS = [
    "hello world, hello there",
    "the quick brown fox jumps",
    "def main():\n    return 0\n",
    "naïve café ü",
] * 3
TIMEOUT = 10  # seconds, for every request


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread (on a busy 2-core machine, 2 threads make each forward far slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lm():
    tok = train_bpe_from_iterator(TEXTS, vocab_size=280, progress=False)
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
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # larger weights: varied greedy output
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return LoadedModel(model.eval(), tok, cfg, Path("runs/tiny/checkpoints/step_00000001"), Path("runs/tiny"))


@pytest.fixture(scope="module")
def server(lm):
    srv = GenerationServer(lm, host="127.0.0.1", port=0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)


def request(
    server, path: str, body: bytes | dict | None = None, method: str | None = None
) -> tuple[int, dict, str]:
    """(status, headers, body text) of one request; HTTP errors are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(server.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read().decode()


def test_binds_to_loopback(server):
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0


def test_health_and_info(server, lm):
    status, headers, text = request(server, "/health")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(text) == {"status": "ok", "model": "tiny"}
    status, _, text = request(server, "/info")
    info = json.loads(text)
    assert status == 200
    assert info["vocab_size"] == lm.tokenizer.vocab_size == 280
    assert info["context_length"] == 48 and info["arch"] == "gpt"
    assert info["params"] == sum(p.numel() for p in lm.model.parameters())
    assert info["config"]["n_layer"] == 2 and info["config"]["pos"] == "rope"


def test_greedy_over_http_equals_python_api(server, lm):
    opts = {"max_new_tokens": 20, "temperature": 0}
    status, _, text = request(server, "/generate", {"prompt": "hello", **opts})
    out = json.loads(text)
    assert status == 200 and set(out) == {"completions", "seconds"} and out["seconds"] >= 0
    (c,) = out["completions"]
    assert c["text"] and c["text"] == lm.generate("hello", **opts)
    assert c["prompt_tokens"] == len(lm.tokenizer.encode("hello"))
    assert c["new_tokens"] == len(lm.engine.generate("hello", **opts)[0].token_ids)
    assert c["finish_reason"] in ("stop", "length")
    # a batch: one completion per prompt, in order, each equal to the Python API's
    prompts = ["def ", "the quick", "naïve"]
    _, _, text = request(server, "/generate", {"prompts": prompts, **opts, "stop": ["\n"]})
    got = [c["text"] for c in json.loads(text)["completions"]]
    assert got == [lm.generate(p, **opts, stop=["\n"]) for p in prompts]


def test_seeded_sampling_is_reproducible_over_http(server, lm):
    body = {
        "prompt": "the",
        "max_new_tokens": 15,
        "temperature": 1.0,
        "top_k": 40,
        "top_p": 0.9,
        "seed": 3,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
        "min_p": 0.01,
    }
    a = json.loads(request(server, "/generate", body)[2])["completions"][0]["text"]
    b = json.loads(request(server, "/generate", body)[2])["completions"][0]["text"]
    ref = lm.generate("the", **{k: v for k, v in body.items() if k != "prompt"})
    assert a == b == ref


def read_sse(resp) -> list[str]:
    """The data fields of a Server-Sent Events stream, in order."""
    events = []
    for block in resp.read().decode().split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            events.append(block[len("data: ") :])
    return events


@pytest.mark.parametrize("prompt", ["hello", "naïve"])
def test_stream_deltas_concatenate_to_the_text(server, lm, prompt):
    body = {"prompt": prompt, "max_new_tokens": 25, "temperature": 0}
    expected = json.loads(request(server, "/generate", body)[2])["completions"][0]["text"]
    req = urllib.request.Request(server.url + "/generate", data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        events = read_sse(resp)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["delta"] for e in events[:-1]]
    assert len(deltas) > 1 and all(deltas)
    assert (
        "".join(deltas) == expected == lm.generate(prompt, **{k: v for k, v in body.items() if k != "prompt"})
    )


def test_client_leaving_a_stream_frees_the_model(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    conn.request(
        "POST",
        "/generate",
        json.dumps({"prompt": "hello", "max_new_tokens": 40, "temperature": 0, "stream": True}),
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()  # gone mid-stream
    status, _, text = request(server, "/generate", {"prompt": "def ", "max_new_tokens": 5, "temperature": 0})
    assert status == 200 and json.loads(text)["completions"][0]["new_tokens"] >= 1


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "a", "temperature": NaN}', "not valid JSON"),
        ({"prompt": "a", "temprature": 0.5}, "unknown field 'temprature'"),
        ({"prompt": 3}, "'prompt' must be a string"),
        ({"prompts": []}, "non-empty list"),
        ({"prompt": "a", "prompts": ["b"]}, "exactly one of"),
        ({"max_new_tokens": 3}, "exactly one of"),
        ({"prompt": "a", "max_new_tokens": "5"}, "'max_new_tokens' must be an integer"),
        ({"prompt": "a", "max_new_tokens": 2.5}, "'max_new_tokens' must be an integer"),
        ({"prompt": "a", "temperature": True}, "'temperature' must be a number"),
        ({"prompt": "a", "stream": "yes"}, "'stream' must be true or false"),
        ({"prompt": "a", "stop": [1]}, "'stop' must be a string or a list"),
        ({"prompts": ["a", "b"], "stream": True}, "streaming takes one"),
        ({"prompt": "a", "top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"prompt": "a", "temperature": -1}, "temperature must be >= 0"),
        ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"prompt": "a", "context": "wrap", "max_new_tokens": 2}, "context='wrap'"),
        ({"prompt": "hello " * 40, "max_new_tokens": 10}, "exceeds the model's context_length 48"),
        (
            {"prompt": "hello " * 40, "max_new_tokens": 10, "stream": True},
            "exceeds the model's context_length 48",
        ),
        # values that used to crash generation (HTTP 500): overflowing seed, inf/NaN logits
        ({"prompt": "a", "seed": 2**70}, "seed must be in [0, 2**64)"),
        ({"prompt": "a", "seed": -1}, "seed must be in [0, 2**64)"),
        ({"prompt": "a", "repetition_penalty": 1e-40}, "repetition_penalty must be in [0.01, 100]"),
        ({"prompt": "a", "frequency_penalty": -1e38}, "frequency_penalty must be in [-100, 100]"),
        ({"prompt": "a", "presence_penalty": 1e300}, "presence_penalty must be in [-100, 100]"),
        (b'{"prompt": "a", "temperature": 1e400}', "'temperature' must be finite"),  # parsed as inf
        # stop_token_ids
        ({"prompt": "a", "stop_token_ids": 3}, "'stop_token_ids' must be a list of token ids"),
        ({"prompt": "a", "stop_token_ids": [1.5]}, "'stop_token_ids' must be a list of token ids"),
        ({"prompt": "a", "stop_token_ids": [True]}, "'stop_token_ids' must be a list of token ids"),
        ({"prompt": "a", "stop_token_ids": [-1]}, "stop_token_ids must be a list of token ids"),
        ({"prompt": "a", "stop_token_ids": [280]}, "stop token id 280 is not in the vocabulary (0..279)"),
        # the server's limits (defaults)
        ({"prompt": "a", "max_new_tokens": 1025}, "max_new_tokens 1025 exceeds this server's limit of 1024"),
        ({"prompts": ["a"] * 65, "max_new_tokens": 1}, "65 prompts exceed this server's limit of 64"),
        # JSON that json.loads refuses with other errors than JSONDecodeError (they were 500s)
        (b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "not valid JSON here"),
        (b'{"prompt": "a", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_bad_requests_are_400_with_a_one_line_error(server, body, fragment):
    status, headers, text = request(server, "/generate", body)
    assert status == 400, text
    assert headers["Content-Type"] == "application/json"
    err = json.loads(text)
    assert list(err) == ["error"] and "\n" not in err["error"] and "Traceback" not in text
    assert fragment in err["error"]


def test_unencodable_prompt_is_400(lm):
    """A character the char tokenizer never saw is the client's error (it was a 500), streamed or not."""
    from scratchlm.tokenizer.char import CharTokenizer

    tok = CharTokenizer.train(["hello world"])
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, context_length=32)
    )
    srv = GenerationServer(LoadedModel(model.eval(), tok, Config(model=model.config), Path("r/best")), port=0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        for body in (
            {"prompt": "caf\u00e9"},
            {"prompt": "caf\u00e9", "stream": True},
            {"prompts": ["h", "\u20ac"]},
        ):
            status, _, text = request(srv, "/generate", {**body, "max_new_tokens": 2})
            assert status == 400, text
            assert json.loads(text)["error"].startswith("char tokenizer") and "Traceback" not in text
        assert request(srv, "/generate", {"prompt": "hello", "max_new_tokens": 2})[0] == 200
        assert json.loads(request(srv, "/health")[2])["model"] == "scratchlm"  # not loaded from a run
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(TIMEOUT)


def test_tiny_temperature_is_greedy_not_a_500(server, lm):
    body = {"prompt": "hello", "max_new_tokens": 12, "temperature": 1e-40, "seed": 0}
    status, _, text = request(server, "/generate", body)
    assert status == 200, text
    assert json.loads(text)["completions"][0]["text"] == lm.generate(
        "hello", max_new_tokens=12, temperature=0
    )


def test_stop_token_ids_over_http(server, lm):
    opts = {"max_new_tokens": 12, "temperature": 0, "stop_token_ids": []}
    free = lm.engine.generate("hello", **opts)[0].token_ids  # no stop token at all
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a token first seen at step k
    status, _, text = request(server, "/generate", {"prompt": "hello", **opts, "stop_token_ids": [free[k]]})
    (c,) = json.loads(text)["completions"]
    assert status == 200 and c["finish_reason"] == "stop" and c["new_tokens"] == k
    assert c["text"] == lm.generate("hello", **{**opts, "stop_token_ids": [free[k]]})
    status, _, text = request(server, "/generate", {"prompt": "hello", **opts, "stop_token_ids": None})
    assert status == 200  # null = the tokenizer's end-of-text


@pytest.fixture(scope="module")
def small_server(lm):
    """A server with low limits: 16 new tokens and 2 prompts per request."""
    srv = GenerationServer(lm, host="127.0.0.1", port=0, max_new_tokens_limit=16, max_batch=2)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(TIMEOUT)


def test_server_limits(small_server):
    def gen(body):
        status, _, text = request(small_server, "/generate", body)
        return status, json.loads(text)

    status, out = gen({"prompt": "a", "max_new_tokens": 17, "temperature": 0})
    assert status == 400 and out["error"].startswith("max_new_tokens 17 exceeds this server's limit of 16")
    status, out = gen({"prompt": "a", "max_new_tokens": 17, "temperature": 0, "stream": True})
    assert status == 400 and "limit of 16" in out["error"]
    status, out = gen({"prompts": ["a", "b"], "max_new_tokens": 16, "temperature": 0, "stop_token_ids": []})
    assert status == 200 and [c["new_tokens"] for c in out["completions"]] == [16, 16]
    # without max_new_tokens the default (128) is lowered to the limit
    status, out = gen({"prompt": "a", "temperature": 0, "stop_token_ids": []})
    assert status == 200 and out["completions"][0]["new_tokens"] == 16
    status, out = gen({"prompts": ["a", "b", "c"], "max_new_tokens": 1})
    assert status == 400 and "3 prompts exceed this server's limit of 2" in out["error"]
    _, _, text = request(small_server, "/info")
    assert json.loads(text)["limits"] == {"max_new_tokens": 16, "max_batch": 2}
    with pytest.raises(ValueError, match="max_batch"):
        GenerationServer(small_server.lm, port=0, max_batch=0)


def test_not_found_method_and_too_large(server):
    status, _, text = request(server, "/nope")
    assert status == 404 and "/nope" in json.loads(text)["error"]
    status, headers, text = request(server, "/generate")  # GET on a POST endpoint
    assert status == 405 and headers["Allow"] == "POST, OPTIONS" and json.loads(text)["error"]
    status, headers, text = request(server, "/health", method="PUT")  # no endpoint takes PUT
    assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS" and json.loads(text)["error"]
    big = b'{"prompt": "' + b"a" * (1 << 20) + b'"}'
    status, _, text = request(server, "/generate", big)
    assert status == 413 and "exceeds the limit" in json.loads(text)["error"]
    # the server is still fine afterwards
    assert request(server, "/health")[0] == 200


def test_malformed_request_line_gets_json(server):
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        reply = s.makefile("rb").read().decode()
    assert reply.split(" ")[1] == "400" and '{"error": ' in reply


def test_server_error_is_500_without_traceback(server, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.engine, "generate", broken)  # the engine's path ("context": "slide")
    monkeypatch.setattr(server.batcher, "_sample_row", broken)  # the batcher's (every other request)
    for body in ({"context": "slide"}, {}):
        status, _, text = request(server, "/generate", {"prompt": "a", "max_new_tokens": 2, **body})
        assert status == 500
        assert json.loads(text) == {"error": "internal server error (see the server log)"}
        assert "secret" not in text
        assert "RuntimeError: secret internal detail" in capsys.readouterr().err  # logged for the operator
    monkeypatch.undo()
    assert request(server, "/generate", {"prompt": "a", "max_new_tokens": 2})[0] == 200  # still serving


def test_generation_is_serialised(server, lm):
    """Concurrent requests all succeed and each equals its sequential answer."""
    prompts = ["hello", "def ", "the quick", "naïve"]
    results: dict[str, str] = {}

    def worker(p: str) -> None:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=TIMEOUT)
        conn.request("POST", "/generate", json.dumps({"prompt": p, "max_new_tokens": 12, "temperature": 0}))
        results[p] = json.loads(conn.getresponse().read())["completions"][0]["text"]
        conn.close()

    threads = [threading.Thread(target=worker, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert results == {p: lm.generate(p, max_new_tokens=12, temperature=0) for p in prompts}


def test_cli_serve_on_a_run_directory(tmp_path, lm, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(lm.config, run / "config.yaml")
    lm.tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run, 1, lm.model, {}, {"step": 1}, keep_last=1)
    seen: dict = {}

    def serve_one_request(self, poll_interval=0.5):  # instead of serving forever: answer one /generate
        def client():
            body = json.dumps({"prompt": "hello", "max_new_tokens": 8, "temperature": 0}).encode()
            with urllib.request.urlopen(
                urllib.request.Request(self.url + "/generate", data=body), timeout=TIMEOUT
            ) as r:
                seen["text"] = json.loads(r.read())["completions"][0]["text"]

        t = threading.Thread(target=client)
        t.start()
        self.handle_request()
        t.join(TIMEOUT)
        seen["address"] = self.server_address

    monkeypatch.setattr(GenerationServer, "serve_forever", serve_one_request)
    assert main(["serve", str(run), "--port", "0", "--which", "latest", "--device", "cpu"]) == 0
    assert seen["address"][0] == "127.0.0.1"
    # /health names the run directory, whichever checkpoint is served and however the path is spelled
    from scratchlm.api import load

    monkeypatch.chdir(run)
    for path, which in ((run, "best"), (Path("."), "latest"), (Path("../run/"), "best")):
        srv = GenerationServer(load(path, which=which, device="cpu"), port=0)
        srv.server_close()
        assert srv.model_name == "run"
    assert seen["text"] == lm.generate("hello", max_new_tokens=8, temperature=0)
    assert f"on http://127.0.0.1:{seen['address'][1]}" in capsys.readouterr().out
    assert main(["serve", str(run), "--port", "70000"]) == 2
    capsys.readouterr()
    for flag in ("--max-new-tokens-limit", "--max-batch"):
        assert main(["serve", str(run), "--port", "0", "--device", "cpu", flag, "0"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must be >= 1") and err.count("\n") == 1


def test_cli_serve_passes_the_limits(tmp_path, lm, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_config(lm.config, run / "config.yaml")
    lm.tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run, 1, lm.model, {}, {"step": 1}, keep_last=1)
    seen: dict = {}

    def record(self, poll_interval=0.5):
        seen.update(
            limit=self.max_new_tokens_limit,
            batch=self.max_batch,
            queue=self.batcher.max_queue,
            connections=self.max_connections,
            deadline=self.watchdog.deadline_s,
            key=self.api_key,
        )

    monkeypatch.setattr(GenerationServer, "serve_forever", record)
    monkeypatch.delenv("SCRATCHLM_API_KEY", raising=False)
    args = ["serve", str(run), "--port", "0", "--device", "cpu", "--which", "latest"]
    assert main([*args, "--max-new-tokens-limit", "32", "--max-batch", "4", "--max-queue", "3"]) == 0
    assert (seen["limit"], seen["batch"], seen["queue"]) == (32, 4, 3)
    assert main([*args, "--max-connections", "9", "--request-deadline", "2.5", "--api-key", "k"]) == 0
    assert (seen["connections"], seen["deadline"], seen["key"]) == (9, 2.5, "k")
    monkeypatch.setenv("SCRATCHLM_API_KEY", "from-env")
    assert main(args) == 0  # the CLI's defaults are the server's; the key comes from the environment
    assert seen == {
        "limit": server_module.MAX_NEW_TOKENS_LIMIT,
        "batch": server_module.MAX_BATCH,
        "queue": server_module.MAX_QUEUE,
        "connections": server_module.MAX_CONNECTIONS,
        "deadline": server_module.REQUEST_DEADLINE_S,
        "key": "from-env",
    }
    assert (seen["limit"], seen["batch"], seen["queue"], seen["connections"]) == (1024, 64, 256, 512)
    capsys.readouterr()
    for bad in (["--max-queue", "0"], ["--max-connections", "0"], ["--request-deadline", "0"]):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad[0]} must be") and err.count("\n") == 1
