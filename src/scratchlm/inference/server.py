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
- The OpenAI API: ``GET /v1/models``, ``GET /v1/models/NAME``, ``POST /v1/completions``,
  ``POST /v1/chat/completions`` (:mod:`scratchlm.inference.openai_api`), errors in OpenAI's shape.
- ``HEAD`` on every ``GET`` path: the GET answer's status and headers, no body. ``OPTIONS`` on a path (or
  ``*``): 204 with ``Allow`` naming its methods.

Generation is continuous batching (:mod:`scratchlm.inference.batching`): requests that arrive together
share decoder steps, at most ``max_batch`` rows at once; ``max_queue`` requests may wait, more get 503.
``/generate`` with ``"context": "slide"`` or ``"stop"`` runs on the engine itself, one at a time.

Limits, so that no client can hold the server: ``max_new_tokens`` at most ``max_new_tokens_limit`` (a
``/generate`` without it gets ``min(128, limit)``); at most ``max_batch`` completions per request; a body of
at most 1 MiB (413); at most ``max_connections`` open connections (503 past it; the listen backlog holds
them all; every refused connection still gets its 503, from one thread: :mod:`scratchlm.inference.rejecter`);
a request must arrive whole within ``request_deadline_s`` (408 and close: a client that sends a header line
every few seconds is cut off); a socket idle for 60 s is closed. A client that disconnects frees its rows
at the next step and costs one log line, never a traceback.

Errors are one-line JSON (:mod:`scratchlm.inference.http_errors`, the one place for their shape):
``{"error": "..."}`` on the original endpoints, OpenAI's ``{"error": {"message", "type", "param", "code"}}``
under ``/v1/``. 400 bad request (invalid JSON, unknown field, wrong type, out-of-range option, over a limit,
prompt too long for the context), 401 wrong API key, 404 unknown path or model, 405 wrong method (with
``Allow``), 408 request too slow, 411 no Content-Length, 413 body too large, 501 a method HTTP does not
define, 503 busy or shutting down, 500 server bug (generic message to the client, traceback to stderr).

Shutdown (:meth:`GenerationServer.server_close`, Ctrl-C or SIGTERM of ``scratchlm serve``): the listening
socket closes, requests in flight and waiting are answered 503 "shutting down", idle connections are closed,
and every thread the server started (handlers, batcher, watchdog, rejecter) is joined, so that no thread is
inside torch when the interpreter exits.

The server binds to 127.0.0.1 by default. ``api_key`` (``scratchlm serve --api-key`` or the
``SCRATCHLM_API_KEY`` environment variable) makes every endpoint but ``/health`` require
``Authorization: Bearer <key>`` (the scheme in any case, RFC 7235); there is no TLS: put a reverse proxy in front to expose it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hmac
import itertools
import json
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from scratchlm.errors import GenerationError, TokenizerError
from scratchlm.inference.batching import (
    SHUTTING_DOWN,
    Batcher,
    ErrorEvent,
    FinishEvent,
    QueueFullError,
    ShuttingDownError,
    Ticket,
)
from scratchlm.inference.engine import GenerationCancelled
from scratchlm.inference.generate_api import GenerateRequest, parse_generate_request
from scratchlm.inference.http_errors import (
    CLOSE_AFTER,
    RequestError,
    error_body,
    error_headers,
    one_line,
    openai_path,
    raw_error_response,
)
from scratchlm.inference.openai_api import OpenAIError, model_object, models_list, parse_request, run_request
from scratchlm.inference.rejecter import Rejecter
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
SHUTDOWN_TIMEOUT_S = 30.0  # server_close waits this long for the handler threads to finish

MODEL_ROUTE = "/v1/models/{model}"  # GET /v1/models/NAME


