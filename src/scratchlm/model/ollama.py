"""Export for Ollama: the GGUF file plus a Modelfile (``scratchlm export RUN --format ollama --out DIR``).

    DIR/model.gguf     the model and tokenizer (:func:`scratchlm.model.gguf.export_gguf`)
    DIR/Modelfile      FROM ./model.gguf, TEMPLATE, PARAMETER stop ..., default sampling parameters

then ``ollama create NAME -f DIR/Modelfile`` and ``ollama run NAME``.

The TEMPLATE is the run's chat template (the one ``scratchlm chat`` uses: stored with the tokenizer, or
``plain``) written in Go's text/template syntax, which Ollama renders over ``.Messages`` (each with
``.Role`` and ``.Content``; a system prompt is one of them)::

    {{- range .Messages }}{{ if eq .Role "system" }}PREFIX_SYSTEM{{ else if eq .Role "user" }}PREFIX_USER
    {{ else }}PREFIX_ASSISTANT{{ end }}CONTENT_PREFIX{{ .Content }}TURN_END SEPARATOR{{ end }}PREFIX_ASSISTANT

so a conversation renders to exactly :meth:`ChatTemplate.render`'s text (tested with a small evaluator of
that subset of Go templates). The template's end-of-turn marker is text, not a token, so it is a
``PARAMETER stop`` string: Ollama stops there as ``scratchlm chat`` does. Defaults: ``temperature`` 0.8 (as
``scratchlm chat``) and ``num_ctx`` = the model's context length (Ollama's default, 2048 or more, would run
past a learned position table).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from scratchlm import fileio
from scratchlm.errors import ConfigError
from scratchlm.tokenizer.chat_template import ChatTemplate, chat_template_of

GGUF_NAME = "model.gguf"


def _literal(text: str) -> str:
    """``text`` as literal Go-template text (a ``{{`` would open an action: written as ``{{ "{{" }}``)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(template: ChatTemplate) -> str:
    """The chat template in Go text/template syntax over ``.Messages`` (module docstring)."""
    p = {role: _literal(text) for role, text in template.prefix.items()}
    return (
        "{{- range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{p["system"]}'
        f'{{{{ else if eq .Role "user" }}}}{p["user"]}'
        f"{{{{ else }}}}{p['assistant']}{{{{ end }}}}"
        f"{_literal(template.content_prefix)}{{{{ .Content }}}}"
        f"{_literal(template.turn_end + template.separator)}"
        "{{ end }}"
        f"{p['assistant']}"
    )


def _quote(value: str) -> str:
    """A Modelfile string argument. Ollama's parser strips the quotes and keeps the text as it is (no
    escape sequences), so a value with a newline or a double quote goes in triple quotes."""
    if '"""' in value:
        raise ConfigError(f'a Modelfile value cannot contain """: {value!r}')
    return f'"""{value}"""' if "\n" in value or '"' in value else f'"{value}"'


def modelfile(tokenizer, context_length: int, gguf_name: str = GGUF_NAME, temperature: float = 0.8) -> str:
    """The Modelfile text for the GGUF file ``gguf_name`` next to it."""
    template = chat_template_of(tokenizer)
    body = go_template(template)
    if '"""' in body:
        raise ConfigError(f'the chat template {template.name!r} contains """, which a Modelfile cannot quote')
    lines = [
        f"# written by `scratchlm export --format ollama`; chat template: {template.name}",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{body}"""',
        *(f"PARAMETER stop {_quote(stop)}" for stop in template.stop),
        f"PARAMETER temperature {temperature}",
        f"PARAMETER num_ctx {context_length}",
    ]
    return "\n".join(lines) + "\n"


def export_ollama(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write ``out_dir/model.gguf`` and ``out_dir/Modelfile``; returns the Modelfile's path."""
    from scratchlm.model.gguf import export_gguf

    out = Path(out_dir)
    text = modelfile(tokenizer, model.config.context_length)  # checks the template before writing
    out.mkdir(parents=True, exist_ok=True)
    export_gguf(model, tokenizer, out / GGUF_NAME, dtype=dtype)
    return fileio.write_text(out / "Modelfile", text)
