"""`scratchlm tokenizer ...` through scratchlm.cli.main: outputs and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from scratchlm.cli import main
from scratchlm.tokenizer import load_tokenizer

TEXT = "".join(
    f"the cat {i} sat on the mat number {i * 7919 % 1000}. the dog sat on the log.\n" for i in range(300)
)


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text(TEXT)
    (d / "b.txt").write_text(TEXT.upper())
    return d


def test_train_encode_decode_stats(tmp_path, corpus, capsys):
    out = tmp_path / "tok.json"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus),
            "--vocab-size",
            "300",
            "--special",
            "<|endoftext|>",
            "<|pad|>",
            "--workers",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and out.is_file()
    tok = load_tokenizer(out)
    assert tok.vocab_size == 300 and list(tok.special_tokens) == ["<|endoftext|>", "<|pad|>"]
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "the cat<|pad|>"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode("the cat<|pad|>")
    assert (
        main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "the cat<|pad|>", "--allow-special"])
        == 0
    )
    assert int(capsys.readouterr().out.split()[-1]) == tok.special_tokens["<|pad|>"]
    assert main(["tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)]) == 0
    assert capsys.readouterr().out == "the cat<|pad|>\n"
    assert main(["tokenizer", "stats", "--tokenizer", str(out), "--file", str(corpus / "a.txt")]) == 0
    stats = capsys.readouterr().out
    assert "bytes/token" in stats and "longest" in stats


def test_train_char(tmp_path, corpus):
    out = tmp_path / "char.json"
    assert (
        main(["tokenizer", "train", "--kind", "char", "--input", str(corpus / "a.txt"), "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["type"] == "scratchlm-char"


@pytest.mark.parametrize(
    "args, match",
    [
        (["--input", "MISSING", "--vocab-size", "300"], "does not exist"),
        (["--input", "EMPTY", "--vocab-size", "300"], "empty"),
        (["--input", "DATA", "--vocab-size", "100"], "= 257 at least; raise --vocab-size"),  # the flag
        (["--input", "DATA", "--vocab-size", "300", "--special", "<|a|>", "<|a|>"], "twice"),
        (["--input", "DATA", "--vocab-size", "300", "--pattern", "(unclosed"], "valid regex"),
    ],
)
def test_train_errors(tmp_path, corpus, capsys, args, match):
    (tmp_path / "empty.txt").write_text("")
    subst = {"MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(tmp_path / "empty.txt"), "DATA": str(corpus)}
    args = [subst.get(a, a) for a in args]
    rc = main(
        ["tokenizer", "train", *args, "--workers", "1", "--out", str(tmp_path / "t.json"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and match in err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "t.json").exists()


def test_corrupt_tokenizer_file(tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"}}')
    rc = main(["tokenizer", "encode", "--tokenizer", str(bad), "--text", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_decode_bad_id(tmp_path, corpus, capsys):
    out = tmp_path / "tok.json"
    main(
        [
            "tokenizer",
            "train",
            "--input",
            str(corpus),
            "--vocab-size",
            "270",
            "--workers",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    capsys.readouterr()
    assert main(["tokenizer", "decode", "--tokenizer", str(out), "99999"]) == 2
    assert "error:" in capsys.readouterr().err


def test_undecodable_input_is_reported(tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("naïve café ".encode("latin-1") * 30)
    out = tmp_path / "tok.json"
    rc = main(
        [
            "tokenizer",
            "train",
            "--input",
            str(f),
            "--vocab-size",
            "270",
            "--workers",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0 and "60 undecodable byte(s)" in capsys.readouterr().err


def test_train_on_the_builtin_corpus(tmp_path):
    out = tmp_path / "builtin.json"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                "builtin",
                "--vocab-size",
                "258",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    tok = load_tokenizer(out)
    # Python source is indented with spaces: the most frequent pair of the standard library is two spaces
    assert tok.vocab_size == 258 and tok.decode_bytes([256]) == b"  "
