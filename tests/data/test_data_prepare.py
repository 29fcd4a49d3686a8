"""prepare: round trip through shards, split rule, idempotency, atomicity, bad input."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from data_bytetok import ByteTokenizer, split_docs

from scratchlm.corpus import JsonlSource, TextFileSource
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import read_meta
from scratchlm.errors import DataError


class ListSource:
    """Documents from a list; optionally raises after ``fail_after`` documents (an interrupted run)."""

    def __init__(self, docs, fingerprint="list-v1", fail_after=None):
        self.docs, self.fingerprint, self.fail_after = docs, fingerprint, fail_after
        self.description = f"{len(docs)} test documents"

    def documents(self):
        for i, d in enumerate(self.docs):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt
            yield d


def make_docs(n=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "Käse", "über", "日本語", "naïve", "🙂", "x" * 40, "\n", "\t", "a b"]
    return [f"doc{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(0, 60))) for i in range(n)]


def read_split(out, split):
    meta = read_meta(out)
    docs, starts = [], []
    for sh in meta["splits"][split]["shards"]:
        tokens = np.fromfile(out / sh["file"], dtype=np.dtype(meta["dtype"]))
        idx = np.fromfile(out / sh["index"], dtype="<u8")
        shard_docs = split_docs(tokens)  # every shard ends at a document end
        expected_starts = np.cumsum([0] + [len(d) + 1 for d in shard_docs[:-1]])
        np.testing.assert_array_equal(idx, expected_starts)
        docs += [bytes(d).decode("utf-8") for d in shard_docs]
        starts.append(idx)
    return docs


@pytest.mark.parametrize("workers", [1, 3])
def test_round_trip_several_workers(tmp_path, workers):
    docs = make_docs()
    meta = prepare(
        ListSource(docs),
        ByteTokenizer(),
        tmp_path / "d",
        val_fraction=0.2,
        num_workers=workers,
        progress=False,
        shard_tokens=3000,
        task_chars=2000,
    )
    train, val = read_split(tmp_path / "d", "train"), read_split(tmp_path / "d", "val")
    # every document lands in exactly one split, order kept within each split
    assert sorted(train + val) == sorted(docs)
    it = iter(docs)
    assert all(any(d == x for x in it) for d in train)
    assert 0.1 < len(val) / len(docs) < 0.3
    assert meta["dtype"] == "uint16" and len(meta["splits"]["train"]["shards"]) > 3
    assert meta["splits"]["train"]["documents"] == len(train)
    assert meta["splits"]["train"]["tokens"] == sum(len(d.encode()) + 1 for d in train)
    # each split's UTF-8 text bytes (multi-byte characters included), the denominator of bits per byte
    for split, kept in (("train", train), ("val", val)):
        assert meta["splits"][split]["bytes"] == sum(len(d.encode("utf-8")) for d in kept)
    # the split is a function of the documents alone (not of worker count or order)
    again = prepare(
        ListSource(docs[::-1], "reversed"),
        ByteTokenizer(),
        tmp_path / "r",
        val_fraction=0.2,
        num_workers=1,
        progress=False,
    )
    assert sorted(read_split(tmp_path / "r", "val")) == sorted(val)
    assert again["split_rule"] == "hash"


def test_uint32_when_vocab_is_large(tmp_path):
    docs = make_docs(20)
    meta = prepare(
        ListSource(docs),
        ByteTokenizer(vocab_size=70_000),
        tmp_path,
        val_fraction=0.0,
        num_workers=1,
        progress=False,
    )
    assert (
        meta["dtype"] == "uint32"
        and (tmp_path / "train_000000.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]
    )
    assert read_split(tmp_path, "train") == docs


def test_explicit_val_source_and_files(tmp_path):
    for i in range(5):
        (tmp_path / f"t{i}.txt").write_text(f"train document {i}\n")
    (tmp_path / "v.jsonl").write_text('{"text": "val one"}\n\n{"text": "val two"}\n')
    train = TextFileSource(sorted(tmp_path.glob("t*.txt")), "five files")
    meta = prepare(
        train,
        ByteTokenizer(),
        tmp_path / "out",
        val_source=JsonlSource([tmp_path / "v.jsonl"]),
        num_workers=1,
        progress=False,
    )
    assert read_split(tmp_path / "out", "train") == [f"train document {i}\n" for i in range(5)]
    assert read_split(tmp_path / "out", "val") == ["val one", "val two"]
    assert meta["split_rule"] == "val_source" and meta["val_source"]["description"].endswith("field 'text')")


def test_single_document_is_split_by_position(tmp_path):
    text = "".join(f"line {i}\n" for i in range(1000))
    meta = prepare(
        ListSource([text]), ByteTokenizer(), tmp_path, val_fraction=0.1, num_workers=1, progress=False
    )
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
    assert train[0] + val[0] == text and val[0].startswith("line ") and 0.08 < len(val[0]) / len(text) < 0.12
    assert meta["split_rule"] == "position"
    assert [meta["splits"][s]["bytes"] for s in ("train", "val")] == [len(train[0]), len(val[0])]


def test_empty_documents_skipped_and_all_empty_is_an_error(tmp_path):
    meta = prepare(
        ListSource(["a", "", "  \n", "b"]),
        ByteTokenizer(),
        tmp_path / "a",
        val_fraction=0.0,
        num_workers=1,
        progress=False,
    )
    assert meta["skipped_empty_documents"] == 2 and read_split(tmp_path / "a", "train") == ["a", "b"]
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare(ListSource(["", " "]), ByteTokenizer(), tmp_path / "b", num_workers=1, progress=False)
    assert not (tmp_path / "b").exists()  # the failed prepare removed the directory it made


def test_idempotent_reuse_and_mismatch_errors(tmp_path):
    docs = make_docs(50)
    meta = prepare(ListSource(docs), ByteTokenizer(), tmp_path, num_workers=1, progress=False)
    mtime = (tmp_path / "train_000000.bin").stat().st_mtime_ns
    assert prepare(ListSource(docs), ByteTokenizer(), tmp_path, num_workers=1, progress=False) == meta
    assert (tmp_path / "train_000000.bin").stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="another tokenizer.*another --out"):
        prepare(ListSource(docs), ByteTokenizer(fingerprint="other"), tmp_path, num_workers=1, progress=False)
    with pytest.raises(DataError, match="another source"):
        prepare(ListSource(docs, "changed"), ByteTokenizer(), tmp_path, num_workers=1, progress=False)
    with pytest.raises(DataError, match="another val_fraction"):
        prepare(ListSource(docs), ByteTokenizer(), tmp_path, val_fraction=0.3, num_workers=1, progress=False)
    # a truncated shard is never reused silently
    with open(tmp_path / "train_000000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="prepare the data again"):
        prepare(ListSource(docs), ByteTokenizer(), tmp_path, num_workers=1, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, workers):
    docs = make_docs(200)
    with pytest.raises(KeyboardInterrupt):
        prepare(
            ListSource(docs, fail_after=150),
            ByteTokenizer(),
            tmp_path,
            num_workers=workers,
            progress=False,
            task_chars=500,
        )
    assert os.listdir(tmp_path) == []
    # leftovers of a harder crash (partial files, renamed shards without meta.json) are never trusted ...
    (tmp_path / ".train_000000.bin.partial").write_bytes(b"xx")
    (tmp_path / "train_000001.bin").write_bytes(b"xx")
    with pytest.raises(DataError, match="no meta.json.*interrupted"):
        read_meta(tmp_path)
    # ... and a new prepare replaces them
    prepare(ListSource(docs), ByteTokenizer(), tmp_path, val_fraction=0.0, num_workers=1, progress=False)
    assert read_split(tmp_path, "train") == docs and not (tmp_path / "train_000001.bin").exists()


def test_meta_json_is_plain_json(tmp_path):
    prepare(ListSource(make_docs(30)), ByteTokenizer(), tmp_path, num_workers=1, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == {
        "fingerprint": "bytes-v1",
        "vocab_size": 257,
        "eot_id": 256,
        "kind": "ByteTokenizer",
    }
    assert meta["source"]["fingerprint"] == "list-v1" and meta["format"] == "scratchlm-shards"


def snapshot(root):
    """{relative path: bytes, or None for a directory} of everything under ``root``."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def make_run_dir(root):
    root.mkdir()
    (root / "config.yaml").write_text("model:\n  n_layer: 2\n")
    (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    (root / "checkpoints" / "step_000100").mkdir(parents=True)
    (root / "checkpoints" / "step_000100" / "model.safetensors").write_bytes(os.urandom(64))
    return root


def test_a_run_directory_as_out_is_refused_and_left_intact(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run")
    before = snapshot(run)
    with pytest.raises(DataError, match="is not empty and is not a shard directory") as e:
        prepare(ListSource(make_docs(30)), ByteTokenizer(), run, num_workers=1, progress=False)
    assert str(run) in str(e.value) and "config.yaml" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(run) == before
    assert "interrupted" not in capsys.readouterr().err
    # the same through the CLI, with a real tokenizer file: one line, exit 2, nothing touched
    from scratchlm.cli import main
    from scratchlm.tokenizer.char import CharTokenizer

    (tmp_path / "corpus.txt").write_text("hello world\n" * 50)
    CharTokenizer.train(["hello world\n"]).save(tmp_path / "tok.json")
    args = ["data", "prepare", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tok.json")]
    assert main([*args, "--out", str(run), "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a shard directory" in err
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "files",
    [
        ["tokenizer.json"],  # a tokenizer's own directory: its tokenizer.json is not a leftover
        ["meta.json.bak", "train_000000.bin"],
        ["train_000000.bin", "tokenizer.json", "notes.txt"],
        ["train_1.bin"],
    ],
)
def test_foreign_files_in_out_are_never_deleted(tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    for name in files:
        (out / name).write_bytes(b"keep me")
    before = snapshot(out)
    with pytest.raises(DataError, match="not a shard directory"):
        prepare(ListSource(make_docs(30)), ByteTokenizer(), out, num_workers=1, progress=False)
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(DataError, match="is a file, not a directory"):
        prepare(ListSource(make_docs(30)), ByteTokenizer(), tmp_path / "out", num_workers=1, progress=False)
    assert (tmp_path / "out").read_text() == "x"


def test_leftovers_of_an_interrupted_commit_are_replaced(tmp_path, capsys):
    # killed inside shards.commit: shards and tokenizer.json renamed, meta.json not yet written
    for name in ("train_000000.bin", "train_000000.idx", "val_000000.bin", "tokenizer.json"):
        (tmp_path / name).write_bytes(b"old")
    for name in (".val_000000.idx.partial", ".tokenizer.json.partial", ".meta.json.partial"):
        (tmp_path / name).write_bytes(b"old")
    docs = make_docs(40)
    prepare(ListSource(docs), ByteTokenizer(), tmp_path, val_fraction=0.0, num_workers=1, progress=False)
    assert "removing 7 file(s) of an interrupted prepare" in capsys.readouterr().err
    assert read_split(tmp_path, "train") == docs
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train_000000.bin", "train_000000.idx"]


def test_two_prepares_of_one_directory_wait_for_each_other(tmp_path):
    """A second prepare of the same directory (parallel sweep runs share the shard cache) waits for the first
    and reuses its shards; without the lock it took the first one's files for leftovers and deleted them."""
    import threading

    docs = make_docs(60)
    started, go = threading.Event(), threading.Event()

    class SlowSource(ListSource):
        def documents(self):
            for i, d in enumerate(self.docs):
                if i == 1:  # the first prepare is under way, its .partial files exist: let the second start
                    started.set()
                    go.wait(timeout=10)
                yield d

    results = {}

    def run(name, source):
        try:
            results[name] = prepare(source, ByteTokenizer(), tmp_path / "d", num_workers=1, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            results[name] = e

    first = threading.Thread(target=run, args=("first", SlowSource(docs)))
    first.start()
    assert started.wait(timeout=10)
    second = threading.Thread(target=run, args=("second", ListSource(docs)))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # waiting for the lock, not writing into the first one's directory
    go.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert isinstance(results["first"], dict), results["first"]
    assert results["second"] == results["first"]  # reused, not re-encoded
    assert sorted(read_split(tmp_path / "d", "train") + read_split(tmp_path / "d", "val")) == sorted(docs)
