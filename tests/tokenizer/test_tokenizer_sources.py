"""Tokenizer training reads its input as `data prepare` and `train data.source=` do (corpus.resolve_source):
a record of a .jsonl, .jsonl.gz or .parquet file is one document, never its raw (JSON or compressed) bytes.

The reference: the same documents as plain text files (one file per document) give the same merges.
"""

from __future__ import annotations

import gzip
import json

import pytest

from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.tokenizer import load_tokenizer

DOCS = [
    "the quick brown fox jumps over the lazy dog. " * 20,
    "she sells sea shells by the sea shore; the shells she sells are sea shells. " * 15,
    "pack my box with five dozen liquor jugs! " * 25,
]


def _train(tmp_path, *inputs, extra=()):
    out = tmp_path / f"tok{len(list(tmp_path.iterdir()))}.json"
    argv = ["tokenizer", "train", "--input", *map(str, inputs), "--vocab-size", "300", "--workers", "1"]
    assert main([*argv, "--out", str(out), "--no-progress", *extra]) == 0
    return load_tokenizer(out)


@pytest.fixture
def reference(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"{i}.txt").write_text(doc, encoding="utf-8")
    return _train(tmp_path, d)


def _jsonl(docs, field="text") -> str:
    return "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "parquet"])
def test_records_are_documents(tmp_path, reference, kind):
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text(_jsonl(DOCS), encoding="utf-8")
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(_jsonl(DOCS).encode()))
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"text": DOCS}), path)
    tok = _train(tmp_path, path)
    assert tok.merges == reference.merges
    vocab = {tok.decode_bytes([i]) for i in range(256, tok.vocab_size)}
    assert not any(b'"' in t or b"\\u" in t or b"{" in t for t in vocab)  # no JSON syntax learnt


def test_text_field_and_the_pipeline_use_the_same_layer(tmp_path, reference, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_text(_jsonl(DOCS, field="body"), encoding="utf-8")
    assert _train(tmp_path, path, extra=("--text-field", "body")).merges == reference.merges

    from scratchlm import pipeline

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        overrides=[
            f"data.source={path}",
            "data.text_field=body",
            "tokenizer.vocab_size=300",
            "tokenizer.num_workers=1",
        ]
    )
    assert pipeline.get_tokenizer(cfg, progress=False).merges == reference.merges


def test_a_gzip_file_without_its_suffix_is_refused_as_binary(tmp_path, capsys):
    path = tmp_path / "data.txt"
    path.write_bytes(gzip.compress(_jsonl(DOCS).encode()))
    assert main(["tokenizer", "train", "--input", str(path), "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: '{path}' looks like a binary file") and ".jsonl.gz" in err
    assert err.count("\n") == 1 and not (tmp_path / "t.json").exists()


@pytest.mark.parametrize("workers", ["-3", "0"])
def test_negative_or_zero_workers_are_refused(tmp_path, capsys, workers):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    argv = ["tokenizer", "train", "--input", str(tmp_path / "a.txt"), "--workers", workers]
    assert main([*argv, "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workers must be 1 or more") and err.count("\n") == 1


def test_library_refuses_negative_workers():
    from scratchlm.errors import TokenizerError
    from scratchlm.tokenizer import train_bpe_from_iterator

    with pytest.raises(TokenizerError, match="num_workers"):
        train_bpe_from_iterator(["hello world"], 260, num_workers=-3, progress=False)
