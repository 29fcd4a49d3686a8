"""Damaged shard directories: an empty or truncated meta.json, token ids beyond the vocabulary inside a .bin
shard, a garbage .idx document index. Each is one DataError naming the file, whatever the loader mode.

The generated versions (every truncation, random bit flips) are in tests/fuzz/test_fuzz_files.py.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.data.loader import TokenLoader
from scratchlm.data.shards import read_meta
from scratchlm.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import ByteTokenizer, corpus_text  # noqa: E402


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """Byte-tokenizer shards (vocab_size 257) of 12 documents, so the document index has entries to damage."""
    from scratchlm.corpus import FileSource
    from scratchlm.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("data")
    text = corpus_text(12_000)
    paths = []
    for i in range(12):
        paths.append(tmp / f"doc{i}.txt")
        paths[-1].write_text(text[i * 1000 : (i + 1) * 1000], encoding="utf-8")
    out = tmp / "shards"
    prepare(
        FileSource(paths, description="docs"),
        ByteTokenizer(),
        out,
        val_fraction=0.2,
        num_workers=1,
        progress=False,
    )
    assert read_meta(out)["splits"]["train"]["documents"] > 3
    return out


@pytest.fixture
def shards(clean, tmp_path) -> Path:
    """A private copy of the clean shard directory, to damage."""
    return Path(shutil.copytree(clean, tmp_path / "shards"))


# ---- 6. an empty or truncated meta.json ------------------------------------------------------------------------


@pytest.mark.parametrize("cut", [0, 1, 100, -2])
def test_truncated_meta_json_is_one_error(shards, cut, capsys):
    meta = shards / "meta.json"
    raw = meta.read_bytes()
    meta.write_bytes(raw[:cut] if cut >= 0 else raw[:cut] + b"\xff")
    with pytest.raises(DataError, match="meta.json is corrupt"):
        read_meta(shards)
    assert main(["data", "info", str(shards)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "meta.json" in err and err.count("\n") == 1


def test_hostile_meta_json_numbers_and_nesting(shards):
    meta = shards / "meta.json"
    for raw in ('{"format": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
        meta.write_text(raw)
        with pytest.raises(DataError, match="meta.json is corrupt"):
            read_meta(shards)


# ---- 9. ids beyond the vocabulary, garbage document index ------------------------------------------------------


def _poison(shards: Path, every: int = 25) -> None:
    """Put an id beyond meta.json's vocab_size (257 for the byte tokenizer) at every ``every``-th token."""
    ids = np.memmap(shards / "train_000000.bin", dtype="<u2", mode="r+")
    ids[::every] = 257
    ids.flush()


@pytest.mark.parametrize(
    "mode, doc_aligned", [("sequential", False), ("random", False), ("random", True), ("sequential", True)]
)
def test_ids_beyond_the_vocabulary_are_one_error_in_every_mode(shards, mode, doc_aligned):
    _poison(shards)
    loader = TokenLoader(shards, "train", batch_size=2, context_length=32, mode=mode, doc_aligned=doc_aligned)
    with pytest.raises(
        DataError, match=r"train_000000.bin' holds token id 257, beyond the tokenizer's vocab"
    ):
        loader.next_batch()


def test_ids_are_checked_against_the_shards_vocab_not_only_the_models(shards):
    """The model may be larger than the tokenizer (a padded embedding): an id in between is still wrong."""
    _poison(shards)
    loader = TokenLoader(shards, "train", batch_size=2, context_length=32, vocab_size=320)
    with pytest.raises(DataError, match="token id 257"):
        loader.next_batch()


@pytest.mark.parametrize(
    "garbage",
    [
        lambda n, tokens: np.full(n, 2**63, dtype="<u8"),  # beyond the shard
        lambda n, tokens: np.arange(n, dtype="<u8")[::-1].copy(),  # falling
        lambda n, tokens: np.zeros(n, dtype="<u8"),  # repeated
        lambda n, tokens: np.arange(1, n + 1, dtype="<u8"),  # not starting at 0
        lambda n, tokens: np.random.default_rng(0).integers(0, 2**64 - 1, n, dtype=np.uint64),
    ],
    ids=["beyond", "falling", "repeated", "not-from-0", "random"],
)
def test_garbage_document_index_is_one_error(shards, garbage):
    idx = shards / "train_000000.idx"
    n = idx.stat().st_size // 8
    tokens = (shards / "train_000000.bin").stat().st_size // 2
    garbage(n, tokens).astype("<u8").tofile(idx)
    with pytest.raises(DataError, match="document index .* is corrupt"):
        TokenLoader(shards, "train", batch_size=2, context_length=32, doc_aligned=True)


def test_clean_shards_still_load_in_every_mode(clean):
    for mode in ("random", "sequential"):
        for doc_aligned in (False, True):
            x, y = TokenLoader(clean, "train", 2, 32, mode=mode, doc_aligned=doc_aligned).next_batch()
            assert int(x.max()) < 257 and x.shape == (2, 32)
