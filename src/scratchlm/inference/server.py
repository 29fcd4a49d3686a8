"""The HTTP server for a loaded model: standard library only (``http.server``), JSON in and out.

    server = GenerationServer(scratchlm.load("runs/demo"), host="127.0.0.1", port=8000)
    server.serve_forever()        # or: scratchlm serve runs/demo --port 8000

Endpoints (docs/serving.md has curl and OpenAI-client examples):

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
- The OpenAI API: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
  (:mod:`scratchlm.inference.openai_api`), errors in OpenAI's shape.

Generation is continuous batching (:mod:`scratchlm.inference.batching`): requests that arrive together
share decoder steps, at most ``max_batch`` rows at once; ``max_queue`` requests may wait, more get 503.
``/generate`` with ``"context": "slide"`` or ``"stop"`` runs on the engine itself, one at a time.

Limits, so that no client can hold the server: ``max_new_tokens`` at most ``max_new_tokens_limit`` (a
``/generate`` without it gets ``min(128, limit)``); at most ``max_batch`` completions per request; a body of
at most 1 MiB (413); at most ``max_connections`` open connections (503 past it; the listen backlog holds
them all); a request must arrive whole within ``request_deadline_s`` (408 and close: a client that sends a
header line every few seconds is cut off); a socket idle for 60 s is closed. A client that disconnects
frees its rows at the next step and costs one log line, never a traceback.

Errors are one-line JSON: ``{"error": "..."}`` on the original endpoints, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1/``. 400 bad request (invalid JSON, unknown
field, wrong type, out-of-range option, over a limit, prompt too long for the context), 401 wrong API key,
404 unknown path or model, 405 wrong method, 408 request too slow, 411 no Content-Length, 413 body too
large, 503 busy, 500 server bug (generic message to the client, traceback to stderr).

The server binds to 127.0.0.1 by default. ``api_key`` (``scratchlm serve --api-key`` or the
``SCRATCHLM_API_KEY`` environment variable) makes every endpoint but ``/health`` require
``Authorization: Bearer <key>``; there is no TLS: put a reverse proxy in front to expose it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import itertools
import json
import math
import select
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scratchlm.errors import GenerationError, TokenizerError
from scratchlm.inference.batching import Batcher, ErrorEvent, FinishEvent, QueueFullError, Ticket
from scratchlm.inference.openai_api import OpenAIError, models_list, parse_request, run_request
from scratchlm.inference.sampling import SamplingParams

MAX_BODY_BYTES = 1 << 20  # 1 MiB
IDLE_TIMEOUT_S = 60  # a socket read or write that waits this long drops the connection
REQUEST_DEADLINE_S = (
    30.0  # a request must arrive whole this long after it starts (scratchlm serve --request-deadline)
)
MAX_NEW_TOKENS_LIMIT = 1024  # per request (scratchlm serve --max-new-tokens-limit)
MAX_BATCH = 64  # rows decoded together, so completions per request (scratchlm serve --max-batch)
MAX_QUEUE = 256  # requests waiting for a batch slot before 503 (scratchlm serve --max-queue)
MAX_CONNECTIONS = 512  # open connections before 503 (scratchlm serve --max-connections)
REJECTERS = 32  # connections being answered 503 at once; past it they are closed

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
        self.default_length = False  # max_new_tokens not asked for: the default, cut to fit the context


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
    request = GenerateRequest(prompts, stream, options)
    request.default_length = "max_new_tokens" not in data  # the server's default, cut to the context
    return request


def _reject_constant(name: str) -> None:
    raise RequestError(400, f"the body is not valid JSON ({name} is not a JSON number)")


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class GenerationServer(ThreadingHTTPServer):
    """An HTTP server around one loaded model (``scratchlm.api.LoadedModel`` or anything with ``.engine``,
    ``.model``, ``.tokenizer``, ``.config``). Port 0 picks a free port (see :attr:`url`).

    Generation goes through one :class:`~scratchlm.inference.batching.Batcher` (continuous batching of at
    most ``max_batch`` rows; ``max_queue`` requests wait, more get 503). Connections beyond
    ``max_connections`` get 503 at once; a request whose headers and body have not fully arrived
    ``request_deadline_s`` after it started (or after the previous answer on a kept-alive connection) is
    answered 408 and closed. ``api_key``: every endpoint but ``/health`` then needs
    ``Authorization: Bearer <api_key>``.
    """

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
        max_queue: int = MAX_QUEUE,
        max_connections: int = MAX_CONNECTIONS,
        request_deadline_s: float = REQUEST_DEADLINE_S,
        api_key: str | None = None,
    ):
        for option, value in (
            ("max_new_tokens_limit", max_new_tokens_limit),
            ("max_batch", max_batch),
            ("max_queue", max_queue),
            ("max_connections", max_connections),
            ("request_deadline_s", request_deadline_s),
        ):
            if not value > 0:
                raise ValueError(f"{option} must be >= 1, got {value}")
        self.lm = lm
        self.engine = lm.engine
        run_dir = getattr(lm, "run_dir", None)  # "runs/x", "." and "/tmp/x/" all name the run by its folder
        self.model_name = name or (Path(run_dir).resolve().name if run_dir is not None else "scratchlm")
        self.max_body_bytes = max_body_bytes
        self.max_new_tokens_limit = max_new_tokens_limit
        self.max_batch = max_batch
        self.max_connections = max_connections
        self.api_key = api_key or None
        self.created = int(time.time())
        self.lock = threading.Lock()  # the engine's own path (context "slide" / "stop"): one at a time
        # the kernel queues connections not yet accepted: room for every allowed connection at once
        self.request_queue_size = max(128, max_connections)
        self._connections = 0
        self._rejecting = 0
        self._count_lock = threading.Lock()
        super().__init__((host, port), _Handler)
        self.watchdog = _Watchdog(request_deadline_s)
        self.batcher = Batcher(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        if hasattr(self, "batcher"):
            self.batcher.close()
            self.watchdog.close()

    # -------------------------------------------------------------------------------------------------
    # connection cap

    def process_request(self, request, client_address) -> None:
        with self._count_lock:
            full = self._connections >= self.max_connections
            if not full:
                self._connections += 1
            reject = full and self._rejecting < REJECTERS
            self._rejecting += reject
        if not full:
            super().process_request(request, client_address)
        elif reject:  # answered 503 in a short-lived thread (bounded: REJECTERS at once, 1 s each)
            threading.Thread(target=self._reject, args=(request,), daemon=True).start()
        else:
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._connections -= 1

    def _reject(self, sock) -> None:
        body = json.dumps(
            _openai_error(
                503, f"the server is at its limit of {self.max_connections} connections; retry later"
            )
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            sock.settimeout(1.0)
            sock.sendall(head.encode() + body)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.recv(1 << 16):  # drain: closing unread data is an RST
                pass
        except OSError:
            pass
        finally:
            sock.close()
            with self._count_lock:
                self._rejecting -= 1

    def handle_error(self, request, client_address) -> None:
        """A connection error escaping a handler (a client gone while we flushed) is one line, not a traceback."""
        e = sys.exc_info()[1]
        if isinstance(e, OSError):
            sys.stderr.write(f"{client_address[0]} - connection closed early ({type(e).__name__})\n")
        else:
            super().handle_error(request, client_address)

    # -------------------------------------------------------------------------------------------------
    # answers

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
            "batching": {
                **dataclasses.asdict(self.batcher.stats),
                "queued": self.batcher.queued,
                "active_rows": self.batcher.active_rows,
            },
        }

    def parse(self, body: bytes) -> GenerateRequest:
        """A ``/generate`` body checked against this server's limits and vocabulary."""
        return parse_generate_request(
            body,
            max_new_tokens_limit=self.max_new_tokens_limit,
            max_batch=self.max_batch,
            vocab_size=int(self.lm.tokenizer.vocab_size),
        )

    def submit(self, req: GenerateRequest) -> tuple[Ticket, list[int]]:
        """Queue a ``/generate`` request (context "error") on the batcher: (ticket, prompt token counts)."""
        options = {k: v for k, v in req.options.items() if k != "context"}
        ids = [self.engine.encode_prompt(p) for p in req.prompts]
        if req.default_length:  # a default must not turn a short-context model's every request into a 400
            room = self.batcher.context_length - max(len(i) for i in ids)
            options["max_new_tokens"] = max(1, min(options["max_new_tokens"], room))
        params = SamplingParams.from_kwargs(**options)
        try:
            return self.batcher.submit(ids, params), [len(i) for i in ids]
        except QueueFullError as e:
            raise RequestError(503, str(e)) from None

    def generate(self, req: GenerateRequest, gone=None) -> dict[str, Any] | None:
        """The non-streaming ``/generate`` answer (None when the client left before it was ready)."""
        start = time.perf_counter()
        if req.options.get("context", "error") != "error":  # window policies: the engine itself
            with self.lock:
                results = self.engine.generate(req.prompts, **req.options)
            rows = [(r.text, r.finish_reason, r.prompt_tokens, r.new_tokens) for r in results]
        else:
            ticket, prompt_tokens = self.submit(req)
            done: dict[int, FinishEvent] = {}
            for event in ticket.events(gone=gone):
                if isinstance(event, ErrorEvent):
                    raise (GenerationError if event.client_error else RuntimeError)(event.message)
                if isinstance(event, FinishEvent):
                    done[event.row] = event
            if ticket.cancelled.is_set():
                return None
            ctx = self.batcher.context_length
            rows = [
                (e.text, _context_reason(e, prompt_tokens[i], ctx, req), prompt_tokens[i], e.new_tokens)
                for i, e in sorted(done.items())
            ]
        return {
            "completions": [
                {"text": t, "finish_reason": f, "prompt_tokens": p, "new_tokens": n} for t, f, p, n in rows
            ],
            "seconds": round(time.perf_counter() - start, 6),
        }


