"""A small HTTP server for a loaded model: standard library only (``http.server``), JSON in and out.

    server = GenerationServer(scratchlm.load("runs/demo"), host="127.0.0.1", port=8000)
    server.serve_forever()        # or: scratchlm serve runs/demo --port 8000

Endpoints (docs/serving.md has curl examples):

- ``GET /health`` -> ``{"status": "ok", "model": NAME}``
- ``GET /info`` -> the model: architecture, config, vocabulary size, context length, parameter count.
- ``POST /generate`` with a JSON object: ``prompt`` (str) or ``prompts`` (list of str), and the sampling
  options of :class:`~scratchlm.inference.sampling.SamplingParams` (``max_new_tokens``, ``temperature``,
  ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``,
  ``stop``, ``stop_token_ids``, ``seed``), ``context`` (window policy: error | slide | stop) and
  ``stream`` (bool). Without streaming the answer is ``{"completions": [{"text", "finish_reason",
  "prompt_tokens", "new_tokens"}], "seconds"}``, one completion per prompt, in order. With
  ``"stream": true`` (one prompt) it is Server-Sent Events: ``data: {"delta": "..."}`` per text delta,
  then ``data: [DONE]``.

Limits per request, so that one client cannot hold the model for long: ``max_new_tokens`` at most
``max_new_tokens_limit`` (default 1024; a request without it gets ``min(128, limit)``) and at most
``max_batch`` prompts (default 64). ``/info`` reports both.

Errors are one-line JSON ``{"error": "..."}``: 400 for a bad request (invalid JSON, unknown field, wrong
type, out-of-range option, over a limit, prompt too long for the context), 404 unknown path, 405 wrong
method, 413 body over 1 MB, 500 for a server bug (generic message to the client, traceback to stderr).
A client never sees a traceback.

There is one model, so generation is serialised by a lock: requests are accepted concurrently (one thread
each) but generate one at a time. A streaming request holds the lock until its stream ends or its client
disconnects (generation then stops). The server binds to 127.0.0.1 by default and has no authentication:
expose it beyond the machine only behind a proxy that adds it.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scratchlm.errors import GenerationError, TokenizerError
from scratchlm.inference.sampling import SamplingParams

MAX_BODY_BYTES = 1 << 20  # 1 MiB
REQUEST_TIMEOUT_S = 60  # a client that sends nothing for this long is dropped
MAX_NEW_TOKENS_LIMIT = 1024  # per request (scratchlm serve --max-new-tokens-limit)
MAX_BATCH = 64  # prompts per request (scratchlm serve --max-batch)

# JSON field -> accepted Python types (bool is excluded from the numeric ones explicitly)
_INT = (int,)
_NUMBER = (int, float)
SAMPLING_FIELDS: dict[str, tuple[type, ...]] = {
    "max_new_tokens": _INT,
    "temperature": _NUMBER,
    "top_k": _INT,
    "top_p": _NUMBER,
    "min_p": _NUMBER,
    "repetition_penalty": _NUMBER,
    "frequency_penalty": _NUMBER,
    "presence_penalty": _NUMBER,
    "seed": _INT,
}
NULLABLE = {"top_k", "seed"}  # null = off / no seed
REQUEST_FIELDS = {"prompt", "prompts", "stop", "stop_token_ids", "stream", "context", *SAMPLING_FIELDS}


class RequestError(Exception):
    """A client error answered with ``status`` and a one-line JSON message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class GenerateRequest:
    """A validated ``POST /generate`` body: prompts, whether to stream, and the engine keyword options."""

    def __init__(self, prompts: list[str], stream: bool, options: dict[str, Any]):
        self.prompts = prompts
        self.stream = stream
        self.options = options


