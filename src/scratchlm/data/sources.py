"""Which text a run learns from, and where the tokenizer trained on it is cached.

    sources = training_sources(cfg)           # Sources(train, val, description): built-in corpus or data.source
    path = cached_tokenizer_path(cfg, sources)  # $SCRATCHLM_CACHE/tokenizers/<key>/tokenizer.json

The key of a cached artefact is a hash of everything that changes it (the sources' fingerprint and the
settings), so a changed file or setting never reuses a stale tokenizer or shard folder. These live below the
pipeline (pipeline.py uses them stage by stage) so that ``train/dryrun.py`` can size the real vocabulary
without importing the pipeline above it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchlm.config import Config

SEQ2SEQ_SPECIALS = ["<|endoftext|>", "<|bos|>", "<|pad|>"]


def cache_dir() -> Path:
    """Where cached tokenizers and shards live (``$SCRATCHLM_CACHE`` or ``~/.cache/scratchlm``)."""
    return Path(os.environ.get("SCRATCHLM_CACHE", Path.home() / ".cache" / "scratchlm"))


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Sources:
    """The text a run learns from: a train source and an optional explicit validation source."""

    train: Any
    val: Any | None
    description: str

    @property
    def fingerprint(self) -> str:
        return _key(self.train.fingerprint, self.val.fingerprint if self.val is not None else None)


def training_sources(cfg: Config) -> Sources:
    """The built-in corpus (split by file) when ``data.source`` is empty, else the user's sources."""
    from scratchlm.corpus import builtin_corpus, resolve_source

    if cfg.data.stream:  # a tokenizer is learnt from the head of the stream; nothing else reads it up front
        from scratchlm.data.stream import TokenizerSample

        return Sources(TokenizerSample(cfg.data), None, "the head of the stream")
    if not cfg.data.source or cfg.data.source == ["builtin"]:
        corpus = builtin_corpus(cfg.data.val_fraction)
        return Sources(corpus.train, corpus.val, corpus.train.description.rsplit(",", 1)[0])
    train = resolve_source(cfg.data.source, text_field=cfg.data.text_field)
    val = resolve_source(cfg.data.val_source, text_field=cfg.data.text_field) if cfg.data.val_source else None
    return Sources(train, val, train.description)


def cached_tokenizer_path(cfg: Config, sources: Sources) -> Path:
    """Where the tokenizer trained on ``sources`` with ``cfg.tokenizer``'s settings is cached."""
    tc = cfg.tokenizer
    specials = list(tc.special_tokens)
    if cfg.model.arch == "seq2seq":
        specials += [s for s in SEQ2SEQ_SPECIALS if s not in specials]
    # v=2: jsonl / parquet sources are read as records (v=1 trained on their raw bytes: never reuse those)
    settings = dict(kind=tc.kind, vocab_size=tc.vocab_size, specials=specials, pattern=tc.pattern, v=2)
    return cache_dir() / "tokenizers" / _key(sources.train.fingerprint, settings) / "tokenizer.json"
