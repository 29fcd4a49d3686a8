"""``scratchlm serve RUN_DIR``: an HTTP server for a trained run (GET /health, GET /info, POST /generate).

scratchlm serve runs/demo --port 8000
curl -s localhost:8000/generate -d '{"prompt": "def ", "max_new_tokens": 40, "temperature": 0}'
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

# = scratchlm.inference.server's defaults (tested), repeated so that building the parser imports no torch
MAX_NEW_TOKENS_LIMIT = 1024
MAX_BATCH = 64


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a trained run over HTTP (JSON, Server-Sent Events streaming)",
        description="Serve a run's model over HTTP: GET /health, GET /info, POST /generate (JSON; "
        '"stream": true for Server-Sent Events). See docs/serving.md. No authentication: it binds to '
        "127.0.0.1 unless told otherwise.",
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
        help=f"most prompts in one request (default {MAX_BATCH}); more is a 400",
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
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    lm = load(args.run_dir, which=args.which, device=args.device)
    try:
        server = GenerationServer(
            lm,
            host=args.host,
            port=args.port,
            max_new_tokens_limit=args.max_new_tokens_limit,
            max_batch=args.max_batch,
        )
    except OSError as e:
        raise ConfigError(
            f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another --port"
        ) from None
    if not _is_loopback(args.host):
        print(
            f"warning: listening on {args.host}: anyone who can reach it can use the model (no authentication)",
            file=sys.stderr,
        )
    print(f"serving {lm.checkpoint} on {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
