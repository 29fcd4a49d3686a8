"""Damaged shard directories (meta.json structure, missing or truncated files) and the vocabulary check.

Each damage must surface as one DataError line naming the file, from ``read_meta`` (which training and eval
use), from ``TokenLoader`` and from ``scratchlm data info`` (exit 2), never as a traceback.
"""

from __future__ import annotations

import json
import shutil

import pytest

from scratchlm.cli import main
from scratchlm.data import shards
from scratchlm.data.loader import TokenLoader
from scratchlm.data.shards import read_meta
from scratchlm.errors import DataError
from scratchlm.tokenizer.char import CharTokenizer

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A directory made by `scratchlm data prepare` with a char tokenizer (so it holds tokenizer.json)."""
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text(TEXT)
    CharTokenizer.train([TEXT]).save(root / "tok.json")
    args = ["data", "prepare", str(root / "corpus.txt"), "--tokenizer", str(root / "tok.json")]
    assert main([*args, "--out", str(root / "out"), "--workers", "1", "--no-progress"]) == 0
    return root / "out"


@pytest.fixture
def damaged(prepared, tmp_path, capsys):
    """A fresh copy of the prepared directory, to damage."""
    capsys.readouterr()
    return shutil.copytree(prepared, tmp_path / "copy")


def info_error(d, capsys) -> str:
    code = main(["data", "info", str(d)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err


def test_intact_directory_reads(prepared, capsys):
    assert main(["data", "info", str(prepared)]) == 0
    assert "peek:" in capsys.readouterr().out
    meta = read_meta(prepared)
    assert TokenLoader(prepared, batch_size=2, context_length=8, vocab_size=meta["tokenizer"]["vocab_size"])


@pytest.mark.parametrize(
    "damage",
    ["truncate-odd", "truncate-even", "empty", "missing", "index-truncated", "index-missing", "val-missing"],
)
def test_damaged_shard_files_are_one_line_errors(damaged, capsys, damage):
    meta = json.loads((damaged / "meta.json").read_text())
    train = meta["splits"]["train"]["shards"][0]
    name, size = {
        "truncate-odd": (train["file"], 11),
        "truncate-even": (train["file"], 10),
        "empty": (train["file"], 0),
        "missing": (train["file"], None),
        "index-truncated": (train["index"], 3),
        "index-missing": (train["index"], None),
        "val-missing": (meta["splits"]["val"]["shards"][0]["file"], None),
    }[damage]
    path = damaged / name
    if size is None:
        path.unlink()
    else:
        with open(path, "r+b") as f:
            f.truncate(size)
    found = "missing" if size is None else f"is {size} bytes"
    err = info_error(damaged, capsys)
    assert str(path) in err and found in err and "meta.json says" in err and "prepare" in err
    with pytest.raises(DataError, match=f"{found}, meta.json says"):
        read_meta(damaged)
    with pytest.raises(DataError, match=f"{found}, meta.json says"):
        TokenLoader(damaged, batch_size=2, context_length=8)


def _set(key, value):
    def edit(meta):
        meta[key] = value
        return meta

    return edit


def _del(*keys):
    def edit(meta):
        d = meta
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
        return meta

    return edit


def _shard(key, value):
    def edit(meta):
        meta["splits"]["train"]["shards"][0][key] = value
        return meta

    return edit


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: [m], "a JSON list, not an object"),
        (lambda m: "meta", "a JSON str, not an object"),
        (_del("splits"), "'splits' must be an object"),
        (_set("splits", []), "'splits' must be an object"),
        (_del("splits", "val"), "'splits' must be an object with train and val"),
        (_set("dtype", "bogus"), "dtype 'bogus' is not one of uint16, uint32"),
        (_set("dtype", "float32"), "dtype 'float32'"),
        (_del("dtype"), "dtype None"),
        (_set("tokenizer", "char"), "'tokenizer' must be an object"),
        (_del("tokenizer", "vocab_size"), "'tokenizer' must be an object"),
        (_set("source", None), "'source' must be an object"),
        (_del("split_rule"), "no 'split_rule'"),
        (_shard("tokens", "many"), "splits.train.shards[0] has tokens 'many'"),
        (_shard("tokens", -4), "splits.train.shards[0] has tokens -4"),
        (_shard("file", "../../outside.bin"), "not a shard and its index"),
        (_shard("index", "train_000000.bin"), "not a shard and its index"),
        (_del("splits", "train", "shards"), "splits.train must be an object"),
        (lambda m: {**m, "splits": {**m["splits"], "train": {**m["splits"]["train"], "tokens": 7}}}, "is 7"),
    ],
)
def test_malformed_meta_json_is_a_one_line_error(damaged, capsys, edit, problem):
    path = damaged / "meta.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    err = info_error(damaged, capsys)
    assert str(path) in err and problem in err and "scratchlm data prepare" in err
    with pytest.raises(DataError, match="corrupt") as e:
        read_meta(damaged)
    assert problem in str(e.value)
    with pytest.raises(DataError, match="corrupt"):
        TokenLoader(damaged, batch_size=2, context_length=8)


def test_meta_json_that_is_not_utf8(damaged, capsys):
    (damaged / "meta.json").write_bytes(b"\xff\xfe{}")
    assert "meta.json is corrupt" in info_error(damaged, capsys)


def test_shard_ids_beyond_the_model_vocabulary_are_refused(prepared):
    vocab = read_meta(prepared)["tokenizer"]["vocab_size"]
    for ok in (vocab, vocab + 64):  # equal, or an embedding padded above the tokenizer's vocabulary
        shards.check_vocab(read_meta(prepared), ok, prepared)
        TokenLoader(prepared, batch_size=2, context_length=8, vocab_size=ok)
    with pytest.raises(DataError, match=f"vocab_size {vocab}.*model's vocab_size is {vocab - 1}"):
        shards.check_vocab(read_meta(prepared), vocab - 1, prepared)
    with pytest.raises(DataError, match=f"model.vocab_size >= {vocab}"):
        TokenLoader(prepared, batch_size=2, context_length=8, vocab_size=vocab - 1)


def test_shard_file_names_are_exact():
    for name in ("train_000000.bin", "val_000012.idx", ".train_000001.bin.partial", "train_1000000.bin"):
        assert shards.is_shard_file(name), name
    for name in (
        "tokenizer.json",
        "meta.json",
        ".tokenizer.json.partial",
        ".meta.json.partial",
        "config.yaml",
        "train_1.bin",
        "train_000000.bin.bak",
        "test_000000.bin",
        "train_００００００.bin",
        "train_000000.pt",
    ):
        assert not shards.is_shard_file(name), name
    assert not shards.is_shard_file(".train_000000.bin.partial", partial=False)