def _context_reason(event: FinishEvent, prompt_tokens: int, context_length: int, req: GenerateRequest) -> str:
    """``"context"`` for a default-length row that ended because the window was full, else its own reason."""
    full = prompt_tokens + event.new_tokens >= context_length
    return (
        "context" if req.default_length and event.finish_reason == "length" and full else event.finish_reason
    )


class _Watchdog:
    """Closes the read side of connections whose request is not in after ``deadline_s`` (slow clients).

    A handler arms it when it starts waiting for a request and disarms it once the body is read. One
    thread checks every armed connection a few times per deadline; ``shutdown(SHUT_RD)`` makes the
    handler's blocked read return end-of-file, and the handler answers 408 if part of a request came.
    """

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self._armed: dict[Any, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scratchlm-watchdog", daemon=True)
        self._thread.start()

    def arm(self, handler) -> None:
        with self._lock:
            self._armed[handler] = time.monotonic() + self.deadline_s

    def disarm(self, handler) -> None:
        with self._lock:
            self._armed.pop(handler, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(min(0.25, self.deadline_s / 4)):
            now = time.monotonic()
            with self._lock:
                late = [h for h, t in self._armed.items() if t < now]
                for h in late:
                    del self._armed[h]
            for h in late:
                h.timed_out = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RD)


def _openai_error(status: int, message: str) -> dict[str, Any]:
    return OpenAIError(status, message).body()


class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    server_version = "scratchlm"
    protocol_version = "HTTP/1.1"  # keep-alive: the OpenAI client reuses its connections
    timeout = IDLE_TIMEOUT_S

    ROUTES = {
        "/health": "GET",
        "/info": "GET",
        "/generate": "POST",
        "/v1/models": "GET",
        "/v1/completions": "POST",
        "/v1/chat/completions": "POST",
    }

    def setup(self) -> None:
        super().setup()
        self.timed_out = False

    def handle_one_request(self) -> None:
        self.responded = self.openai = False
        self.server.watchdog.arm(self)
        try:
            super().handle_one_request()
            if self.timed_out and not self.responded and self.raw_requestline:
                self._error(408, self._late_message())
        finally:
            self.server.watchdog.disarm(self)
            if self.timed_out:
                self.close_connection = True

    def _late_message(self) -> str:
        return f"the request did not arrive within {self.server.watchdog.deadline_s:g} s; send it whole"

    # -------------------------------------------------------------------------------------------------
    # routing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self.openai = path.startswith("/v1/")
        try:
            if self.timed_out:
                raise RequestError(408, self._late_message())
            if path not in self.ROUTES:
                raise RequestError(404, f"no endpoint {path}; try GET /health, GET /info, GET /v1/models")
            if self.ROUTES[path] != method:
                raise RequestError(405, f"{path} takes {self.ROUTES[path]}, not {method}")
            self._authorize(path)
            body = self._read_body() if method == "POST" else b""
            self.server.watchdog.disarm(self)  # the request is in: generation time is not its deadline
            if path == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model_name})
            elif path == "/info":
                self._send_json(200, self.server.info())
            elif path == "/v1/models":
                self._send_json(200, models_list(self.server.model_name, self.server.created))
            elif path == "/generate":
                self._generate(body)
            else:
                self._openai(body, chat=path == "/v1/chat/completions")
        except (RequestError, OpenAIError) as e:
            self._error(e.status, str(e), allow=self.ROUTES.get(path) if e.status == 405 else None, exc=e)
        except (GenerationError, TokenizerError) as e:  # refused: prompt too long, not encodable, ...
            self._error(400, _one_line(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.log_message("client disconnected: %s %s", method, path)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._error(500, "internal server error (see the server log)")

    def _authorize(self, path: str) -> None:
        key = self.server.api_key
        if key is None or path == "/health":
            return
        given = self.headers.get("Authorization", "")
        token = given[len("Bearer ") :] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise OpenAIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def _client_gone(self) -> bool:
        """True when the client closed its side (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    # -------------------------------------------------------------------------------------------------
    # POST bodies

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
        body = self.rfile.read(n)
        if len(body) < n:
            self.close_connection = True
            raise RequestError(
                408 if self.timed_out else 400,
                self._late_message() if self.timed_out else "the body ended before Content-Length bytes",
            )
        return body

    def _openai(self, body: bytes, chat: bool) -> None:
        srv = self.server
        req = parse_request(
            body, chat=chat, model_name=srv.model_name, max_batch=srv.max_batch, tokenizer=srv.lm.tokenizer
        )
        run = functools.partial(
            run_request,
            req,
            srv.batcher,
            srv.lm.tokenizer,
            srv.engine.encode_prompt,
            model_name=srv.model_name,
            max_tokens_limit=srv.max_new_tokens_limit,
            gone=self._client_gone,
        )
        try:
            if not req.stream:
                answer = run()
                if answer is not None:
                    self._send_json(200, answer)
                return
            self._stream(lambda emit: run(emit=emit))
        except QueueFullError as e:
            raise OpenAIError(503, str(e)) from None

    def _generate(self, body: bytes) -> None:
        req = self.server.parse(body)
        if not req.stream:
            answer = self.server.generate(req, gone=self._client_gone)
            if answer is not None:
                self._send_json(200, answer)
            return
        if req.options.get("context", "error") != "error":
            with self.server.lock:
                deltas = self.server.engine.stream(req.prompts[0], **req.options)
                try:
                    first = next(deltas, None)  # errors before any output (prompt too long) are still 400s

                    def relay_engine(emit) -> None:
                        for d in itertools.chain([first] if first else [], deltas):
                            emit(json.dumps({"delta": d}))

                    self._stream(relay_engine)
                finally:
                    deltas.close()  # stops generating when the client went away
            return
        ticket, _ = self.server.submit(req)

        def relay(emit) -> None:
            try:
                for event in ticket.events(gone=self._client_gone):
                    if isinstance(event, ErrorEvent):
                        raise RuntimeError(event.message)
                    if event.delta:
                        emit(json.dumps({"delta": event.delta}))
            except BaseException:
                ticket.cancel()
                raise

        self._stream(relay)

    def _stream(self, produce) -> None:
        """Answer 200 with Server-Sent Events: ``produce(emit)`` sends each event's data; then ``[DONE]``.

        Errors before the first event are ordinary error answers; after it, an error event then ``[DONE]``.
        """
        started = False

        def emit(data: str) -> None:
            nonlocal started
            if not started:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                self.responded = started = True
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            produce(emit)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:
            if not started:
                raise
            if not isinstance(e, RequestError | OpenAIError | GenerationError):
                traceback.print_exc(file=sys.stderr)
            message = (
                str(e)
                if isinstance(e, RequestError | OpenAIError | GenerationError)
                else "internal server error (see the server log)"
            )
            emit(json.dumps(_openai_error(500, message) if self.openai else {"error": message}))
        if not self._client_gone():
            emit("[DONE]")

    # -------------------------------------------------------------------------------------------------
    # responses

    def _error(
        self, status: int, message: str, allow: str | None = None, exc: Exception | None = None
    ) -> None:
        """An error answer: OpenAI's shape under /v1/, else ``{"error": message}``."""
        if getattr(self, "openai", False):
            body = exc.body() if isinstance(exc, OpenAIError) else _openai_error(status, message)
        else:
            body = {"error": message}
        if status in (408, 413, 411):
            self.close_connection = True
        self._send_json(status, body, allow=allow)

    def _send_json(self, status: int, obj: dict[str, Any], allow: str | None = None) -> None:
        body = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if allow:
            self.send_header("Allow", allow)
        if status == 503:
            self.send_header("Retry-After", "1")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.responded = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (malformed request line, unsupported method) as one-line JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with headers anyway
            self.request_version = "HTTP/1.0"
        if self.timed_out:
            code, message = 408, self._late_message()
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(code, (message or phrase).splitlines()[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")
