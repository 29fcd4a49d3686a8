"""The generation engine for decoder-only models: KV cache, batching, per-row stopping, streaming.

    engine = Engine(model, tokenizer)
    results = engine.generate(["def ", "class "], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)
    for delta in engine.stream("import ", max_new_tokens=64): print(delta, end="")

How a request runs:

1. **Prefill.** The prompts are encoded and left-padded into one (B, L) batch; a single forward fills a
   preallocated KV cache (``model.make_cache``) with every prompt token. Row b's positions are
   ``cumsum(mask_b) - 1`` clipped at 0, so its first real token is position 0 whatever its padding, and the
   (B, S) attention mask hides the padding keys. Only the last position's logits are used.
2. **Decode.** One token per step per row: sample from the last logits (``sampling.sample``), feed the
   (B, 1) new tokens with the cache, repeat. Finished rows keep being fed (their output is ignored), so the
   batch stays rectangular and the cache aligned.
3. **Per-row stopping.** A row ends when it samples a stop token id (default: the tokenizer's end-of-text;
   the token is not part of the output), when its decoded text contains a stop string (the text is cut right
   before it; the tokens sampled so far stay in ``token_ids``), or after ``max_new_tokens``.

Text is built incrementally from each token's bytes with an incremental UTF-8 decoder, so a character split
across tokens appears only when complete; at the end, incomplete bytes become U+FFFD (as ``tokenizer.decode``
does). Streaming additionally holds back any tail that could be the start of a stop string.

Context-window policy (``context=``), when prompt + max_new_tokens exceeds the model's ``context_length``:

- not given (default): ``"slide"``, said once as a warning (HF ``generate`` and nanoGPT's ``generate`` keep
  going past the window too: nanoGPT crops the context to the last ``block_size`` tokens every step).
  Sliding rather than stopping gives the tokens that were asked for (docs/generation.md, "When the context
  window fills", has the measurement behind the choice).
- ``"error"``: raise :class:`GenerationError` before generating, naming the numbers.
- ``"slide"``: a sliding window. A prompt longer than the window keeps its last ``context_length`` tokens;
  whenever a row's window is full, its oldest tokens are dropped: its last ``context_length // 2`` tokens
  are re-prefilled (positions restart at 0) and decoding goes on. The model thus always sees between
  ``context_length // 2`` and ``context_length`` tokens, and a slide costs one prefill per
  ``context_length // 2`` new tokens.
- ``"stop"``: generate until the row's window is full, then finish with ``finish_reason="context"``.

In a batch the rows share one cache, which fills when the row with the most tokens in it reaches the
window. Rows whose own window still has room are then re-prefilled whole, without their padding, so every
row slides or stops exactly when it would alone.

An empty prompt starts after one end-of-text token (documents are separated by it in training).

Compiled decoding (``compile=True``): the one-token decode step runs through ``torch.compile`` with fixed
shapes. The KV cache holds the whole context window, the new token's keys and values are written at a
tensor slot, and the step attends over the filled slots, their number marked dynamic (model/cache.py), so
one compilation serves every step of every request of the same batch size. The first step of each new shape
compiles (tens of seconds on a CPU); :class:`GenerationStats` counts it as ``compile_seconds``, apart from
``decode_seconds``, and :meth:`GenerationStats.compile_note` says when it cost more than the decode it
sped up (one short generation does not pay for it; a chat or a server does). Inside the compiled step,
each Linear of at most 4 rows is a multiply-and-sum that inductor threads (inference/matvec.py: the model's
nn.Linear layers become ``MatVecLinear``, the same parameters and the same eager forward).
"""

from __future__ import annotations

import codecs
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import GenerationError
from scratchlm.inference.matvec import use_matvec_linears
from scratchlm.inference.sampling import (
    SamplingParams,
    build_processors,
    find_stop,
    make_generator,
    sample,
    stop_prefix_len,
)

CONTEXT_POLICIES = ("slide", "stop", "error")
DEFAULT_CONTEXT = "slide"  # the policy when none is given (said once when the window overflows)

# How messages name the options: Python keywords (the API) or the CLI's flags (`scratchlm generate`).
PYTHON_NAMES = {"context": "context='{}'", "max_new_tokens": "max_new_tokens"}
CLI_NAMES = {"context": "--context {}", "max_new_tokens": "--max-new-tokens"}


class GenerationCancelled(GenerationError):
    """The ``cancel`` event of :meth:`Engine.generate` / :meth:`Engine.stream` was set while generating."""


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation cancelled")


