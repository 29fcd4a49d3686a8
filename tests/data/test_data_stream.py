"""Streaming sources (data/stream.py, stream_readers.py, hub.py) on local "remote-like" data.

The reference is the sharded path: documents encoded by ``prepare`` and read by the sequential TokenLoader
(windows of T+1 tokens at 0, T, 2T, ...) must be exactly the batches the stream yields, whatever the file
format, the reader (our readers or HF datasets' streaming mode) and the number of worker processes.
"""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from stream_helpers import ByteTok

from scratchlm.config import load_config
from scratchlm.corpus import HFSource, JsonlSource, ParquetSource, TextFileSource
from scratchlm.data.hub import open_streaming
from scratchlm.data.loader import TokenLoader
from scratchlm.data.prepare import prepare
from scratchlm.data.stream import Candidate, StreamLoader, candidates, parse_mixture
from scratchlm.data.stream_readers import records
from scratchlm.errors import ConfigError, DataError

B, T = 4, 16


def make_docs(n: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "stream", "token", "model", "data", "résumé", "λ", "loss", "shard", "batch"]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], blank_every: int = 7) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "id": i}) + "\n")
            if i % blank_every == 3:
                f.write("\n")  # blank lines are not records
    return path


def write_parquet(path: Path, docs: list[str], row_group: int = 7) -> Path:
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The same 60 documents (with a whitespace-only one) as jsonl, jsonl.gz, parquet and text files."""
    tmp = tmp_path_factory.mktemp("stream")
    docs = make_docs()
    docs[10] = "   \n"  # skipped by both paths
    (tmp / "jsonl").mkdir()
    write_jsonl(tmp / "jsonl" / "a.jsonl", docs[:25])
    write_jsonl(tmp / "jsonl" / "b.jsonl.gz", docs[25:])
    (tmp / "parquet").mkdir()
    write_parquet(tmp / "parquet" / "a.parquet", docs[:33])
    write_parquet(tmp / "parquet" / "b.parquet", docs[33:])
    (tmp / "text").mkdir()
    for i, d in enumerate(docs):
        (tmp / "text" / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    shards = tmp / "shards"
    src = JsonlSource(sorted((tmp / "jsonl").iterdir()))
    prepare(src, ByteTok(), shards, val_fraction=0.0, num_workers=1, progress=False)
    return {"dir": tmp, "docs": docs, "shards": shards}


def loader(specs, *, workers=0, **kw) -> StreamLoader:
    """A loader over one source (a list of specs) or a mixture (a list of (weight, specs))."""
    if isinstance(specs[0], tuple):
        total = sum(w for w, _ in specs)
        cands = [Candidate("mixture", [(w / total, s) for w, s in specs])]
    else:
        cands = [Candidate(" + ".join(specs), [(1.0, list(specs))])]
    return StreamLoader(cands, ByteTok(), kw.pop("batch_size", B), kw.pop("T", T), workers=workers, **kw)


def take(ld, n: int) -> np.ndarray:
    """n batches as one (n, B, T + 1) array of windows."""
    out = []
    for _ in range(n):
        x, y = ld.next_batch()
        assert x.dtype == y.dtype and x.shape == y.shape == (ld.B, ld.T) and (x[:, 1:] == y[:, :-1]).all()
        out.append(np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1))
    return np.stack(out)


def sharded_epoch(shards: Path) -> np.ndarray:
    tl = TokenLoader(shards, batch_size=B, context_length=T, mode="sequential")
    return take(tl, tl.batches_per_epoch)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_is_the_sharded_sequential_loader(data, workers):
    """jsonl + jsonl.gz (blank lines, an empty document) streamed = prepare + sequential TokenLoader."""
    ref = sharded_epoch(data["shards"])
    ld = loader([str(data["dir"] / "jsonl" / "*")], workers=workers)
    try:
        np.testing.assert_array_equal(take(ld, len(ref)), ref)
    finally:
        ld.close()


def test_every_format_and_hf_streaming_give_the_same_tokens(data):
    d, ref = data["dir"], sharded_epoch(data["shards"])
    specs = {
        "parquet glob": [str(d / "parquet" / "*.parquet")],
        "text files": [str(d / "text")],
        "jsonl": [str(d / "jsonl" / "a.jsonl"), str(d / "jsonl" / "b.jsonl.gz")],
    }
    for name, spec in specs.items():
        np.testing.assert_array_equal(take(loader(spec), len(ref)), ref, err_msg=name)
    # the same files through datasets' streaming mode (the path hub datasets take)
    for builder, files in (
        ("json", sorted((d / "jsonl").iterdir())),
        ("parquet", sorted((d / "parquet").iterdir())),
    ):
        src = HFSource(builder, data_files=[str(f) for f in files])
        texts = [t for _, _, t in records(src)]
        assert texts == data["docs"], builder


def test_resume_mid_record_mid_epoch_with_a_mixture(data):
    """Stop after 37 batches (mid-document, after an epoch wrap), restore into a new loader: same tokens."""
    d = data["dir"]
    specs = [(0.6, [str(d / "jsonl" / "a.jsonl")]), (0.4, [str(d / "parquet" / "*.parquet")])]
    full = loader(specs, workers=0, seed=3, T=32, batch_size=8)
    ref = take(full, 100)
    full.close()
    first = loader(specs, workers=1, seed=3, T=32, batch_size=8)
    np.testing.assert_array_equal(take(first, 37), ref[:37])
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    first.close()
    assert state["sources"][0]["epoch"] >= 1 and state["sources"][0]["offset"] > 0  # wrapped, mid-record
    resumed = loader(specs, workers=1, seed=3, T=32, batch_size=8)  # (the reference read in-process)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(take(resumed, 63), ref[37:])
    resumed.close()


def test_resume_refuses_other_settings_or_changed_files(data, tmp_path):
    spec = [str(data["dir"] / "jsonl" / "*")]
    state = (ld := loader(spec)).state_dict()
    take(ld, 2)
    with pytest.raises(DataError, match="context_length"):
        loader(spec, T=8).load_state_dict(state)
    f = tmp_path / "x.jsonl"
    write_jsonl(f, data["docs"])
    ld = loader([str(f)])
    take(ld, 3)
    state = ld.state_dict()
    write_jsonl(f, data["docs"][::-1])
    with pytest.raises(DataError, match="changed since the checkpoint"):
        loader([str(f)]).load_state_dict(state)


def test_mixture_token_shares_match_the_weights_over_1m_tokens(tmp_path):
    """Three sources with disjoint alphabets: the share of rows (= tokens) of each is within 1% of its weight."""
    rng = np.random.default_rng(0)
    alphabets = {"a": "abcdefghijklm", "b": "nopqrstuvwxyz", "c": "0123456789"}
    specs = []
    for (name, letters), w in zip(alphabets.items(), (5, 3, 2)):
        docs = ["".join(rng.choice(list(letters), size=int(rng.integers(20, 400)))) for _ in range(50)]
        specs.append((w, [str(write_jsonl(tmp_path / f"{name}.jsonl", docs))]))
    ld = loader(specs, batch_size=64, T=32, seed=1)
    n_batches = 1_000_000 // (64 * 32) + 1
    rows = take(ld, n_batches).reshape(-1, 33)
    first = rows[np.arange(len(rows)), np.argmax(rows != 256, axis=1)]  # a letter of the row (not EOT)
    shares = [np.isin(first, [ord(c) for c in letters]).mean() for letters in alphabets.values()]
    assert rows.size >= 1_000_000 and sum(shares) == pytest.approx(1.0)
    assert np.allclose(shares, [0.5, 0.3, 0.2], atol=0.01), shares
    for letters, share in zip(alphabets.values(), shares):  # rows never mix sources (EOT aside)
        mine = np.isin(rows, [ord(c) for c in letters] + [256]).all(axis=1)
        assert mine.mean() == pytest.approx(share)


def test_parse_mixture_and_config_errors():
    assert parse_mixture(["3:a.jsonl", "1:hf:allenai/c4:train:en"]) == [
        (0.75, ["a.jsonl"]),
        (0.25, ["hf:allenai/c4:train:en"]),
    ]
    for bad in (["a.jsonl"], ["0:a.jsonl"], ["x:a.jsonl"], ["nan:a"]):
        with pytest.raises(ConfigError, match="WEIGHT:SOURCE"):
            parse_mixture(bad)
    with pytest.raises(ConfigError, match="needs data.stream=true"):
        load_config(None, ["data.mixture=1:a.jsonl"])
    with pytest.raises(ConfigError, match="data.max_tokens"):
        load_config(None, ["data.max_tokens=0"])
    cfg = load_config(None, ["data.stream=true", "data.source=a.jsonl", "data.fallback=b.jsonl,c.txt"])
    assert [c.label for c in candidates(cfg.data)] == ["a.jsonl", "b.jsonl", "c.txt"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf-json"])
def test_ranks_read_disjoint_records_that_cover_the_source(data, kind):
    d, docs = data["dir"], data["docs"]
    src = {
        "jsonl": JsonlSource(sorted((d / "jsonl").iterdir())),
        "parquet": ParquetSource(sorted((d / "parquet").iterdir())),
        "hf-json": HFSource("json", data_files=[str(f) for f in sorted((d / "jsonl").iterdir())]),
    }[kind]
    seen = [[t for _, _, t in records(src, None, r, 3)] for r in range(3)]
    assert sorted(sum(seen, [])) == sorted(docs)
    assert all(len(s) >= len(docs) // 3 - 1 for s in seen)
    # and resuming a rank at one of its own positions continues its own sequence
    pos = [p for p, _, _ in records(src, None, 1, 3)][5]
    assert [t for _, _, t in records(src, pos, 1, 3)] == seen[1][5:]


def test_loader_ranks_stream_disjoint_documents(data):
    spec = [str(data["dir"] / "text")]
    texts = []
    for r in range(2):
        toks = take(loader(spec, rank=r, world_size=2), 6)[:, :, :-1].reshape(-1)  # stride-T windows
        texts.append({t for t in bytes(toks[toks != 256].astype(np.uint8)).split(b"doc ") if t})
    assert texts[0] and texts[1] and not texts[0] & texts[1]


def test_text_files_one_document_each_and_binary_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.bin").write_bytes(b"\0\1\2")
    src = TextFileSource([tmp_path / "a.txt", tmp_path / "b.bin"])
    with pytest.raises(DataError, match="binary"):
        list(records(src))


def test_missing_source_falls_back_with_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    good = str(data["dir"] / "jsonl" / "*")
    cands = [
        Candidate("hf:nobody/nothing", [(1.0, ["hf:nobody/nothing"])]),
        Candidate(str(tmp_path / "gone.jsonl"), [(1.0, [str(tmp_path / "gone.jsonl")])]),
        Candidate(good, [(1.0, [good])]),
    ]
    ld = StreamLoader(cands, ByteTok(), B, T, workers=0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nobody/nothing is unavailable" in err[0] and "gone.jsonl" in err[1]
    np.testing.assert_array_equal(take(ld, 3), sharded_epoch(data["shards"])[:3])
    state = ld.state_dict()
    assert state["candidate"] == good
    again = StreamLoader(cands, ByteTok(), B, T, workers=0)
    again.load_state_dict(state)
    np.testing.assert_array_equal(take(again, 2), take(ld, 2))
    with pytest.raises(DataError, match="no data source could be opened: hf:nobody/nothing"):
        StreamLoader(cands[:2], ByteTok(), B, T, workers=0)


def test_unreachable_hub_fails_in_under_2s_in_one_line(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, a Hub that refuses connections, nothing cached: one line, well under 2 s."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    open_streaming("json")  # warm the imports: the budget is for the network, not for importing datasets
    t0 = time.perf_counter()
    with pytest.raises(DataError) as e:
        next(HFSource("roneneldan/TinyStories").documents())
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert "\n" not in msg and "cannot reach the Hugging Face Hub" in msg and "local files" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: the same, without asking the network
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set.*not in the local cache"):
        next(HFSource("roneneldan/TinyStories").documents())


def test_offline_hub_dataset_streams_from_the_local_cache(tmp_path, monkeypatch, capsys):
    """A dataset downloaded before (a snapshot in the HF cache) is streamed from there when offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "datasets--someone--stories"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    write_jsonl(repo / "snapshots" / "abc123" / "train.jsonl", ["one", "two", "three"])
    assert [t for _, _, t in records(HFSource("someone/stories"))] == ["one", "two", "three"]
    assert "cached copy of 'someone/stories'" in capsys.readouterr().out


@pytest.mark.slow
def test_training_data_starts_within_seconds_on_a_1gb_jsonl(tmp_path):
    """No prepare pass: the first batch of a 1 GB jsonl comes as fast as that of a 10 MB one."""
    block = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(2000)).encode()
    times = {}
    for name, mb in (("small", 10), ("large", 1000)):
        path = tmp_path / f"{name}.jsonl"
        with open(path, "wb") as f:
            for _ in range(int(mb * 1e6 / len(block)) + 1):
                f.write(block)
        t0 = time.perf_counter()
        ld = loader([str(path)], workers=1, batch_size=16, T=128)
        take(ld, 1)
        times[name] = time.perf_counter() - t0
        ld.close()
    assert times["large"] < times["small"] + 3 and times["large"] < 20, times
