"""``scratchlm serve RUN_DIR``: an HTTP server for a trained run (the OpenAI API, /generate, /health, /info).

scratchlm serve runs/demo --port 8000
curl -s localhost:8000/v1/completions -d '{"model": "demo", "prompt": "def ", "max_tokens": 40, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
import threading

# = scratchlm.inference.server's defaults (tested), repeated so that building the parser imports no torch
MAX_NEW_TOKENS_LIMIT = 1024
MAX_BATCH = 64
MAX_QUEUE = 256
MAX_CONNECTIONS = 512
REQUEST_DEADLINE_S = 30.0
API_KEY_ENV = "SCRATCHLM_API_KEY"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a trained run over HTTP (the OpenAI API, continuous batching, streaming)",
        description="Serve a run's model over HTTP: the OpenAI API (GET /v1/models, POST /v1/completions, "
        "POST /v1/chat/completions) and GET /health, GET /info, POST /generate. Concurrent requests are "
        "batched. See docs/serving.md. It binds to 127.0.0.1 unless told otherwise; --api-key (or "
        f"${API_KEY_ENV}) requires a bearer token.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory (config.yaml, tokenizer.json, checkpoints/)"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to serve")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--max-new-tokens-limit",
        type=int,
        default=MAX_NEW_TOKENS_LIMIT,
        metavar="N",
        help=f"most new tokens a request may ask for (default {MAX_NEW_TOKENS_LIMIT}); more is a 400",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        metavar="N",
        help=f"most rows decoded together, so most completions one request may ask for (default {MAX_BATCH})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=MAX_QUEUE,
        metavar="N",
        help=f"requests that may wait for a batch slot (default {MAX_QUEUE}); more get 503",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"open connections (default {MAX_CONNECTIONS}); more get 503. The listen backlog fits them",
    )
    p.add_argument(
        "--request-deadline",
        type=float,
        default=REQUEST_DEADLINE_S,
        metavar="SECONDS",
        help=f"a request's headers and body must arrive within this (default {REQUEST_DEADLINE_S:g}); else 408",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV}, "
        "else none)",
    )
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from scratchlm.api import load
    from scratchlm.errors import ConfigError
    from scratchlm.inference.server import GenerationServer

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (
        ("--max-new-tokens-limit", args.max_new_tokens_limit),
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--max-connections", args.max_connections),
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if not 0 < args.request_deadline < float("inf"):
        raise ConfigError(
            f"--request-deadline must be a positive number of seconds, got {args.request_deadline}"
        )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    lm = load(args.run_dir, which=args.which, device=args.device)
    try:
        server = GenerationServer(
            lm,
            host=args.host,
            port=args.port,
            max_new_tokens_limit=args.max_new_tokens_limit,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            max_connections=args.max_connections,
            request_deadline_s=args.request_deadline,
            api_key=api_key,
        )
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port"
        ) from None
    if not _is_loopback(args.host) and api_key is None:
        print(
            f"warning: listening on {args.host}: anyone who can reach it can use the model (no --api-key)",
            file=sys.stderr,
        )
    print(f"serving {lm.checkpoint} on {server.url} (Ctrl-C to stop)", flush=True)
    print(f"OpenAI API: base_url={server.url}/v1, model={server.model_name!r}", flush=True)
    # SIGTERM (kill, systemd, docker stop) stops the server as Ctrl-C does: requests in flight get 503,
    # every thread is joined (a thread left inside torch at exit aborts the process), exit code 0
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        print("stopping: requests in flight are answered 503", file=sys.stderr, flush=True)
    finally:
        server.server_close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    print("stopped", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
