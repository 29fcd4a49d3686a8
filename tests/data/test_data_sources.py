"""Sources: files, directories, globs, jsonl, parquet, HF datasets (offline via the json builder); bad input."""

from __future__ import annotations

import json

import pytest

from scratchlm.corpus import ConcatSource, HFSource, JsonlSource, TextFileSource, resolve_source
from scratchlm.errors import DataError


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "sub" / "b.txt").write_text("beta ü")
    (tmp_path / "d" / ".hidden").write_text("no")
    rows = [{"text": "one", "id": 1}, {"text": "two", "id": 2}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_files_dirs_globs_and_concat(tree):
    assert list(resolve_source([str(tree / "d")]).documents()) == ["alpha", "beta ü"]
    assert list(resolve_source([str(tree / "d" / "*" / "*.txt")]).documents()) == ["beta ü"]
    src = resolve_source([str(tree / "d" / "a.txt"), str(tree / "r.jsonl")])
    assert isinstance(src, ConcatSource) and list(src.documents()) == ["alpha", "one", "two"]
    assert "jsonl" in src.description


def test_fingerprint_is_stable_and_follows_the_data(tree):
    a = resolve_source([str(tree / "r.jsonl")]).fingerprint
    assert resolve_source([str(tree / "r.jsonl")]).fingerprint == a
    assert resolve_source([str(tree / "r.jsonl")], text_field="id").fingerprint != a
    (tree / "r.jsonl").write_text('{"text": "changed"}\n')
    assert resolve_source([str(tree / "r.jsonl")]).fingerprint != a


def test_bad_sources(tree):
    with pytest.raises(DataError, match="'nope.txt' not found"):
        resolve_source(["nope.txt"])
    with pytest.raises(DataError, match="matches no files"):
        resolve_source([str(tree / "*.none")])
    with pytest.raises(DataError, match=r"r.jsonl:1: no field 'body' \(has: text, id\)"):
        list(JsonlSource([tree / "r.jsonl"], "body").documents())
    with pytest.raises(DataError, match="field 'id' is int, not text"):
        list(JsonlSource([tree / "r.jsonl"], "id").documents())
    (tree / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2: not valid JSON"):
        list(resolve_source([str(tree / "broken.jsonl")]).documents())
    (tree / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    with pytest.raises(DataError, match="looks like a binary file"):
        list(TextFileSource([tree / "img.png"]).documents())
    with pytest.raises(DataError, match="bad HF source"):
        resolve_source(["hf:"])


def test_parquet(tree):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", None, "p3"], "n": [1, 2, 3]}), tree / "t.parquet")
    src = resolve_source([str(tree / "t.parquet")], text_field="content")
    assert list(src.documents()) == ["p1", "", "p3"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(resolve_source([str(tree / "t.parquet")]).documents())


def test_hf_datasets_streaming_offline(tree):
    pytest.importorskip("datasets")
    src = HFSource("json", data_files=[str(tree / "r.jsonl")])
    assert list(src.documents()) == ["one", "two"]
    assert (
        "HF dataset json" in src.description
        and src.fingerprint == HFSource("json", data_files=[str(tree / "r.jsonl")]).fingerprint
    )
    with pytest.raises(DataError, match="no field 'body'"):
        list(HFSource("json", data_files=[str(tree / "r.jsonl")], text_field="body").documents())
    spec = resolve_source(["hf:roneneldan/TinyStories:validation"])
    assert (spec.name, spec.split, spec.config) == ("roneneldan/TinyStories", "validation", None)
