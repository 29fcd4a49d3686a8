"""Shared helpers of the training tests: a byte tokenizer and a tiny prepared shard directory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from scratchlm.config import Config, load_config
from scratchlm.corpus import FileSource, stdlib_root


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-text = 256 (independent of the tokenizer package)."""

    vocab_size = 257
    eot_id = 256
    special_tokens = {"<|endoftext|>": 256}
    fingerprint = hashlib.sha256(b"byte-tokenizer-v1").hexdigest()[:16]

    def encode(self, text: str, allowed_special="none") -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts, allowed_special="none") -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def corpus_text(chars: int = 60_000) -> str:
    """Deterministic real text: the start of a few standard-library modules."""
    parts = []
    for name in ("textwrap.py", "difflib.py", "argparse.py", "inspect.py"):
        parts.append((stdlib_root() / name).read_text(encoding="utf-8", errors="replace"))
    return "".join(parts)[:chars]


def make_data(tmp: Path, chars: int = 60_000, shard_tokens: int = 1 << 20) -> Path:
    """A prepared shard dir (one document cut 90/10 by position) from ``chars`` characters of text."""
    from scratchlm.data.prepare import prepare

    src = tmp / "corpus.txt"
    src.write_text(corpus_text(chars), encoding="utf-8")
    out = tmp / "shards"
    prepare(
        FileSource([src], description="test corpus"),
        ByteTokenizer(),
        out,
        val_fraction=0.1,
        num_workers=1,
        progress=False,
        shard_tokens=shard_tokens,
    )
    return out


def tiny_config(run_dir: Path, data_dir: Path, *overrides: str) -> Config:
    base = [
        f"train.run_dir={run_dir}",
        f"data.data_dir={data_dir}",
        "model.vocab_size=257",
        "model.n_layer=2",
        "model.n_head=2",
        "model.d_model=32",
        "model.context_length=32",
        "train.batch_size=4",
        "train.max_steps=12",
        "train.warmup_steps=2",
        "train.log_interval=2",
        "train.ckpt_interval=4",
        "train.progress=false",
        "train.device=cpu",
        "train.dtype=float32",
        "eval.interval=6",
        "eval.batches=2",
        "eval.sample_tokens=8",
        "tokenizer.vocab_size=257",
    ]
    return load_config(None, base + list(overrides))
