"""Instruction-tuning data: conversations in jsonl, rendered by a chat template, loss on assistant tokens only.

Input (``data.format=chat``, ``data.source=FILE.jsonl``): one conversation per line,
``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`` (other keys are ignored).

Encoding (:func:`encode_conversation`): the template (``tokenizer/chat_template.py``) cuts the rendered
conversation into segments; each is encoded on its own (the cuts fall on pre-token boundaries, so the ids are
those of the whole text) and every token is marked *trained* when it belongs to an assistant message's
content and turn end. For the window ``w`` of ``n <= T + 1`` tokens (truncated at the context length)::

    x[t] = w[t]                                    t = 0 .. n-2
    y[t] = w[t+1] if trained[t+1] else -100        (-100 = ignore_index of the cross-entropy)

so the loss is the mean cross-entropy over the assistant's tokens only: the model is never taught to write the
user's turns or the system prompt, only to answer them (and to end its turn: ``<|im_end|>`` is trained).

Batches: one conversation per row, padded to the longest row of the batch (x with end-of-text, y with
-100), so no row attends to another conversation and positions start at 0 as they do when chatting.
Conversations are encoded once, in memory (instruction sets are small; text corpora go through shards).
Resume is exact: the train loader draws batch ``s`` of rank ``r`` from
``numpy.random.default_rng([seed, r, s])`` (like :class:`~scratchlm.data.loader.TokenLoader`), so its state
is one integer. Validation reads the held-out conversations in order.

Split: ``data.val_source`` when given, else a conversation goes to validation when the sha256 of its JSON
line falls below ``data.val_fraction`` (fixed, whatever other lines the file gains).
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.config import Config
from scratchlm.errors import ChatFormatError, ConfigError, DataError
from scratchlm.fileio import read_utf8
from scratchlm.tokenizer.chat_template import ChatTemplate, chat_template_of, get_template

IGNORE = -100
STATE_VERSION = 1


def chat_tokenizer(cfg: Config):
    """The run's tokenizer (``tokenizer.path``, set by ``train.init_from``) with its chat template attached:
    ``data.chat_template``, else the one stored with the tokenizer, else chatml."""
    from scratchlm.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer.path)
    name = cfg.data.chat_template or tok.chat_template or "chatml"
    try:
        get_template(name)
    except ChatFormatError as e:
        raise ConfigError(f"data.chat_template: {e}") from None
    tok.chat_template = name
    return tok


def read_conversations(paths: list[str]) -> list[tuple[str, list[dict]]]:
    """(raw line, messages) of every conversation in the jsonl files (globs allowed), in order.

    DataError naming file and line for a line that is not JSON, has no ``messages`` or a malformed message.
    """
    files: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise DataError(f"chat data {p!r} is not a file (give .jsonl files of {{'messages': [...]}})")
        files += [Path(m) for m in matches]
    out = []
    for f in files:
        for n, line in enumerate(read_utf8(f, "chat data").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{n} is not valid JSON ({e.msg}); one conversation per line") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise DataError(f'{f}:{n} has no \'messages\' list; write {{"messages": [{{"role": ...}}]}}')
            try:
                get_template("chatml").segments(record["messages"])  # validates
            except ChatFormatError as e:
                raise DataError(f"{f}:{n}: {e}") from None
            out.append((line, record["messages"]))
    return out


def encode_conversation(
    tokenizer: Any, template: ChatTemplate, messages: list[dict]
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is trained (assistant content)."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, is_assistant in template.segments(messages):
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_assistant] * len(piece)
    return ids, trained


def training_pair(ids: list[int], trained: list[bool], context_length: int) -> tuple[list[int], list[int]]:
    """(x, y) of one conversation truncated to ``context_length + 1`` tokens: y = next token where it is
    trained, else -100. Both of length ``min(len(ids), T + 1) - 1``."""
    ids, trained = ids[: context_length + 1], trained[: context_length + 1]
    return ids[:-1], [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])]


class ChatBatch(tuple):
    """``(x, y)`` plus ``n_targets``, the trained targets, counted on the CPU so that the training loop
    needs no device sync to log tokens seen."""

    n_targets: int

    def __new__(cls, x: torch.Tensor, y: torch.Tensor, n_targets: int):
        batch = super().__new__(cls, (x, y))
        batch.n_targets = n_targets
        return batch


class ChatLoader:
    """(x, y) batches of conversations, one per row, padded to the batch's longest row; resumable.

    ``mode="random"``: batch s draws B conversations of this rank's share with rng([seed, rank, s]);
    ``mode="sequential"``: batch j of rank r holds conversations ``(j * world_size + r) * B + i`` (mod N).
    """

    def __init__(
        self,
        examples: list[tuple[list[int], list[int]]],
        batch_size: int,
        pad_id: int,
        *,
        split: str,
        mode: str = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if len(examples) < world_size:
            raise DataError(
                f"the {split} split has {len(examples)} conversations, fewer than {world_size} ranks"
            )
        self.examples, self.B, self.pad_id = examples, batch_size, pad_id
        self.split, self.mode, self.seed = split, mode, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.step = 0
        digest = hashlib.sha256()
        for x, y in examples:
            digest.update(np.asarray(x + y, dtype=np.int64).tobytes())
        self.fingerprint = digest.hexdigest()[:16]

    def batch_indices(self, step: int) -> list[int]:
        """The conversations of this rank's batch number ``step``."""
        n = len(self.examples)
        if self.mode == "sequential":
            g = step * self.world_size + self.rank
            return [(g * self.B + i) % n for i in range(self.B)]
        lo, hi = self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size
        return np.random.default_rng([self.seed, self.rank, step]).integers(lo, hi, size=self.B).tolist()

    def next_batch(self) -> ChatBatch:
        """x (B, L) int64 (padded with the end-of-text id), y (B, L) int64 (-100 where not trained),
        L = the longest conversation of the batch (<= context_length); ``.n_targets`` trained targets."""
        rows = [self.examples[i] for i in self.batch_indices(self.step)]
        self.step += 1
        L = max(len(x) for x, _ in rows)
        x = torch.full((self.B, L), self.pad_id, dtype=torch.long)
        y = torch.full((self.B, L), IGNORE, dtype=torch.long)
        for r, (xs, ys) in enumerate(rows):
            x[r, : len(xs)], y[r, : len(ys)] = torch.tensor(xs), torch.tensor(ys)
        return ChatBatch(x.to(self.device), y.to(self.device), int((y != IGNORE).sum()))

    def _identity(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "mode": self.mode,
            "batch_size": self.B,
            "seed": self.seed,
            "world_size": self.world_size,
            "data": self.fingerprint,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "chat", **self._identity(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off; DataError if it came from other data or settings."""
        if state.get("version") != STATE_VERSION or state.get("kind") != "chat":
            raise DataError(
                "the checkpoint's loader state is not a chat loader's; resume with data.format=chat"
            )
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise DataError(
                    f"cannot resume the chat loader: {key} was {state.get(key)!r}, now {value!r}; resume with "
                    "the same conversations, template and settings (or start a new run)"
                )
        self.step = int(state["step"])


def build_chat_loaders(cfg: Config, tokenizer: Any, device: torch.device, rank: int = 0, world_size: int = 1):
    """(train ChatLoader, factory of a fresh validation ChatLoader or None): ``make_loaders``' contract."""
    dc, T = cfg.data, cfg.model.context_length
    template = chat_template_of(tokenizer)
    train = read_conversations(dc.source)
    if dc.val_source:
        val = read_conversations(dc.val_source)
    else:
        held = [
            int(hashlib.sha256(line.encode()).hexdigest()[:8], 16) / 16**8 < dc.val_fraction
            for line, _ in train
        ]
        val = [c for c, h in zip(train, held) if h]
        train = [c for c, h in zip(train, held) if not h]

    def encode(convs: list[tuple[str, list[dict]]]) -> list[tuple[list[int], list[int]]]:
        pairs = [training_pair(*encode_conversation(tokenizer, template, m), T) for _, m in convs]
        return [
            (x, y) for x, y in pairs if any(t != IGNORE for t in y)
        ]  # no assistant token: nothing to learn

    train_ex, val_ex = encode(train), encode(val)
    if not train_ex:
        raise DataError(
            f"no training conversation of {dc.source} has an assistant message within the first {T} tokens"
        )
    common = dict(
        pad_id=tokenizer.eot_id, seed=cfg.train.seed, rank=rank, world_size=world_size, device=device
    )
    loader = ChatLoader(train_ex, cfg.train.batch_size, split="train", mode="random", **common)
    if len(val_ex) < world_size:
        return loader, None
    return loader, lambda: ChatLoader(val_ex, cfg.train.batch_size, split="val", mode="sequential", **common)
