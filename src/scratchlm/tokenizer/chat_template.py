"""Chat templates: how a conversation (a list of messages) becomes the text a decoder model reads.

A conversation is a list of OpenAI-style messages, ``{"role": "system" | "user" | "assistant", "content": str}``.
A template writes each message as ``prefix[role] + content_prefix + content + turn_end + separator`` and, to
ask for a reply, ends with the assistant's prefix (the *generation prompt*). Two templates are built in:

``plain`` (:data:`PLAIN`): the transcript a base model (never instruction-tuned) can continue::

    System: <system text>
    User: <message 1>
    Assistant: <reply 1>
    User: <message 2>
    Assistant:

``chatml`` (:data:`CHATML`), ChatML as OpenAI and Qwen write it, the default for instruction tuning::

    <|im_start|>system\\n<system text><|im_end|>\\n<|im_start|>user\\n<message><|im_end|>\\n<|im_start|>assistant\\n

The markers are written as *text*: they need no special tokens, so any pretrained vocabulary (GPT-2's, a
ScratchLM tokenizer) works unchanged; the model learns them as ordinary token sequences while it is tuned.

Training (:meth:`ChatTemplate.segments`): an assistant message's ``content_prefix + content + turn_end`` is
what the model must learn to write (loss on those tokens only); everything else (system and user messages,
role prefixes, separators) is context. Because ``turn_end`` (``<|im_end|>``) is learnt, the model learns to
end its turn, and generation stops at the template's ``stop`` strings.

Storage: a template goes with its tokenizer as HF does, in ``tokenizer_config.json`` beside
``tokenizer.json``: ``chat_template`` holds the equivalent Jinja text (``transformers``'
``apply_chat_template`` renders exactly :meth:`ChatTemplate.render`'s string; tested) and
``scratchlm_chat_template`` the name. :func:`chat_template_of` reads it back from a loaded tokenizer
(``load_tokenizer`` sets ``tokenizer.chat_template``); a tokenizer without one chats with :data:`PLAIN`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.errors import ChatFormatError, TokenizerError

ROLES = ("system", "user", "assistant")
CONFIG_FILE = "tokenizer_config.json"
NAME_KEY = "scratchlm_chat_template"


@dataclass(frozen=True)
class ChatTemplate:
    """A turn format: ``prefix[role] + content_prefix + content + turn_end + separator`` per message.

    ``stop``: strings that end an assistant turn when generating. ``jinja``: the same format as a Hugging
    Face ``chat_template`` (written on export, and into the run's ``tokenizer_config.json``).
    """

    name: str
    prefix: dict[str, str]
    content_prefix: str
    turn_end: str
    separator: str
    stop: list[str]
    jinja: str

    def segments(self, messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendered text in pieces ``(text, trained)``; ``trained`` marks what an assistant writes.

        ``"".join(text for text, _ in segments(m, g)) == render(m, g)``. Raises ChatFormatError for a
        malformed conversation (see :func:`validate_messages`).
        """
        validate_messages(messages)
        out: list[tuple[str, bool]] = []
        for m in messages:
            body = self.content_prefix + m["content"] + self.turn_end
            out.append((self.prefix[m["role"]], False))
            out.append((body, m["role"] == "assistant"))
            if self.separator:
                out.append((self.separator, False))
        if add_generation_prompt:
            out.append((self.prefix["assistant"], False))
        return [(text, trained) for text, trained in out if text]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as one string; with ``add_generation_prompt`` it ends where the reply begins."""
        return "".join(text for text, _ in self.segments(messages, add_generation_prompt))


PLAIN = ChatTemplate(
    name="plain",
    prefix={"system": "System:", "user": "User:", "assistant": "Assistant:"},
    content_prefix=" ",
    turn_end="\n",
    separator="",
    stop=["\nUser:"],
    jinja=(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}System: "
        "{% elif message['role'] == 'user' %}User: "
        "{% else %}Assistant: {% endif %}"
        "{{ message['content'] }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
)

CHATML = ChatTemplate(
    name="chatml",
    prefix={r: f"<|im_start|>{r}\n" for r in ROLES},
    content_prefix="",
    turn_end="<|im_end|>",
    separator="\n",
    stop=["<|im_end|>"],
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (PLAIN, CHATML)}


def get_template(name: str) -> ChatTemplate:
    """The built-in template called ``name`` (``plain`` or ``chatml``); ChatFormatError otherwise."""
    if name not in TEMPLATES:
        raise ChatFormatError(f"unknown chat template {name!r}; use one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def validate_messages(messages: Any) -> None:
    """Raise ChatFormatError unless ``messages`` is a non-empty list of {role, content} dicts with a known
    role and string content (extra keys such as ``name`` are ignored)."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError(
            f"messages must be a non-empty list of {{'role', 'content'}} objects, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} must be an object with 'role' and 'content', got {m!r:.60}")
        if m.get("role") not in ROLES:
            raise ChatFormatError(f"message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(
                f"message {i} ({m['role']}) has content {m.get('content')!r:.60}; content must be a string"
            )


def chat_template_of(tokenizer: Any) -> ChatTemplate:
    """The template stored with ``tokenizer`` (its ``chat_template`` name), or :data:`PLAIN` if none."""
    name = getattr(tokenizer, "chat_template", None)
    return get_template(name) if name else PLAIN


def read_template_name(directory: str | os.PathLike) -> str | None:
    """The ScratchLM template named in ``directory/tokenizer_config.json``, or None (no file, or a
    foreign Jinja template that ScratchLM does not know: chat then falls back to :data:`PLAIN`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); delete or re-create it") from None
    name = data.get(NAME_KEY) if isinstance(data, dict) else None
    if name is None:
        return None
    if name not in TEMPLATES:
        raise TokenizerError(f"{path}: unknown {NAME_KEY} {name!r} (known: {', '.join(TEMPLATES)})")
    return name


def save_chat_template(tokenizer: Any, directory: str | os.PathLike) -> Path | None:
    """Write ``directory/tokenizer_config.json`` with the tokenizer's template (Jinja + name), atomically;
    nothing when the tokenizer has none. Other keys of an existing file are kept."""
    name = getattr(tokenizer, "chat_template", None)
    if not name:
        return None
    template = get_template(name)
    path = Path(directory) / CONFIG_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = {}
    data.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    data.update({"chat_template": template.jinja, NAME_KEY: template.name})
    from scratchlm import fileio

    fileio.write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path
