"""The OpenAI HTTP API on top of the batcher: request checking, chat rendering, responses and stream chunks.

Endpoints (served by :mod:`scratchlm.inference.server`; docs/serving.md has examples):

- ``GET /v1/models`` -> ``{"object": "list", "data": [{"id": NAME, "object": "model", ...}]}``
- ``GET /v1/models/NAME`` -> ``{"id": NAME, "object": "model", "created": ..., "owned_by": "scratchlm"}``
  (404 ``model_not_found`` for another name)
- ``POST /v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids, or a list of
  such lists), ``max_tokens`` (default 16, as OpenAI), ``temperature``, ``top_p``, ``n``, ``stream``,
  ``stream_options.include_usage``, ``stop``, ``seed``, ``logprobs`` (0..20 most likely tokens),
  ``echo``, ``frequency_penalty``, ``presence_penalty``, ``user`` (ignored) and, as vLLM, the extensions
  ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos`` (do not stop at the end-of-text token).
- ``POST /v1/chat/completions``: ``messages`` (``role`` system | user | assistant, ``content`` a string or a
  list of ``{"type": "text", "text": ...}`` parts) rendered to a prompt by :func:`render_chat`;
  ``max_tokens`` / ``max_completion_tokens`` (default: what is left of the context window), ``logprobs``
  (bool) with ``top_logprobs`` (0..20), and the sampling fields above.

A field this server does not know or cannot honour (``tools``, ``logit_bias``, ``suffix``...) is a 400 that
names it, as OpenAI answers ``Unrecognized request argument``, rather than being silently ignored. Errors
have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Log-probabilities are the model's own (log-softmax of the raw logits, before temperature and penalties),
as vLLM reports them. With ``n > 1`` and a ``seed``, choice i is sampled with seed ``seed + i``.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scratchlm.errors import GenerationError, TokenizerError
from scratchlm.inference.batching import Batcher, ErrorEvent, FinishEvent, TokenEvent
from scratchlm.inference.chat import ASSISTANT, STOP, USER
from scratchlm.inference.http_errors import error_body
from scratchlm.inference.sampling import SamplingParams

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)
MAX_STOP = 16  # most stop strings per request
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

_SAMPLING = {  # OpenAI field -> (SamplingParams field, JSON type)
    "temperature": ("temperature", "number"),
    "top_p": ("top_p", "number"),
    "frequency_penalty": ("frequency_penalty", "number"),
    "presence_penalty": ("presence_penalty", "number"),
    "seed": ("seed", "integer"),
    "top_k": ("top_k", "integer"),  # vLLM extension
    "min_p": ("min_p", "number"),  # vLLM extension
    "repetition_penalty": ("repetition_penalty", "number"),  # vLLM extension
}
_COMMON = {"model", "n", "stream", "stream_options", "stop", "max_tokens", "user", "ignore_eos", *_SAMPLING}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "best_of"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


class OpenAIError(Exception):
    """A request error answered with ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        """OpenAI's error object (:func:`scratchlm.inference.http_errors.error_body`)."""
        return error_body(self.status, str(self), openai=True, param=self.param, code=self.code)


def render_chat(messages: list[dict[str, str]], tokenizer=None) -> tuple[str, list[str]]:
    """Messages -> (prompt, stop strings), with the plain transcript of :mod:`scratchlm.inference.chat`.

    This is the fallback template for base models (no chat markup)::

        <system content>\\n          (each system message, as plain text first)
        User: <content>\\n
        Assistant: <content>\\n
        Assistant:

    The reply ends at ``"\\nUser:"`` (the model starting the next user turn). This is the fallback: when
    the tokenizer carries its own chat template (the fine-tuning stage), that template renders instead;
    ``tokenizer`` is the served one, passed for that purpose.
    """
    from scratchlm.tokenizer.chat_template import chat_template_of

    if getattr(tokenizer, "chat_template", None):  # stored with the tokenizer (instruction tuning)
        template = chat_template_of(tokenizer)
        return template.render(messages, add_generation_prompt=True), list(template.stop)
    system = "".join(f"{m['content']}\n" for m in messages if m["role"] == "system")
    turns = "".join(
        f"{USER if m['role'] == 'user' else ASSISTANT} {m['content']}\n"
        for m in messages
        if m["role"] != "system"
    )
    return system + turns + ASSISTANT, [STOP]