class GenerationServer(ThreadingHTTPServer):
    """An HTTP server around one loaded model (``scratchlm.api.LoadedModel`` or anything with ``.engine``,
    ``.model``, ``.tokenizer``, ``.config``). Port 0 picks a free port (see :attr:`url`).

    Generation goes through one :class:`~scratchlm.inference.batching.Batcher` (continuous batching of at
    most ``max_batch`` rows; ``max_queue`` requests wait, more get 503). Connections beyond
    ``max_connections`` get 503 at once; a request whose headers and body have not fully arrived
    ``request_deadline_s`` after it started (or after the previous answer on a kept-alive connection) is
    answered 408 and closed. ``api_key``: every endpoint but ``/health`` then needs
    ``Authorization: Bearer <api_key>``. Stop it with :meth:`shutdown` (from another thread) then
    :meth:`server_close`, which answers what is in flight 503 and joins every thread it started.
    """

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
        self._handlers: dict[threading.Thread, socket.socket] = {}  # live connection threads -> sockets
        self.closing = threading.Event()  # set by server_close: refuse new work, cancel the engine path
        self._count_lock = threading.Lock()
        super().__init__((host, port), _Handler)
        self.watchdog = _Watchdog(request_deadline_s)
        self.rejecter = Rejecter(lambda head: raw_error_response(503, self._refusal(), head))
        self.batcher = Batcher(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def _connections(self) -> int:
        """Open connections being served (refused ones not counted)."""
        return len(self._handlers)

    def server_close(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop serving and join every thread the server started (at most ``timeout`` seconds for handlers).

        Call :meth:`shutdown` first when :meth:`serve_forever` runs in another thread. In order: the
        listening socket closes; the batcher stops after its current step and answers every request in
        flight or waiting 503 "shutting down"; idle keep-alive connections are woken (their read side shut)
        and end; handlers still busy after a short grace (a generation on the engine path, a client that
        does not read) get their sockets shut both ways; then all are joined. A daemon thread left inside
        torch when the interpreter exits aborts the process, hence the joins.
        """
        super().server_close()
        with self._count_lock:
            self.closing.set()
            handlers = dict(self._handlers)
        deadline = time.monotonic() + timeout
        if hasattr(self, "batcher"):
            self.batcher.close(timeout)
        _shutdown_sockets(handlers.values(), socket.SHUT_RD)  # idle connections read end-of-file and end
        grace = time.monotonic() + min(5.0, timeout / 4)
        for thread in handlers:
            thread.join(max(0.0, grace - time.monotonic()))
        stuck = {t: sock for t, sock in handlers.items() if t.is_alive()}
        _shutdown_sockets(stuck.values(), socket.SHUT_RDWR)  # a blocked write fails, the handler ends
        for thread in stuck:
            thread.join(max(0.0, deadline - time.monotonic()))
        for part in ("rejecter", "watchdog"):
            if hasattr(self, part):
                getattr(self, part).close()
        alive = sum(t.is_alive() for t in handlers)
        if alive:
            sys.stderr.write(f"warning: {alive} connection(s) still busy after {timeout:g} s of shutdown\n")

    # -------------------------------------------------------------------------------------------------
    # connections: one thread each, up to the cap; past it (or shutting down) a 503 from the rejecter

    def process_request(self, request, client_address) -> None:
        with self._count_lock:
            refuse = self.closing.is_set() or len(self._handlers) >= self.max_connections
            if not refuse:
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name="scratchlm-connection",
                    daemon=True,  # a hung client never keeps the process alive; server_close joins them
                )
                self._handlers[thread] = request
                thread.start()  # under the lock: server_close only ever joins started threads
        if refuse:
            self.rejecter.reject(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._handlers.pop(threading.current_thread(), None)

    def _refusal(self) -> str:
        if self.closing.is_set():
            return SHUTTING_DOWN
        return f"the server is at its limit of {self.max_connections} connections; retry later"

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

    def _check_open(self) -> None:
        """Raise :class:`ShuttingDownError` (503) once :meth:`server_close` has begun: start no new work."""
        if self.closing.is_set():
            raise ShuttingDownError(SHUTTING_DOWN)

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
                self._check_open()
                results = self.engine.generate(req.prompts, cancel=self.closing, **req.options)
            rows = [(r.text, r.finish_reason, r.prompt_tokens, r.new_tokens) for r in results]
        else:
            ticket, prompt_tokens = self.submit(req)
            done: dict[int, FinishEvent] = {}
            for event in ticket.events(gone=gone):
                if isinstance(event, ErrorEvent):
                    raise event.as_exception()
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


def _stream_error(e: Exception) -> tuple[int, str]:
    """(status, one-line message) of an error raised after a stream started (sent as an error event)."""
    if isinstance(e, RequestError | OpenAIError):
        return e.status, one_line(e)
    if isinstance(e, GenerationCancelled):  # the engine path, stopped by server_close
        return 503, SHUTTING_DOWN
    if isinstance(e, ShuttingDownError | QueueFullError):
        return 503, one_line(e)
    if isinstance(e, GenerationError):
        return 400, one_line(e)
    traceback.print_exc(file=sys.stderr)
    return 500, "internal server error (see the server log)"


def _shutdown_sockets(socks, how: int) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(how)


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


class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    server_version = "scratchlm"
    protocol_version = "HTTP/1.1"  # keep-alive: the OpenAI client reuses its connections
    timeout = IDLE_TIMEOUT_S

    ROUTES = {  # path -> its method (a GET path also answers HEAD; every path answers OPTIONS)
        "/health": "GET",
        "/info": "GET",
        "/generate": "POST",
        "/v1/models": "GET",
        MODEL_ROUTE: "GET",  # /v1/models/NAME
        "/v1/completions": "POST",
        "/v1/chat/completions": "POST",
    }

    def setup(self) -> None:
        super().setup()
        self.timed_out = False

    def handle_one_request(self) -> None:
        self.responded = self.openai = self.body_pending = False
        self.path = self.command = ""  # not left over from the previous request when this one is malformed
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

    def do_HEAD(self) -> None:  # the GET answer's status and headers; _send_json writes no body
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # methods HTTP defines that no endpoint takes: 405 with Allow (an unknown method is the base class's 501)
    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_TRACE(self) -> None:
        self._dispatch("TRACE")

    def do_CONNECT(self) -> None:
        self._dispatch("CONNECT")

    @classmethod
    def route(cls, path: str) -> str | None:
        """The key of :attr:`ROUTES` that serves ``path`` (a model's own path is MODEL_ROUTE); None: none."""
        if path in cls.ROUTES:
            return path
        if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            return MODEL_ROUTE
        return None

    @classmethod
    def allow(cls, route: str | None) -> str:
        """The ``Allow`` header of a route (of the whole server for None: ``OPTIONS *``)."""
        if route is None:
            return "GET, HEAD, POST, OPTIONS"
        return "GET, HEAD, OPTIONS" if cls.ROUTES[route] == "GET" else "POST, OPTIONS"

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        self.openai = openai_path(path)
        # a body this handler will not read must not be taken for the next request: close after answering
        self.body_pending = self.headers.get("Content-Length", "0").strip() not in ("", "0") or bool(
            self.headers.get("Transfer-Encoding")
        )
        route = self.route(path)
        try:
            if self.timed_out:
                raise RequestError(408, self._late_message())
            if method == "OPTIONS" and (route is not None or path == "*"):
                self._send_empty(204, allow=self.allow(route))
                return
            if route is None:
                raise RequestError(404, f"no endpoint {path}; try GET /health, GET /info, GET /v1/models")
            expected = self.ROUTES[route]
            if method != expected and not (method == "HEAD" and expected == "GET"):
                raise RequestError(405, f"{path} takes {expected}, not {method}")
            self._authorize(path)
            body = self._read_body() if method == "POST" else b""
            self.server.watchdog.disarm(self)  # the request is in: generation time is not its deadline
            if route == "/health":
                self._send_json(200, {"status": "ok", "model": self.server.model_name})
            elif route == "/info":
                self._send_json(200, self.server.info())
            elif route == "/v1/models":
                self._send_json(200, models_list(self.server.model_name, self.server.created))
            elif route == MODEL_ROUTE:
                self._model(urllib.parse.unquote(path[len("/v1/models/") :]))
            elif route == "/generate":
                self._generate(body)
            else:
                self._openai(body, chat=route == "/v1/chat/completions")
        except (RequestError, OpenAIError) as e:
            self._error(e.status, str(e), allow=self.allow(route) if e.status == 405 else None, exc=e)
        except (
            QueueFullError,
            ShuttingDownError,
            GenerationCancelled,
        ) as e:  # busy, or stopping: retry later
            self._error(503, SHUTTING_DOWN if isinstance(e, GenerationCancelled) else one_line(e))
        except (GenerationError, TokenizerError) as e:  # refused: prompt too long, not encodable, ...
            self._error(400, one_line(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            self.log_message("client disconnected: %s %s", method, path)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._error(500, "internal server error (see the server log)")

    def _authorize(self, path: str) -> None:
        """Check ``Authorization: Bearer <key>`` when the server has a key (the scheme in any case, RFC 7235)."""
        key = self.server.api_key
        if key is None or path == "/health":
            return
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise OpenAIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def _model(self, name: str) -> None:
        """``GET /v1/models/NAME``: the model object, or 404 in OpenAI's shape for another name."""
        if name != self.server.model_name:
            raise OpenAIError(
                404,
                f"the model {name!r} does not exist here; this server serves {self.server.model_name!r}",
                "model",
                "model_not_found",
            )
        self._send_json(200, model_object(self.server.model_name, self.server.created))

    def _client_gone(self) -> bool:
        """True when the client closed its side (readable with nothing to read).

        ``poll``, not ``select``: select cannot watch a descriptor >= 1024, which a busy server reaches.
        """
        try:
            if hasattr(select, "poll"):
                poller = select.poll()
                poller.register(self.connection, select.POLLIN)
                readable = bool(poller.poll(0))
            else:  # Windows: select has no such limit there
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
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
            self.server._check_open()  # read side shut by server_close: 503, not the client's fault
            raise RequestError(
                408 if self.timed_out else 400,
                self._late_message() if self.timed_out else "the body ended before Content-Length bytes",
            )
        self.body_pending = False
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
                self.server._check_open()
                deltas = self.server.engine.stream(req.prompts[0], cancel=self.server.closing, **req.options)
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
                        raise event.as_exception()
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
            status, message = _stream_error(e)
            emit(json.dumps(error_body(status, message, openai=self.openai)))
        if not self._client_gone():
            emit("[DONE]")

    # -------------------------------------------------------------------------------------------------
    # responses

    def _error(
        self, status: int, message: str, allow: str | None = None, exc: Exception | None = None
    ) -> None:
        """An error answer in this path's shape (:func:`~scratchlm.inference.http_errors.error_body`)."""
        if self.openai and isinstance(exc, OpenAIError):
            body = exc.body()  # with its param and code
        else:
            body = error_body(status, message, openai=self.openai)
        if status in CLOSE_AFTER:
            self.close_connection = True
        self._send_json(status, body, allow=allow)

    def _send_json(self, status: int, obj: dict[str, Any], allow: str | None = None) -> None:
        """Send ``obj`` as the JSON answer (headers only for HEAD: the Content-Length a GET would get)."""
        body = json.dumps(obj).encode("utf-8")
        self._send_head(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], allow
        )
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_empty(self, status: int, allow: str | None = None) -> None:
        """An answer without a body (204 to OPTIONS: no Content-Length, RFC 9110 8.6)."""
        self._send_head(status, [], allow)

    def _send_head(self, status: int, headers: list[tuple[str, str]], allow: str | None) -> None:
        if self.body_pending:  # an unread request body would be parsed as the next request
            self.close_connection = True
        self.send_response(status)
        for name, value in headers + (error_headers(status, allow) if status >= 400 else []):
            self.send_header(name, value)
        if status < 400 and allow:
            self.send_header("Allow", allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.responded = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own errors (malformed request line, unknown method: 501) as one-line JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with headers anyway
            self.request_version = "HTTP/1.0"
        self.openai = openai_path(self.path or "")
        if self.timed_out:
            code, message = 408, self._late_message()
        elif code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            message = (
                f"method {self.command[:20]!r} is not supported; this server answers GET, HEAD, POST, OPTIONS"
            )
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(code, (message or phrase).splitlines()[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        sys.stderr.write(f"{self.address_string()} - {format % args}\n")
