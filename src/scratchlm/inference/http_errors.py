"""Every error answer of the HTTP server in one place: its JSON shape, its OpenAI type, its headers.

Two shapes, chosen by the request's path (:func:`openai_path`):

    /v1/...          {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": null}}
    everything else  {"error": "..."}

The message is one line: what is wrong and how to fix it. Headers that go with a status (RFC 9110):
``Allow`` with 405 and OPTIONS, ``WWW-Authenticate: Bearer`` with 401 (RFC 6750), ``Retry-After: 1`` with 503,
``Connection: close`` when the server hangs up after answering (408, 411, 413 and refused connections).

:func:`raw_error_response` builds a whole HTTP/1.1 response as bytes, for the places that answer without a
request handler (a connection refused at the connection cap, :mod:`scratchlm.inference.rejecter`).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

CLOSE_AFTER = frozenset({408, 411, 413})  # the rest of the connection cannot be trusted: answer, then close


class RequestError(Exception):
    """A client error answered with ``status`` and a one-line JSON message (shaped by :func:`error_body`)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def openai_path(path: str) -> bool:
    """True for the OpenAI API's paths (``/v1/...``): their errors take OpenAI's shape."""
    return path.split("?", 1)[0].startswith("/v1/")


def openai_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status (as its API answers: 401 is an authentication error)."""
    if status == 401:
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(
    status: int, message: str, *, openai: bool, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON object of an error answer: OpenAI's shape (``openai=True``) or ``{"error": message}``.

    ``param`` (the request field at fault) and ``code`` (e.g. ``"model_not_found"``) exist only in
    OpenAI's shape.
    """
    message = message.splitlines()[0] if message else HTTPStatus(status).phrase
    if openai:
        return {"error": {"message": message, "type": openai_type(status), "param": param, "code": code}}
    return {"error": message}


def error_headers(status: int, allow: str | None = None) -> list[tuple[str, str]]:
    """Headers that an error answer of ``status`` carries besides Content-Type and Content-Length."""
    headers = []
    if allow:
        headers.append(("Allow", allow))
    if status == 401:
        headers.append(("WWW-Authenticate", "Bearer"))
    if status == 503:
        headers.append(("Retry-After", "1"))
    return headers


def raw_error_response(status: int, message: str, request_head: bytes = b"") -> bytes:
    """A complete ``HTTP/1.1`` error response (headers + JSON body) that closes the connection.

    ``request_head`` is whatever of the request has arrived (possibly nothing): its request line picks
    the shape (OpenAI's under ``/v1/``) and a ``HEAD`` request gets the headers only.
    """
    method, path = _request_line(request_head)
    body = json.dumps(error_body(status, message, openai=openai_path(path))).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in error_headers(status)),
        "Connection: close",
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if method == "HEAD" else head + body


def _request_line(request_head: bytes) -> tuple[str, str]:
    """(method, path) of the first line of ``request_head``; ("", "") when it is not there yet."""
    line = request_head.split(b"\n", 1)[0].decode("latin-1").split()
    return (line[0], line[1]) if len(line) >= 2 else ("", "")
