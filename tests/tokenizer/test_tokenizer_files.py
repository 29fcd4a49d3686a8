"""tokenizer.json / GPT-2 files / char tokenizer: load, save, corrupt files, fingerprints."""

from __future__ import annotations

import json

import pytest

from scratchlm.errors import TokenizerError
from scratchlm.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, train_bpe_from_iterator

TEXT = "hello world, hello there! 123 456\n" * 30


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe_from_iterator(
        [TEXT], 300, special_tokens=["<|endoftext|>", "<|pad|>"], num_workers=1, progress=False
    )


def test_save_load_roundtrip(tmp_path, tok):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    again = load_tokenizer(path)
    assert isinstance(again, Tokenizer)
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert load_tokenizer(tmp_path).merges == tok.merges  # a directory holding tokenizer.json
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["model"]["type"] == "BPE"
    assert [t["content"] for t in data["added_tokens"]] == ["<|endoftext|>", "<|pad|>"]
    assert all(t["special"] for t in data["added_tokens"])


def test_fingerprint_changes_with_content(tok):
    other = train_bpe_from_iterator(
        [TEXT + "more text"], 300, special_tokens=["<|endoftext|>", "<|pad|>"], num_workers=1, progress=False
    )
    assert other.fingerprint != tok.fingerprint


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a tokenizer file"),
        ('{"something": 1}', "neither"),
        ('{"model": {"type": "BPE"}}', "not a valid tokenizer.json"),
    ],
)
def test_corrupt_files(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(path)


def test_corrupt_merges_and_vocab(tmp_path, tok):
    data = tok.to_hf_dict()
    bad = json.loads(json.dumps(data))
    bad["model"]["merges"][0] = "nope nope"
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(TokenizerError, match="merge #0"):
        load_tokenizer(tmp_path / "a.json")
    for merge in (7, [1, 2], ["a"], None):  # not a pair of token strings: was a TypeError
        bad["model"]["merges"][0] = merge
        (tmp_path / "a.json").write_text(json.dumps(bad))
        with pytest.raises(TokenizerError, match="merge #0 .* is not a pair of tokens"):
            load_tokenizer(tmp_path / "a.json")
    bad = json.loads(json.dumps(data))
    bad["model"]["vocab"]["with space"] = 5000
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(TokenizerError, match="not a byte-level"):
        load_tokenizer(tmp_path / "b.json")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TokenizerError, match="neither"):
        load_tokenizer(tmp_path / "empty_dir")


def test_char_tokenizer(tmp_path, shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    tok = CharTokenizer.train([text])
    assert tok.vocab_size == 65 + 1  # nanoGPT's shakespeare_char has 65 characters
    assert tok.chars == sorted(set(text))
    ids = tok.encode(text[:1000])
    assert ids == [tok.chars.index(c) for c in text[:1000]]
    assert tok.decode(ids) == text[:1000]
    assert tok.encode("a<|endoftext|>", allowed_special="all") == [tok.chars.index("a"), tok.eot_id]
    path = tmp_path / "char.json"
    tok.save(path)
    again = load_tokenizer(path)
    assert (
        isinstance(again, CharTokenizer) and again.chars == tok.chars and again.fingerprint == tok.fingerprint
    )
    with pytest.raises(TokenizerError, match="not in the training text"):
        tok.encode("😀")
    with pytest.raises(TokenizerError):
        CharTokenizer.train([""])