@dataclass
class OpenAIRequest:
    """A checked completion or chat request."""

    chat: bool
    prompts: list[str] | list[list[int]]  # text (encoded by the server) or token ids
    stop: list[str]  # stop strings of the chat template (added to the request's own)
    max_tokens: int | None  # None: the kind's default
    sampling: dict[str, Any]  # SamplingParams keyword arguments (max_new_tokens excluded)
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token; None: no log-probabilities
    echo: bool


def parse_request(
    body: bytes, *, chat: bool, model_name: str, max_batch: int, tokenizer=None
) -> OpenAIRequest:
    """Check a ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions`` body; raise :class:`OpenAIError`."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OpenAIError(400, f"the body is not valid JSON ({str(e).splitlines()[0]})") from None
    except (ValueError, RecursionError):  # a 5000-digit integer, nesting too deep
        raise OpenAIError(
            400, "the body is not valid JSON here (number too long or nesting too deep)"
        ) from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    for name in data:
        if name not in allowed:
            raise OpenAIError(
                400,
                f"unrecognized request argument {name!r} (this server takes: {', '.join(sorted(allowed))})",
                name,
            )
    model = data.get("model")
    if not isinstance(model, str):
        raise OpenAIError(400, "'model' is required: a string (GET /v1/models lists it)", "model")
    if model != model_name:
        raise OpenAIError(
            404,
            f"the model {model!r} does not exist here; this server serves {model_name!r}",
            "model",
            "model_not_found",
        )

    if chat:
        prompt, template_stop = render_chat(_parse_messages(data.get("messages")), tokenizer)
        prompts: list = [prompt]
    else:
        prompts, template_stop = _parse_prompt(data.get("prompt")), []
    n = _integer(data, "n", 1)
    if not 1 <= n <= max_batch:
        raise OpenAIError(400, f"'n' must be in 1..{max_batch} (this server's batch), got {n}", "n")
    if not chat and data.get("best_of") not in (None, n):
        raise OpenAIError(400, "'best_of' is not supported (give null or the value of n)", "best_of")
    stream = data.get("stream", False) or False
    if not isinstance(stream, bool):
        raise OpenAIError(400, "'stream' must be true or false", "stream")
    options = data.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise OpenAIError(
            400, "'stream_options' must be an object with 'include_usage' only", "stream_options"
        )
    include_usage = bool((options or {}).get("include_usage", False))

    max_tokens = (
        data.get("max_completion_tokens")
        if chat and "max_completion_tokens" in data
        else data.get("max_tokens")
    )
    if max_tokens is not None:
        max_tokens = _integer(
            data, "max_completion_tokens" if chat and "max_completion_tokens" in data else "max_tokens", 0
        )
        if max_tokens < 1:
            raise OpenAIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", "max_tokens")

    sampling: dict[str, Any] = {}
    for field, (name, kind) in _SAMPLING.items():
        if data.get(field) is None:
            continue
        sampling[name] = _integer(data, field, 0) if kind == "integer" else _number(data, field)
    stop = data.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not (
            isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) and s for s in stop)
        ):
            raise OpenAIError(
                400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop"
            )
        sampling["stop"] = stop

    logprobs = None
    if chat:
        if not isinstance(data.get("logprobs", False) or False, bool):
            raise OpenAIError(400, "'logprobs' must be true or false", "logprobs")
        top = data.get("top_logprobs")
        if top is not None:
            top = _integer(data, "top_logprobs", 0)
            if not data.get("logprobs"):
                raise OpenAIError(400, "'top_logprobs' needs \"logprobs\": true", "top_logprobs")
        if data.get("logprobs"):
            logprobs = top or 0
    elif data.get("logprobs") is not None:
        logprobs = _integer(data, "logprobs", 0)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise OpenAIError(
            400, f"log-probabilities: at most {MAX_LOGPROBS} alternatives, got {logprobs}", "logprobs"
        )
    ignore_eos = data.get("ignore_eos", False) or False
    if not isinstance(ignore_eos, bool):
        raise OpenAIError(400, "'ignore_eos' must be true or false", "ignore_eos")
    if ignore_eos:
        sampling["stop_token_ids"] = []
    echo = data.get("echo", False) or False
    if not isinstance(echo, bool):
        raise OpenAIError(400, "'echo' must be true or false", "echo")
    try:
        SamplingParams.from_kwargs(**sampling)  # the ranges, one line each
    except GenerationError as e:
        raise OpenAIError(400, str(e)) from None
    return OpenAIRequest(
        chat, prompts, template_stop, max_tokens, sampling, n, stream, include_usage, logprobs, echo
    )


def _parse_prompt(prompt) -> list[str] | list[list[int]]:
    def is_ids(x) -> bool:
        return (
            isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
        )

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return list(prompt)
    raise OpenAIError(
        400,
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
        "prompt",
    )


def _parse_messages(messages) -> list[dict[str, str]]:
    if not (isinstance(messages, list) and messages):
        raise OpenAIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")):
            raise OpenAIError(
                400, f"{where} must be an object with a role of system, user or assistant", where
            )
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise OpenAIError(400, f"{where} has an unsupported field {sorted(extra)[0]!r}", where)
        content = m.get("content")
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise OpenAIError(400, f"{where}.content must be a string or a list of text parts", where)
        checked.append({"role": m["role"], "content": content})
    return checked


def _integer(data: dict, name: str, default: int) -> int:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise OpenAIError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name)
    return value


def _number(data: dict, name: str) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OpenAIError(400, f"'{name}' must be a number, got {json.dumps(value)[:40]}", name)
    if not math.isfinite(value):
        raise OpenAIError(400, f"'{name}' must be finite, got {value}", name)
    return value


def _reject_constant(name: str) -> None:
    raise OpenAIError(400, f"the body is not valid JSON ({name} is not a JSON number)")


# ----------------------------------------------------------------------------------------------------------
# running a request and shaping the answer


def run_request(
    req: OpenAIRequest,
    batcher: Batcher,
    tokenizer,
    encode: Callable[[str], list[int]],
    *,
    model_name: str,
    max_tokens_limit: int,
    emit: Callable[[str], None] | None = None,
    gone: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Generate for ``req``; return the response object, or (``emit`` given: streaming) send each chunk's
    JSON through ``emit`` and return None. ``gone()`` says the client left (the request is then cancelled).

    Raises :class:`OpenAIError` before any output for what the batcher refuses (prompt too long...).
    """
    try:
        ids = [encode(p) if isinstance(p, str) else p for p in req.prompts]
    except (GenerationError, TokenizerError) as e:
        raise OpenAIError(400, str(e).splitlines()[0], "messages" if req.chat else "prompt") from None
    if any(not 0 <= t < batcher.vocab_size for p in ids for t in p):
        raise OpenAIError(
            400, f"a prompt token id is outside the vocabulary (0..{batcher.vocab_size - 1})", "prompt"
        )
    max_tokens = req.max_tokens
    if max_tokens is None:
        room = batcher.context_length - max(len(p) for p in ids)
        max_tokens = max(1, min(max_tokens_limit, room if req.chat else COMPLETION_DEFAULT_MAX_TOKENS))
    elif max_tokens > max_tokens_limit:
        raise OpenAIError(
            400,
            f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}; ask for fewer",
            "max_tokens",
        )
    try:
        params = SamplingParams.from_kwargs(**req.sampling, max_new_tokens=max_tokens)
        params.stop = [*params.stop, *req.stop]
        ticket = batcher.submit(ids, params, n=req.n, top_logprobs=req.logprobs)
    except GenerationError as e:
        raise OpenAIError(400, str(e).splitlines()[0], "messages" if req.chat else "prompt") from None

    try:
        return _answer(req, ticket, ids, tokenizer, model_name, emit, gone)
    except BaseException:  # the client went away mid-stream, or a bug: free the request's rows
        ticket.cancel()
        raise