@dataclass
class GenerationResult:
    """One row's completion. ``seconds`` is the wall time of the whole batch it was generated in."""

    prompt: str
    text: str  # the completion (prompt excluded), cut before a stop string
    token_ids: list[int]  # sampled tokens (a final stop token id excluded)
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens) | "context" (window full)
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class GenerationStats:
    """Timing of the last request: prefill (prompt) and decode phases, tokens summed over rows."""

    batch_size: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0  # the first compiled step of a new shape (compile=True), not in decode
    decode_steps: int = 0  # (B, 1) forwards timed in decode_seconds
    slides: int = 0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds + self.compile_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode steps alone (B per step; the prefill and compilation out)."""
        if self.decode_seconds <= 0 or self.decode_steps == 0:
            return 0.0
        return self.batch_size * self.decode_steps / self.decode_seconds

    def compile_note(self) -> str | None:
        """A warning when torch.compile took longer than the decode it sped up; None otherwise."""
        if self.compile_seconds <= self.decode_seconds:
            return None
        return (
            f"torch.compile took {self.compile_seconds:.1f}s, more than the {self.decode_seconds:.2f}s of "
            f"decoding it sped up: --compile pays for itself over long or repeated generations (chat, the "
            "server), not one short sample"
        )

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of total wall time (prefill included)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        return (
            f"{self.new_tokens} new tokens ({self.batch_size} rows) in {self.seconds:.2f}s: "
            f"{self.tokens_per_second:.1f} tok/s; prefill {self.prompt_tokens} tokens in "
            f"{self.prefill_seconds * 1e3:.0f} ms, decode {self.decode_seconds:.2f}s"
            + (f" ({self.decode_tokens_per_second:.1f} tok/s)" if self.decode_tokens_per_second else "")
            + (f", compile {self.compile_seconds:.1f}s" if self.compile_seconds else "")
            + (f", {self.slides} window slides" if self.slides else "")
        )


@dataclass
class _Row:
    """Decoding state of one batch row: its tokens, its text so far and why it stopped."""

    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    window: int = 0  # how many of its tokens are in the KV cache now (padding excluded)
    text: str = ""
    finish_reason: str | None = None
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def finish(self, reason: str, flush: bool = True) -> None:
        """End the row; ``flush`` turns bytes of an unfinished character into U+FFFD (as tokenizer.decode)."""
        self.finish_reason = reason
        if flush:
            self.text += self.decoder.decode(b"", final=True)


class Engine:
    """Generates text with a decoder-only model (``scratchlm.model.gpt.GPT``) and its tokenizer.

    ``compile=True`` runs the one-token decode step through ``torch.compile`` with fixed shapes (module
    docstring, "Compiled decoding"); the prefill stays eager. Speed only, never needed for correctness.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        device: torch.device | str | None = None,
        compile: bool = False,
    ):
        if hasattr(model, "encode") or not hasattr(model, "make_cache"):
            raise GenerationError(
                f"{type(model).__name__} is not a decoder-only model; for seq2seq models use "
                "scratchlm.inference.beam.translate"
            )
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.context_length: int = model.config.context_length
        self.vocab_size: int = model.config.vocab_size
        self.eot_id: int | None = getattr(tokenizer, "eot_id", None)
        self._compiled = None
        if compile:  # the decode step's matrix-vector products threaded (inference/matvec.py)
            self._compiled = torch.compile(use_matvec_linears(model), dynamic=False)
        self._compiled_shapes: set[tuple] = set()  # (B, cache length, dtype) steps already compiled
        self._token_bytes: list[bytes] | None = None
        self.last_stats = GenerationStats()
        self.option_names = PYTHON_NAMES  # the CLI sets CLI_NAMES, so hints name the flags a user types

    # ------------------------------------------------------------------------------------------------------
    # public API

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        context: str | None = None,
        num_samples: int = 1,
        cancel: threading.Event | None = None,
        **sampling,
    ) -> list[GenerationResult]:
        """Complete each prompt (a str is one prompt); ``num_samples`` completions per prompt, in order.

        Keyword options are the fields of :class:`SamplingParams` (``max_new_tokens``, ``temperature``,
        ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``, ``frequency_penalty``, ``presence_penalty``,
        ``stop``, ``stop_token_ids``, ``seed``); ``context`` is the window policy (module docstring).
        All rows run as one left-padded batch. ``cancel`` (an event set from another thread, e.g. a server
        shutting down) stops after the current step with :class:`GenerationCancelled`.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if num_samples < 1:
            raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
        prompts = [p for p in prompts for _ in range(num_samples)]
        results = self.generate_ids(
            [self._encode(p) for p in prompts], context=context, cancel=cancel, **sampling
        )
        for p, r in zip(prompts, results):
            r.prompt = p
        return results

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        context: str | None = None,
        cancel: threading.Event | None = None,
        **sampling,
    ) -> list[GenerationResult]:
        """Like :meth:`generate` on token ids (each prompt non-empty); ``prompt`` is decoded from the ids."""
        if not prompt_ids:
            return []
        if any(len(ids) == 0 for ids in prompt_ids):
            raise GenerationError("a prompt has no tokens; give at least one token id (e.g. end-of-text)")
        params = SamplingParams.from_kwargs(**sampling)
        rows = [_Row(list(ids)) for ids in prompt_ids]
        start = time.perf_counter()
        for _ in self._run(rows, params, context):
            _check_cancel(cancel)
        seconds = time.perf_counter() - start
        return [
            GenerationResult(
                self.tokenizer.decode(list(ids)),
                r.text,
                r.new_ids,
                r.finish_reason or "length",
                len(r.prompt_ids),
                len(r.new_ids),
                seconds,
            )
            for ids, r in zip(prompt_ids, rows)
        ]

    def stream(
        self, prompt: str, *, context: str | None = None, cancel: threading.Event | None = None, **sampling
    ) -> Iterator[str]:
        """Yield the completion of one prompt as text deltas while it is generated.

        Concatenated, the deltas equal ``generate(prompt, ...)[0].text`` (same seed). A delta never ends
        inside a UTF-8 character, and text that might begin a stop string is held back until it is known
        not to. Closing the iterator early (``break``) simply stops generating.
        """
        params = SamplingParams.from_kwargs(**sampling)
        row = _Row(self._encode(prompt))
        shown = 0
        for _ in self._run([row], params, context):
            _check_cancel(cancel)
            safe = (
                len(row.text) if row.finish_reason else len(row.text) - stop_prefix_len(row.text, params.stop)
            )
            if safe > shown:
                yield row.text[shown:safe]
                shown = safe

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids the engine feeds for ``prompt`` (an empty prompt is one end-of-text token)."""
        return self._encode(prompt)

    # ------------------------------------------------------------------------------------------------------
    # the decoding loop

    def _encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            if self.eot_id is None:
                raise GenerationError("empty prompt and the tokenizer has no end-of-text token to start from")
            ids = [self.eot_id]
        return ids

    def _bytes_of(self, token: int) -> bytes:
        if self._token_bytes is None:  # one table lookup per token instead of a decode call
            n = getattr(self.tokenizer, "vocab_size", self.vocab_size)
            self._token_bytes = [self.tokenizer.decode_bytes([i]) for i in range(n)]
        return self._token_bytes[token] if token < len(self._token_bytes) else b""

    def _check_context(self, rows: list[_Row], params: SamplingParams, context: str | None) -> str:
        """Validate the request against the window; return the policy to run (None -> the default)."""
        name, max_new = self.option_names["context"].format, self.option_names["max_new_tokens"]
        given = context
        context = DEFAULT_CONTEXT if context is None else context
        if context not in CONTEXT_POLICIES:
            raise GenerationError(f"{name(context)} is not one of {', '.join(CONTEXT_POLICIES)}")
        outside = [t for t in params.stop_token_ids or [] if t >= self.vocab_size]
        if outside:
            raise GenerationError(
                f"stop token id {outside[0]} is not in the vocabulary (0..{self.vocab_size - 1})"
            )
        ctx = self.context_length
        longest = max(len(r.prompt_ids) for r in rows)
        over = (
            f"prompt of {longest} tokens + {max_new} {params.max_new_tokens} = "
            f"{longest + params.max_new_tokens} exceeds the model's context_length {ctx}"
        )
        if context == "error" and longest + params.max_new_tokens > ctx:
            raise GenerationError(
                f"{over}; shorten the prompt, lower {max_new}, or use {name('slide')} (sliding window) or "
                f"{name('stop')}"
            )
        if context == "stop" and longest >= ctx:
            raise GenerationError(
                f"prompt of {longest} tokens leaves no room in the context_length {ctx}; "
                f"shorten it or use {name('slide')}"
            )
        if given is None and longest + params.max_new_tokens > ctx:
            warnings.warn(
                f"{over}: the window slides (when full, generation goes on from its last {max(1, ctx // 2)} "
                f"tokens); {name('stop')} stops at the context, {name('error')} refuses",
                stacklevel=2,
            )
        if context == "slide":
            for r in rows:
                r.prompt_ids = r.prompt_ids[-ctx:]
        return context

    @torch.inference_mode()
    def _prefill(
        self, seqs: list[list[int]], cache
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Left-pad ``seqs``, run them through the model into ``cache`` (reset first).

        Returns (last logits (B, V) float32, full key mask (B, cache.max_len) bool or None when no row is
        padded, positions of the next token (B, 1) long or None).
        """
        B, L = len(seqs), max(len(s) for s in seqs)
        idx = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for b, s in enumerate(seqs):
            idx[b, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[b, L - len(s) :] = True
        idx = idx.to(self.device)
        cache.reset()
        cache.slot = None  # the prefill appends at cache.length (a compiled decode step sets a slot)
        if bool(mask.all()):
            logits, _ = self.model(idx, cache=cache)
            return logits[:, -1].float(), None, None
        mask = mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L): first real token at 0
        logits, _ = self.model(idx, cache=cache, positions=positions, attention_mask=mask)
        full_mask = torch.ones(B, cache.max_len, dtype=torch.bool, device=self.device)
        full_mask[:, :L] = mask
        return logits[:, -1].float(), full_mask, positions[:, -1:] + 1

    def _prefill_rows(self, rows: list[_Row], seqs: list[list[int]], cache):
        """:meth:`_prefill` of ``seqs`` (one per row), recording each row's window."""
        for r, seq in zip(rows, seqs):
            r.window = len(seq)
        return self._prefill(seqs, cache)

    def _next_windows(self, rows: list[_Row], context: str, stats: GenerationStats) -> list[list[int]] | None:
        """The tokens to re-prefill when the cache is full, per row; None when every row is done.

        The cache fills when the row with the most tokens in it reaches the window (a padded batch shares
        one cache). Each row then does what it would do alone: a row whose window plus its new token still
        fits is re-prefilled whole, without its padding, and goes on; a full row slides to its last
        ``context_length // 2`` tokens (``slide``) or ends with ``finish_reason="context"`` (``stop``).
        Finished rows get a one-token placeholder (their output is ignored).
        """
        ctx, seqs, slid = self.context_length, [], False
        for r in rows:
            keep = r.window + 1  # the window and the token just sampled (not in the cache yet)
            if r.finish_reason is None and keep > ctx:
                if context == "slide":
                    keep, slid = max(1, ctx // 2), True
                else:
                    r.finish("context")
            seqs.append((r.prompt_ids + r.new_ids)[-keep:] if r.finish_reason is None else [0])
        if all(r.finish_reason is not None for r in rows):
            return None
        stats.slides += slid
        return seqs

    def _fixed_shape_state(self, cache, full_mask, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """After a prefill, the tensors a compiled decode step updates in place: the key mask (B, max_len)
        bool (the filled, unpadded slots) and the next token's positions (B, 1) long."""
        B, filled = cache.batch_size, cache.length
        key_mask = torch.zeros(B, cache.max_len, dtype=torch.bool, device=self.device)
        if full_mask is None:
            key_mask[:, :filled] = True
            positions = torch.full((B, 1), filled, dtype=torch.long, device=self.device)
        else:
            key_mask[:, :filled] = full_mask[:, :filled]
        cache.slot = torch.full((1,), filled, dtype=torch.long, device=self.device)
        return key_mask, positions.clone()

    def _compiled_step(self, idx, cache, key_mask, positions, stats: GenerationStats) -> torch.Tensor:
        """One fixed-shape decode step through the compiled model: idx (B, 1) -> logits (B, 1, V).
        Writes slot ``cache.length``; the first step of a new shape is timed as compilation."""
        key_mask[:, cache.length] = True
        # (B, S): the step attends over the first S slots; S is dynamic, so one trace serves every length
        visible = key_mask[:, : cache.length + 1].clone(memory_format=torch.contiguous_format)
        torch._dynamo.maybe_mark_dynamic(visible, 1)
        shape = (cache.batch_size, cache.max_len, cache.k[0].dtype)
        first = shape not in self._compiled_shapes
        t0 = time.perf_counter()
        out, _ = self._compiled(idx, cache=cache, positions=positions, attention_mask=visible)
        if first:
            self._compiled_shapes.add(shape)
            stats.compile_seconds += time.perf_counter() - t0
        else:
            stats.decode_steps += 1
        cache.length += 1
        cache.slot += 1
        positions += 1
        return out

    @torch.inference_mode()
    def _run(self, rows: list[_Row], params: SamplingParams, context: str | None) -> Iterator[None]:
        """Generate into ``rows`` in place; yields after every step (streaming reads the rows then)."""
        context = self._check_context(rows, params, context)
        B, ctx, dev = len(rows), self.context_length, self.device
        stats = self.last_stats = GenerationStats(
            batch_size=B, prompt_tokens=sum(len(r.prompt_ids) for r in rows)
        )
        longest = max(len(r.prompt_ids) for r in rows)
        max_len = min(ctx, longest + params.max_new_tokens) if context != "slide" else ctx
        if self._compiled is not None:  # one shape per batch size: one compilation serves every request
            max_len = ctx
        # a compiled step's keys are a view of the first S slots; one spare slot keeps that view from ever
        # being the whole buffer, which torch.compile would trace a second time (it is contiguous)
        cache = self.model.make_cache(B, max_len=max_len + (self._compiled is not None))
        stop_ids = set(
            params.stop_token_ids
            if params.stop_token_ids is not None
            else ([self.eot_id] if self.eot_id is not None else [])
        )
        max_stop = max((len(s) for s in params.stop), default=0)
        processors = build_processors(params)
        generator = None if params.greedy else make_generator(params.seed, dev)
        counts = None
        if params.uses_counts:  # (B, V) occurrences of each token in the row's context
            counts = torch.zeros(B, self.vocab_size, device=dev)
            for b, r in enumerate(rows):
                counts[b].index_add_(
                    0, torch.tensor(r.prompt_ids, device=dev), torch.ones(len(r.prompt_ids), device=dev)
                )

        t0 = time.perf_counter()
        logits, full_mask, positions = self._prefill_rows(rows, [r.prompt_ids for r in rows], cache)
        stats.prefill_seconds = time.perf_counter() - t0
        fixed = self._fixed_shape_state(cache, full_mask, positions) if self._compiled is not None else None
        t0 = time.perf_counter()
        ones = torch.ones(B, 1, device=dev)
        for step in range(params.max_new_tokens):
            next_tokens = sample(logits, counts, params, generator, processors)  # (B,)
            for b, token in enumerate(next_tokens.tolist()):
                row = rows[b]
                if row.finish_reason is not None:
                    continue
                if token in stop_ids:
                    row.finish("stop")
                    continue
                row.new_ids.append(token)
                old_len = len(row.text)
                row.text += row.decoder.decode(self._bytes_of(token))
                if max_stop:
                    cut = find_stop(row.text, params.stop, start=old_len - max_stop + 1)
                    if cut is not None:
                        row.text = row.text[:cut]
                        row.finish("stop", flush=False)  # cut at the stop string
                        continue
                if len(row.new_ids) >= params.max_new_tokens:
                    row.finish("length")
            stats.new_tokens = sum(len(r.new_ids) for r in rows)
            yield
            if all(r.finish_reason is not None for r in rows) or step == params.max_new_tokens - 1:
                break
            if counts is not None:
                counts.scatter_add_(1, next_tokens[:, None], ones)
            if cache.length >= max_len:  # the window is full
                seqs = self._next_windows(rows, context, stats)
                if seqs is None:
                    break
                logits, full_mask, positions = self._prefill_rows(rows, seqs, cache)
                if fixed is not None:
                    fixed = self._fixed_shape_state(cache, full_mask, positions)
                continue
            idx = next_tokens[:, None]  # (B, 1)
            if fixed is not None:
                out = self._compiled_step(idx, cache, *fixed, stats)
            elif full_mask is None:
                out, _ = self.model(idx, cache=cache)
            else:
                out, _ = self.model(
                    idx, cache=cache, positions=positions, attention_mask=full_mask[:, : cache.length + 1]
                )
                positions = positions + 1
            if fixed is None:
                stats.decode_steps += 1
            for r in rows:
                r.window += 1
            logits = out[:, -1].float()
        for r in rows:
            if r.finish_reason is None:
                r.finish("length")
        stats.new_tokens = sum(len(r.new_ids) for r in rows)
        stats.decode_seconds = time.perf_counter() - t0 - stats.compile_seconds
        yield  # the final flush (incomplete UTF-8 -> U+FFFD) reaches streams too