def parse_generate_request(
    body: bytes,
    *,
    max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
    max_batch: int = MAX_BATCH,
    vocab_size: int | None = None,
) -> GenerateRequest:
    """Parse and check a ``/generate`` body; raise :class:`RequestError` (400) naming the first problem.

    Ranges are checked by :class:`SamplingParams` itself (the same rules as the CLI and the Python API);
    this adds the server's limits (module docstring) and, given ``vocab_size``, that every stop token id
    is in the vocabulary.
    """
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON ({_one_line(e)})") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.int_info)
        raise RequestError(400, f"the body is not valid JSON here ({_one_line(e)})") from None
    except RecursionError:
        raise RequestError(400, "the body is not valid JSON here (nested too deeply)") from None
    if not isinstance(data, dict):
        raise RequestError(400, 'the body must be a JSON object, e.g. {"prompt": "Hello"}')
    unknown = sorted(set(data) - REQUEST_FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r} (valid: {', '.join(sorted(REQUEST_FIELDS))})")

    if ("prompt" in data) == ("prompts" in data):
        raise RequestError(400, "give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise RequestError(400, "'prompt' must be a string")
        prompts = [data["prompt"]]
    else:
        prompts = data["prompts"]
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
            raise RequestError(400, "'prompts' must be a non-empty list of strings")
        if len(prompts) > max_batch:
            raise RequestError(
                400,
                f"{len(prompts)} prompts exceed this server's limit of {max_batch} per request; split them",
            )

    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false")
    if stream and len(prompts) != 1:
        raise RequestError(400, "streaming takes one 'prompt'; send 'prompts' without \"stream\": true")

    options: dict[str, Any] = {}
    for name, types in SAMPLING_FIELDS.items():
        if name not in data:
            continue
        value = data[name]
        if value is None and name in NULLABLE:
            options[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types is _INT else "a number"
            raise RequestError(400, f"'{name}' must be {kind}, got {json.dumps(value)[:40]}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(400, f"'{name}' must be finite, got {value}")
        options[name] = value
    if "stop" in data:
        stop = data["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise RequestError(400, "'stop' must be a string or a list of strings")
        options["stop"] = stop
    if "stop_token_ids" in data:
        ids = data["stop_token_ids"]
        if ids is not None and not (
            isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise RequestError(400, "'stop_token_ids' must be a list of token ids (integers) or null")
        options["stop_token_ids"] = ids
    try:
        params = SamplingParams.from_kwargs(**options)  # range checks, one line each
    except GenerationError as e:
        raise RequestError(400, str(e)) from None
    if "max_new_tokens" not in options:
        options["max_new_tokens"] = min(params.max_new_tokens, max_new_tokens_limit)
    elif params.max_new_tokens > max_new_tokens_limit:
        raise RequestError(
            400,
            f"max_new_tokens {params.max_new_tokens} exceeds this server's limit of {max_new_tokens_limit}; "
            "ask for fewer",
        )
    if vocab_size is not None:
        for t in params.stop_token_ids or []:
            if t >= vocab_size:
                raise RequestError(400, f"stop token id {t} is not in the vocabulary (0..{vocab_size - 1})")
    if "context" in data:
        if not isinstance(data["context"], str):
            raise RequestError(400, '\'context\' must be one of "error", "slide", "stop"')
        options["context"] = data["context"]  # the engine checks the value
    return GenerateRequest(prompts, stream, options)


def _reject_constant(name: str) -> None:
    raise RequestError(400, f"the body is not valid JSON ({name} is not a JSON number)")


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class GenerationServer(ThreadingHTTPServer):
    """An HTTP server around one loaded model (``scratchlm.api.LoadedModel`` or anything with ``.engine``,
    ``.model``, ``.tokenizer``, ``.config``). Port 0 picks a free port (see :attr:`url`)."""

    daemon_threads = True  # a hung client never keeps the process alive at exit

    def __init__(
        self,
        lm,
        host: str = "127.0.0.1",
        port: int = 8000,
        name: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_new_tokens_limit: int = MAX_NEW_TOKENS_LIMIT,
        max_batch: int = MAX_BATCH,
    ):
        for option, value in (("max_new_tokens_limit", max_new_tokens_limit), ("max_batch", max_batch)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        self.lm = lm
        self.engine = lm.engine
        run_dir = getattr(lm, "run_dir", None)  # "runs/x", "." and "/tmp/x/" all name the run by its folder
        self.model_name = name or (Path(run_dir).resolve().name if run_dir is not None else "scratchlm")
        self.max_body_bytes = max_body_bytes
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_batch = max_batch
        self.lock = threading.Lock()  # one model: one generation at a time
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        """The ``/info`` answer: what is being served."""
        cfg = self.lm.config.model
        model = self.lm.model
        return {
            "model": self.model_name,
            "checkpoint": str(getattr(self.lm, "checkpoint", "")),
            "arch": cfg.arch,
            "vocab_size": int(self.lm.tokenizer.vocab_size),
            "context_length": int(cfg.context_length),
            "params": int(
                model.num_params()
                if hasattr(model, "num_params")
                else sum(p.numel() for p in model.parameters())
            ),
            "device": str(next(model.parameters()).device),
            "config": {
                k: v for k, v in vars(cfg).items() if isinstance(v, str | int | float | bool | type(None))
            },
            "limits": {"max_new_tokens": self.max_new_tokens_limit, "max_batch": self.max_batch},
        }

    def parse(self, body: bytes) -> GenerateRequest:
        """A ``/generate`` body checked against this server's limits and vocabulary."""
        return parse_generate_request(
            body,
            max_new_tokens_limit=self.max_new_tokens_limit,
            max_batch=self.max_batch,
            vocab_size=int(self.lm.tokenizer.vocab_size),
        )

    def generate(self, req: GenerateRequest) -> dict[str, Any]:
        """The non-streaming ``/generate`` answer (generation under the lock)."""
        start = time.perf_counter()
        with self.lock:
            results = self.engine.generate(req.prompts, **req.options)
        return {
            "completions": [
                {
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "new_tokens": r.new_tokens,
                }
                for r in results
            ],
            "seconds": round(time.perf_counter() - start, 6),
        }


class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    server_version = "scratchlm"
    timeout = REQUEST_TIMEOUT_S

    # -------------------------------------------------------------------------------------------------
    # routing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        routes = {"/health": "GET", "/info": "GET", "/generate": "POST"}
        path = self.path.split("?", 1)[0]
        try:
            if path not in routes:
                raise RequestError(404, f"no endpoint {path}; try GET /health, GET /info, POST /generate")
            if routes[path] != method:
                raise RequestError(405, f"{path} takes {routes[path]}, not {method}")
            if path == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model_name})
            elif path == "/info":
                self._send_json(200, self.server.info())
            else:
                self._generate()
        except RequestError as e:
            self._send_json(e.status, {"error": str(e)}, allow=routes.get(path) if e.status == 405 else None)
        except (GenerationError, TokenizerError) as e:  # refused: prompt too long, not encodable, ...
            self._send_json(400, {"error": _one_line(e)})
        except (BrokenPipeError, ConnectionResetError):
            self.log_message("client disconnected: %s %s", method, path)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._send_json(500, {"error": "internal server error (see the server log)"})

    # -------------------------------------------------------------------------------------------------
    # POST /generate

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        if n > self.server.max_body_bytes:
            # read (and drop) a moderately large body so that the client, still sending, gets the 413
            # instead of a connection reset; a huge one is not worth reading: just close
            if n <= 16 * self.server.max_body_bytes:
                while n > 0 and (chunk := self.rfile.read(min(n, 1 << 16))):
                    n -= len(chunk)
            self.close_connection = True
            raise RequestError(
                413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}"
            )
        return self.rfile.read(n)

    def _generate(self) -> None:
        req = self.server.parse(self._read_body())
        if not req.stream:
            self._send_json(200, self.server.generate(req))
            return
        with self.server.lock:
            deltas = self.server.engine.stream(req.prompts[0], **req.options)
            try:
                first = next(deltas, None)  # errors before any output (prompt too long...) are still a 400
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    if first is not None:
                        self._send_event(json.dumps({"delta": first}))
                        for delta in deltas:
                            self._send_event(json.dumps({"delta": delta}))
                except (BrokenPipeError, ConnectionResetError):
                    raise
                except Exception:  # headers are out: report in the stream, log the traceback
                    traceback.print_exc(file=sys.stderr)
                    self._send_event(json.dumps({"error": "internal server error (see the server log)"}))
                self._send_event("[DONE]")
            finally:
                deltas.close()  # stops generating when the client went away

    def _send_event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    # -------------------------------------------------------------------------------------------------
    # responses

    def _send_json(self, status: int, obj: dict[str, Any], allow: str | None = None) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (malformed request line, unsupported method) as one-line JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with headers anyway
            self.request_version = "HTTP/1.0"
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_json(code, {"error": (message or phrase).splitlines()[0]})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")