def _answer(req: OpenAIRequest, ticket, ids, tokenizer, model_name: str, emit, gone) -> dict[str, Any] | None:
    """Read ``ticket``'s events into the response (or stream chunks through ``emit``)."""
    rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    n_rows = len(ids) * req.n
    head = {
        "id": rid,
        "object": "chat.completion.chunk" if req.chat else "text_completion",
        "created": created,
        "model": model_name,
    }
    texts, tokens, reasons = [""] * n_rows, [[] for _ in range(n_rows)], [None] * n_rows
    new_tokens = [0] * n_rows
    started = [False] * n_rows  # chat: leading whitespace of the reply is dropped ("Assistant: ...")
    prompt_text = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts]

    def chunk(i: int, reason: str | None = None, logprobs=None, **content) -> None:
        choice = {"index": i, **content, "logprobs": logprobs, "finish_reason": reason}
        emit(json.dumps({**head, "choices": [choice]}))

    if emit is not None:  # the openers: the assistant's role (chat), the echoed prompt (completions)
        for i in range(n_rows):
            if req.chat:
                chunk(i, delta={"role": "assistant", "content": ""})
            elif req.echo:
                chunk(i, text=prompt_text[i // req.n])
    for event in ticket.events(gone=gone):
        if isinstance(event, ErrorEvent):
            if event.client_error:
                raise OpenAIError(400, event.message)
            raise event.as_exception()  # shutting down (503) or a bug (the scheduler logged its traceback)
        i = event.row
        delta = event.delta
        if req.chat and not started[i]:
            delta = delta.lstrip()
            started[i] = bool(delta)
        texts[i] += delta
        entry = None
        if isinstance(event, TokenEvent):
            if req.logprobs is not None:
                entry = (event.token_id, event.logprob, event.top_logprobs or [])
                tokens[i].append(entry)
        else:
            reasons[i], new_tokens[i] = event.finish_reason, event.new_tokens
        if emit is not None and (delta or entry is not None or isinstance(event, FinishEvent)):
            reason = event.finish_reason if isinstance(event, FinishEvent) else None
            lp = None if req.logprobs is None else _logprobs([entry] if entry else [], tokenizer, req.chat)
            content = {"delta": {"content": delta} if delta else {}} if req.chat else {"text": delta}
            chunk(i, reason, lp, **content)
    if ticket.cancelled.is_set():
        return None
    usage = {
        "prompt_tokens": sum(ticket.prompt_tokens),
        "completion_tokens": sum(new_tokens),
        "total_tokens": sum(ticket.prompt_tokens) + sum(new_tokens),
    }
    if emit is not None:
        if req.include_usage:
            emit(json.dumps({**head, "choices": [], "usage": usage}))
        return None
    choices = []
    for i in range(n_rows):
        lp = _logprobs(tokens[i], tokenizer, req.chat) if req.logprobs is not None else None
        if req.chat:
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": lp,
                    "finish_reason": reasons[i],
                }
            )
        else:
            text = prompt_text[i // req.n] + texts[i] if req.echo else texts[i]
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reasons[i]})
    return {
        **head,
        "object": "chat.completion" if req.chat else "text_completion",
        "choices": choices,
        "usage": usage,
    }


