"""The ``POST /generate`` request body: its fields, their types and the server's limits, checked in one pass.

    req = parse_generate_request(b'{"prompt": "def ", "max_new_tokens": 40}', max_new_tokens_limit=1024,
                                 max_batch=64, vocab_size=50257)
    req.prompts, req.stream, req.options    # ["def "], False, {"max_new_tokens": 40}

Every problem is a :class:`~scratchlm.inference.http_errors.RequestError` (400) naming the first bad field;
:mod:`scratchlm.inference.server` turns it into the one-line JSON error. The OpenAI API's bodies are checked
by :mod:`scratchlm.inference.openai_api`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from scratchlm.errors import GenerationError
from scratchlm.inference.http_errors import RequestError, one_line
from scratchlm.inference.sampling import SamplingParams

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
    max_new_tokens_limit: int,
    max_batch: int,
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
        raise RequestError(400, f"the body is not valid JSON ({one_line(e)})") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.int_info)
        raise RequestError(400, f"the body is not valid JSON here ({one_line(e)})") from None
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
