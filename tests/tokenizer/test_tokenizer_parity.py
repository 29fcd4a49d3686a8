"""Parity: GPT-2 files == tiktoken gpt2 == HF tokenizers; fast path == pure-Python reference."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scratchlm.corpus import builtin_corpus
from scratchlm.tokenizer import load_tokenizer, train_bpe_from_iterator

tiktoken = pytest.importorskip("tiktoken")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|pad|>"]
# Code points assigned in Python's Unicode data (14.0) only: for characters assigned later the libraries
# compared here disagree among themselves (regex 2026 has Unicode 17 tables, tiktoken's Rust regex an older
# version: U+323B0, CJK Extension J, is a letter to one and not to the other), so \p{L} splits differ.
ASSIGNED = st.characters(codec="utf-8", exclude_categories=("Cn",))

# unicode text with emoji, CJK, combining marks, whitespace runs, digits, contractions and special tokens
pieces = st.one_of(
    st.text(alphabet=ASSIGNED, max_size=12),
    st.sampled_from(
        ["😀", "👍🏽", "👨‍👩‍👧", "漢字", "日本語", "한국어", "é", "e\u0301", "a\u0308\u0323", "\u200d"]
    ),
    st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", "\u3000", "\xa0", "   \n"]),
    st.from_regex(r"[0-9]{1,7}", fullmatch=True),
    st.sampled_from(
        ["'s", "'LL", "don't", "It's", "<|endoftext|>", "<|endoftext|><|endoftext|>", "<|pad|>", "<|"]
    ),
    st.text(alphabet=ASSIGNED, max_size=6),
)
texts = st.lists(pieces, max_size=25).map("".join)


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return load_tokenizer(shared_data / "gpt2")


@pytest.fixture(scope="module")
def tt_gpt2(shared_data, gpt2):
    import os

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_data / "tiktoken_cache"))
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def hf_gpt2(shared_data):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(
        models.BPE.from_file(str(shared_data / "gpt2/vocab.json"), str(shared_data / "gpt2/merges.txt"))
    )
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.fixture(scope="module")
def corpora(shared_data) -> dict[str, str]:
    files = builtin_corpus().train.paths[:60]
    return {
        "tinyshakespeare": (shared_data / "tinyshakespeare.txt").read_text(),
        "tinystories_valid": (shared_data / "tinystories/valid_head.txt").read_text(),
        "tinystories_train": (shared_data / "tinystories/train_lowercased_4M.txt").read_text()[:1_000_000],
        "builtin": "\n".join(p.read_text(errors="replace") for p in files),
    }


def test_gpt2_files_layout(gpt2):
    assert (
        gpt2.vocab_size == 50257 and gpt2.special_tokens == {"<|endoftext|>": 50256} and gpt2.eot_id == 50256
    )
    assert gpt2.fast


@pytest.mark.parametrize("name", ["tinyshakespeare", "tinystories_valid", "tinystories_train", "builtin"])
def test_gpt2_parity_on_corpora(name, corpora, gpt2, tt_gpt2, hf_gpt2):
    text = corpora[name]
    ours = gpt2.encode(text)
    assert ours == tt_gpt2.encode_ordinary(text)
    assert ours == hf_gpt2.encode(text).ids
    # the pure-Python reference, on a sample (it is ~50x slower)
    sample = text[:100_000]
    assert gpt2.encode_reference(sample) == tt_gpt2.encode_ordinary(sample)
    assert gpt2.decode(ours) == text


@pytest.mark.slow
def test_gpt2_parity_whole_builtin_corpus(gpt2, tt_gpt2):
    texts = [p.read_text(errors="replace") for p in builtin_corpus().train.paths]
    assert gpt2.encode_batch(texts) == tt_gpt2.encode_ordinary_batch(texts)


def test_gpt2_saved_as_tokenizer_json_loads_in_hf(tmp_path, gpt2, corpora):
    path = tmp_path / "tokenizer.json"
    gpt2.save(path)
    hf = tokenizers.Tokenizer.from_file(str(path))
    text = corpora["tinyshakespeare"][:300_000] + "<|endoftext|>" + corpora["builtin"][:300_000]
    assert hf.encode(text).ids == gpt2.encode(text, allowed_special="all")
    again = load_tokenizer(path)
    assert again.merges == gpt2.merges and again.fingerprint == gpt2.fingerprint


@pytest.fixture(scope="module")
def hf_gpt2_json(gpt2, tmp_path_factory):
    """Our GPT-2 tokenizer saved as tokenizer.json (with <|endoftext|> as an added special token), in HF."""
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    gpt2.save(path)
    return tokenizers.Tokenizer.from_file(str(path))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_gpt2_parity_property(text, gpt2, tt_gpt2, hf_gpt2, hf_gpt2_json):
    ours = gpt2.encode(text)
    assert ours == tt_gpt2.encode_ordinary(text) == gpt2.encode_reference(text) == hf_gpt2.encode(text).ids
    with_specials = gpt2.encode(text, allowed_special="all")
    assert with_specials == tt_gpt2.encode(text, allowed_special="all") == hf_gpt2_json.encode(text).ids
    assert gpt2.decode(ours) == text


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request, corpora, tmp_path_factory):
    text = (
        corpora["tinyshakespeare"][:300_000] + corpora["builtin"][:200_000] + "日本語のテキスト 😀👍🏽 " * 20
    )
    tok = train_bpe_from_iterator(
        [text], 1200, special_tokens=SPECIALS, pattern=request.param, num_workers=1, progress=False
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return tok, tokenizers.Tokenizer.from_file(str(path))


def test_trained_parity_on_corpora(trained, corpora):
    tok, hf = trained
    for text in corpora.values():
        text = text[:200_000]
        ours = tok.encode(text)
        assert ours == hf.encode(text).ids
        assert ours[:5000] == tok.encode_reference(tok.decode(ours[:5000]))
        assert ours == tok.encode_reference(text)
        assert tok.decode(ours) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_trained_parity_property(text, trained):
    tok, hf = trained
    assert tok.fast
    ours = tok.encode(text)
    assert ours == tok.encode_reference(text)
    assert tok.encode(text, allowed_special="all") == hf.encode(text).ids
    assert tok.decode(ours) == text


# ---- the threaded fast path: exact because texts are cut only at context-free pre-token boundaries ----


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(texts, min_size=1, max_size=6), pieces=st.integers(2, 6))
def test_safe_cuts_keep_the_ids_exact(parts, pieces, trained):
    from scratchlm.tokenizer.tokenizer import split_at_safe_cuts

    tok, _ = trained  # a gpt2- and a gpt4-pattern tokenizer
    text = " ".join(parts) * 3
    cut = split_at_safe_cuts(text, pieces)
    assert "".join(cut) == text and len(cut) <= pieces
    assert [i for p in cut for i in tok.encode_reference(p)] == tok.encode_reference(text)


@pytest.mark.parametrize("name", ["tinyshakespeare", "builtin"])
def test_threaded_encoding_equals_tiktoken(name, corpora, gpt2, tt_gpt2, monkeypatch):
    from scratchlm.tokenizer.tokenizer import split_at_safe_cuts

    text = corpora[name]
    assert len(split_at_safe_cuts(text, 3)) == 3  # real text has safe cuts: the threaded path runs
    monkeypatch.setattr(gpt2, "num_threads", 3)
    assert gpt2.encode(text) == tt_gpt2.encode_ordinary(text)
    with_specials = text[:400_000] + "<|endoftext|>" + text[400_000:]
    assert gpt2.encode(with_specials, allowed_special="all") == tt_gpt2.encode(
        with_specials, allowed_special="all"
    )
    docs = text.split("\n\n")
    assert len(docs) >= 64
    assert gpt2.encode_batch(docs) == tt_gpt2.encode_ordinary_batch(docs)
    docs[5] += "<|endoftext|>"
    assert gpt2.encode_batch(docs, allowed_special="all") == [
        tt_gpt2.encode(d, allowed_special="all") for d in docs
    ]
    monkeypatch.setattr(gpt2, "num_threads", 1)
    assert gpt2.encode_batch(docs) == tt_gpt2.encode_ordinary_batch(docs)
