"""prepare + loader + CLI with real tokenizers: a BPE trained here, and GPT-2 (compared with tiktoken)."""

from __future__ import annotations

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.corpus import resolve_source
from scratchlm.data.loader import TokenLoader
from scratchlm.data.prepare import prepare
from scratchlm.data.shards import read_meta

tokenizer_mod = pytest.importorskip("scratchlm.tokenizer")


@pytest.fixture(scope="module")
def stories(tmp_path_factory, shared_data):
    """A few dozen TinyStories documents as jsonl, made from the shared validation head."""
    import json

    path = shared_data / "tinystories" / "valid_head.txt"
    if not path.is_file():
        pytest.skip("shared data not found")
    paras = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()][:80]
    out = tmp_path_factory.mktemp("stories") / "stories.jsonl"
    out.write_text("".join(json.dumps({"story": p}) + "\n" for p in paras))
    return out, paras


def decoded_docs(out, split, tok):
    meta = read_meta(out)
    docs = []
    for sh in meta["splits"][split]["shards"]:
        ids = np.fromfile(out / sh["file"], dtype=meta["dtype"]).tolist()
        pieces = tok.decode(ids).split("<|endoftext|>")
        assert pieces[-1] == ""
        docs += pieces[:-1]
    return docs


def test_trained_bpe_round_trip_with_workers(tmp_path, stories):
    path, paras = stories
    tok = tokenizer_mod.train_bpe_from_iterator(paras[:30], vocab_size=300, progress=False)
    source = resolve_source([str(path)], text_field="story")
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        meta = prepare(
            source, tok, out, val_fraction=0.2, num_workers=workers, progress=False, task_chars=3000
        )
        train, val = decoded_docs(out, "train", tok), decoded_docs(out, "val", tok)
        assert sorted(train + val) == sorted(paras) and val
        assert meta["tokenizer"]["fingerprint"] == tok.fingerprint and meta["dtype"] == "uint16"
    assert (tmp_path / "w1" / "train_000000.bin").read_bytes() == (
        tmp_path / "w2" / "train_000000.bin"
    ).read_bytes()
    x, y = TokenLoader(tmp_path / "w2", "train", 4, 32, mode="sequential").next_batch()
    assert x.max() < tok.vocab_size and (x[:, 1:] == y[:, :-1]).all()


def test_gpt2_shards_match_tiktoken(tmp_path, stories, shared_data):
    tiktoken = pytest.importorskip("tiktoken")
    path, paras = stories
    tok = tokenizer_mod.load_tokenizer(shared_data / "gpt2")
    prepare(
        resolve_source([str(path)], text_field="story"),
        tok,
        tmp_path,
        val_fraction=0.0,
        num_workers=2,
        progress=False,
    )
    ref = tiktoken.get_encoding("gpt2")
    expected = [t for p in paras for t in ref.encode_ordinary(p) + [ref.eot_token]]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "train_000000.bin", dtype=np.uint16), expected)


def test_cli_prepare_info_and_errors(tmp_path, stories, capsys):
    path, paras = stories
    tok = tokenizer_mod.train_bpe_from_iterator(paras[:20], vocab_size=280, progress=False)
    tok.save(tmp_path / "tok.json")
    args = [
        "data",
        "prepare",
        str(path),
        "--text-field",
        "story",
        "--tokenizer",
        str(tmp_path / "tok.json"),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "1",
        "--no-progress",
    ]
    assert main(args) == 0
    assert "train:" in capsys.readouterr().out
    assert main(["data", "info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "uint16" in out and tok.fingerprint in out and repr(paras[0][:10])[1:-1] in out
    # another tokenizer into the same directory: one-line error, exit 2, directory untouched
    other = tokenizer_mod.train_bpe_from_iterator(paras[:20], vocab_size=290, progress=False)
    other.save(tmp_path / "other.json")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert main(args[:6] + [str(tmp_path / "other.json")] + args[7:]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another tokenizer" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    # missing source, jsonl without the field, binary file
    (tmp_path / "bin.dat").write_bytes(b"\0\1\2" * 100)
    for bad, msg in (
        ([str(tmp_path / "missing.txt")], "not found"),
        ([str(path)], "no field 'text'"),
        ([str(tmp_path / "bin.dat")], "binary"),
    ):
        code = main(
            [
                "data",
                "prepare",
                *bad,
                "--tokenizer",
                str(tmp_path / "tok.json"),
                "--out",
                str(tmp_path / "bad"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and msg in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad").exists()  # the failed prepare removed the directory it made
    assert main(["data", "info", str(tmp_path / "bad")]) == 2