def _logprobs(entries: list, tokenizer, chat: bool) -> dict[str, Any]:
    """OpenAI's logprobs object for ``entries`` of (token id, log p, [(alt id, log p), ...])."""

    def piece(t: int) -> bytes:
        return tokenizer.decode_bytes([t])

    if chat:
        return {
            "content": [
                {
                    "token": piece(t).decode("utf-8", "replace"),
                    "logprob": lp,
                    "bytes": list(piece(t)),
                    "top_logprobs": [
                        {
                            "token": piece(a).decode("utf-8", "replace"),
                            "logprob": alp,
                            "bytes": list(piece(a)),
                        }
                        for a, alp in top
                    ],
                }
                for t, lp, top in entries
            ]
        }
    offsets, pos = [], 0
    for t, _, _ in entries:
        offsets.append(pos)
        pos += len(piece(t).decode("utf-8", "replace"))
    return {
        "tokens": [piece(t).decode("utf-8", "replace") for t, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [_by_text(top, piece) for _, _, top in entries],
        "text_offset": offsets,
    }


def _by_text(top: list[tuple[int, float]], piece) -> dict[str, float]:
    """{token text: log p} of the alternatives, most likely first; tokens of equal text keep the best."""
    out: dict[str, float] = {}
    for t, lp in top:
        out.setdefault(piece(t).decode("utf-8", "replace"), lp)
    return out


def model_object(model_name: str, created: int) -> dict[str, Any]:
    """The ``GET /v1/models/{model}`` answer: OpenAI's model object (``created``: Unix seconds)."""
    return {"id": model_name, "object": "model", "created": created, "owned_by": "scratchlm"}


def models_list(model_name: str, created: int) -> dict[str, Any]:
    """The ``GET /v1/models`` answer: a list of the one model served."""
    return {"object": "list", "data": [model_object(model_name, created)]}
