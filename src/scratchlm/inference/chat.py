"""Chat with a decoder model: turns rendered by the chat template stored with its tokenizer, and a small REPL.

Turn format. The prompt is the conversation rendered by the run's chat template
(``scratchlm.tokenizer.chat_template``): the template an instruction-tuned run was trained with (e.g.
``chatml``), or, for a base model that was never instruction-tuned, :data:`PLAIN`, a transcript that any model
trained on ordinary text can continue::

    User: <message 1>
    Assistant: <reply 1>
    User: <message 2>
    Assistant:

The model continues after the generation prompt (``Assistant:``); the reply ends at one of the template's stop
strings (``"\\nUser:"``, the model starting the user's next turn; ``<|im_end|>`` for ChatML), at the
end-of-text token, or after ``max_new_tokens``. Replies are stripped of surrounding whitespace before they go
into the history.

History. Before each reply the oldest turns are dropped until the prompt plus ``max_new_tokens`` fits in the
model's context window; if the newest message alone does not fit, the engine's sliding window keeps its
last tokens (``context="slide"``).

REPL commands: ``/reset`` (forget the history), ``/set NAME VALUE`` (any sampling option, e.g.
``/set temperature 0.7``, ``/set top_k none``, ``/set stop ###``, ``/set stop_token_ids 5,7``), ``/show``,
``/help``, ``/quit``. ``none`` is accepted only by the options that can be off: ``top_k``, ``seed``,
``stop_token_ids`` (back to end-of-text) and ``stop`` (no stop strings). A value that does not parse or is
out of range is one ``error: ...`` line and leaves the options unchanged.
Ctrl-C stops the current reply (the part shown stays in the history) and returns to the prompt; Ctrl-D (EOF)
exits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, TextIO

from scratchlm.errors import GenerationError, TokenizerError
from scratchlm.inference.sampling import SamplingParams
from scratchlm.tokenizer.chat_template import PLAIN, ChatTemplate, chat_template_of

USER, ASSISTANT = PLAIN.prefix["user"], PLAIN.prefix["assistant"]  # the plain transcript's markers
STOP = PLAIN.stop[0]  # "\nUser:": the model starting the user's next turn

NULLABLE = {"top_k", "seed"}  # numeric options that `/set NAME none` switches off
_KIND_NAMES = {int: "an integer", float: "a number"}

HELP = """commands:
  /reset              forget the conversation
  /set NAME VALUE     change a sampling option, e.g. /set temperature 0.7, /set top_k none,
                      /set stop_token_ids 5,7 (none: back to end-of-text)
  /show               show the sampling options
  /help               this help
  /quit               leave (or Ctrl-D); Ctrl-C stops the current reply"""


class ChatSession:
    """A conversation with a decoder-only model through an :class:`~scratchlm.inference.engine.Engine`."""

    def __init__(
        self, engine, template: ChatTemplate | None = None, system: str | None = None, **sampling: Any
    ):
        """``template``: default the one stored with ``engine.tokenizer`` (PLAIN if none); ``system``: an
        optional system message put before every conversation; ``sampling``: SamplingParams fields."""
        sampling.setdefault("max_new_tokens", 128)
        sampling.setdefault("temperature", 0.8)
        self.params = SamplingParams.from_kwargs(**sampling)  # validated defaults
        self.engine = engine
        self.template = template or chat_template_of(getattr(engine, "tokenizer", None))
        self.system = system
        self.history: list[tuple[str, str]] = []  # (user message, assistant reply)

    def reset(self) -> None:
        self.history.clear()

    def set_option(self, name: str, value: str) -> None:
        """Set one sampling option from its text form: numbers parsed by the field's type, ``none`` for the
        options that can be off, ``stop`` with backslash escapes (``\\n``), ``stop_token_ids`` as ``5,7``.

        Raises :class:`GenerationError` (one line) for an unknown name, a value that does not parse or one
        out of range; ``self.params`` is then unchanged.
        """
        fields = [f.name for f in dataclasses.fields(SamplingParams)]
        if name not in fields:
            raise GenerationError(f"unknown option {name!r} (valid: {', '.join(fields)})")
        off = value.lower() == "none"
        if name == "stop":
            parsed: Any = [] if off else [_unescape(value)]
        elif name == "stop_token_ids":
            try:
                parsed = None if off else [int(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise GenerationError(
                    f"/set stop_token_ids: {value!r} is not a comma-separated list of token ids (e.g. 5,7) "
                    "or none"
                ) from None
        elif off and name in NULLABLE:
            parsed = None
        else:
            kind = int if name in ("max_new_tokens", "top_k", "seed") else float
            try:
                parsed = kind(value)
            except ValueError:
                can_be_off = " or none" if name in NULLABLE else ""
                raise GenerationError(
                    f"/set {name}: {value!r} is not {_KIND_NAMES[kind]}{can_be_off}"
                ) from None
        self.params = dataclasses.replace(self.params, **{name: parsed})  # validated in __post_init__

    def messages(self, message: str, turns: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages: system (if any), the ``turns`` (default the whole
        history), then the new user ``message``."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, reply in self.history if turns is None else turns:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        return out + [{"role": "user", "content": message}]

    def prompt_for(self, message: str) -> str:
        """The rendered conversation ending in the generation prompt, oldest turns dropped to fit the
        context window."""
        turns = list(self.history)
        budget = self.engine.context_length - self.params.max_new_tokens
        while True:
            prompt = self.template.render(self.messages(message, turns), add_generation_prompt=True)
            if not turns or len(self.engine.encode_prompt(prompt)) <= budget:
                return prompt
            turns.pop(0)

    def reply(self, message: str) -> Iterator[str]:
        """Stream the reply to ``message``; the reply (or the part generated before the iterator is closed)
        is added to the history. A refused message (one the tokenizer cannot encode, say) is not."""
        options = dataclasses.asdict(self.params)
        options["stop"] = [*options["stop"], *self.template.stop]
        parts: list[str] = []
        refused = False
        try:
            started = False
            for delta in self.engine.stream(self.prompt_for(message), context="slide", **options):
                if not started:  # the model usually answers "Assistant: ..." with a space first
                    delta = delta.lstrip()
                    started = bool(delta)
                if delta:
                    parts.append(delta)
                    yield delta
        except (GenerationError, TokenizerError):
            refused = True
            raise
        finally:
            if not refused:
                self.history.append((message, "".join(parts).strip()))


def _unescape(text: str) -> str:
    """Backslash escapes typed in a command (``\\n``, ``\\t``, ``\\u00e9``) as characters; other text as
    typed (``unicode_escape`` reads bytes as latin-1, so non-ASCII text goes back through latin-1 -> UTF-8)."""
    try:
        decoded = text.encode("utf-8").decode("unicode_escape")
        return decoded if text.isascii() else decoded.encode("latin-1").decode("utf-8")
    except UnicodeError:  # "\\x" without digits, a trailing backslash...
        raise GenerationError(f"/set stop: {text!r} has a malformed backslash escape") from None


USER_LABEL = "you> "  # the interactive prompt
MODEL_LABEL = "model> "  # before each reply, so the transcript reads as a conversation


def run_repl(
    session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool = False, show_stats: bool = False
) -> int:
    """Read messages from ``stdin`` until EOF or ``/quit``; stream replies to ``stdout``. Returns 0.

    ``interactive`` prints the banner, the ``you> `` prompt and labels each reply ``model> `` (off for piped
    input, whose output is the bare replies, one per line, for scripts); ``show_stats`` prints the tokens/s
    of each reply after it.
    """
    if interactive:
        stdout.write("chat with the model; /help for commands, Ctrl-D to quit\n")
    while True:
        if interactive:
            stdout.write(USER_LABEL)
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            stdout.write("\n(/quit or Ctrl-D to leave)\n")
            continue
        if not line:  # EOF
            if interactive:
                stdout.write("\n")
            return 0
        message = line.rstrip("\n")
        if not message.strip():
            continue
        if message.startswith("/"):
            if _command(session, message, stdout):
                return 0
            continue
        reply = session.reply(message)
        if interactive:
            stdout.write(MODEL_LABEL)
        try:
            for delta in reply:
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:
            reply.close()  # stop generating; the shown part stays in the history
            stdout.write(" [stopped]")
        except (GenerationError, TokenizerError) as e:  # one line; the session goes on
            stdout.write(f"error: {e}")
        stdout.write("\n")
        if show_stats:
            stdout.write(f"({session.engine.last_stats.summary()})\n")
        stdout.flush()


def _command(session: ChatSession, line: str, stdout: TextIO) -> bool:
    """Run one /command; True means quit."""
    name, *args = line.split(maxsplit=2)
    if name in ("/quit", "/exit"):
        return True
    if name == "/reset":
        session.reset()
        stdout.write("(history cleared)\n")
    elif name == "/help":
        stdout.write(HELP + "\n")
    elif name == "/show":
        stdout.write(" ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(session.params).items()) + "\n")
    elif name == "/set" and len(args) == 2:
        try:
            session.set_option(args[0], args[1])
            stdout.write(f"({args[0]} = {getattr(session.params, args[0])!r})\n")
        except GenerationError as e:
            stdout.write(f"error: {e}\n")
    else:
        stdout.write(f"unknown command {line!r}; /help lists them\n")
    return False
