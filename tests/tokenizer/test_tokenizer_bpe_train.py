"""BPE training: exact merges (hand example, brute-force reference, both merge paths), workers, specials,
streaming, errors."""

from __future__ import annotations

import os
from collections import Counter

import pytest

from scratchlm.corpus import builtin_corpus
from scratchlm.errors import DataError, TokenizerError
from scratchlm.tokenizer import bpe, pretokenize, train_bpe, train_bpe_from_iterator
from scratchlm.tokenizer.bpe import learn_merges
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, count_pretokens, iter_file_chunks, parallel_count


def merges_as_bytes(tok) -> list[tuple[bytes, bytes]]:
    return [(tok.token_bytes(a), tok.token_bytes(b)) for a, b in tok.merges]


def brute_force_merges(word_counts: dict[str, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Textbook BPE: recount every pair after every merge; ties -> greatest (bytes, bytes)."""
    words = {tuple(bytes([x]) for x in w.encode()): c for w, c in word_counts.items()}
    merges = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new_words: dict = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def test_hand_checkable_example():
    # words: low x5, lower x2, widest x3, newest x6 (whitespace pre-tokenization).
    # step 1: (e,s)=9 and (s,t)=9 tie; (b"s", b"t") > (b"e", b"s") -> st
    # step 2: (e,st)=9 -> est; step 3: (l,o)=7 ties (o,w)=7 -> (o,w) is greater -> ow
    # step 4: (l,ow)=7; step 5: (w,est)=6, (n,e)=6, (e,w)=6 tie -> (w,est); step 6: (n,e)=6 vs (e,west)=6 -> ne
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    tok = train_bpe_from_iterator([text], 256 + 6 + 1, pattern=r"\S+", num_workers=1, progress=False)
    assert merges_as_bytes(tok) == [
        (b"s", b"t"),
        (b"e", b"st"),
        (b"o", b"w"),
        (b"l", b"ow"),
        (b"w", b"est"),
        (b"n", b"e"),
    ]
    assert tok.vocab_size == 263 and tok.eot_id == 262


def test_matches_brute_force_on_real_text(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:60_000] + " aaaa abab ababab aaaaaaa\n" * 3
    counts = count_pretokens([text], GPT2_PATTERN, [])
    merges = learn_merges(counts, 250)
    vocab = [bytes([x]) for x in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    assert [(vocab[a], vocab[b]) for a, b in merges] == brute_force_merges(counts, 250)


def test_workers_give_identical_merges(tmp_path, shared_data):
    # many small files in small chunks -> many worker tasks, finished in a different order per worker count
    text = (shared_data / "tinyshakespeare.txt").read_text()[:400_000]
    files = []
    for i in range(8):
        f = tmp_path / f"part{i}.txt"
        f.write_text(text[i * 50_000 : (i + 1) * 50_000])
        files.append(f)
    chunk_chars = 30_000
    assert len(list(iter_file_chunks(files, ["<|endoftext|>"], chunk_chars))) >= 8
    one = train_bpe(files, 700, num_workers=1, progress=False, chunk_chars=chunk_chars)
    two = train_bpe(files, 700, num_workers=2, progress=False, chunk_chars=chunk_chars)
    three = train_bpe(files, 700, num_workers=3, progress=False, chunk_chars=chunk_chars)
    assert one.merges == two.merges == three.merges
    assert len(one.merges) == 700 - 257
    assert one.merges == train_bpe(files, 700, num_workers=1, progress=False).merges  # chunking-independent


def test_spawn_workers_give_the_same_counts(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text()[:100_000]
    chunks = [[text[i : i + 10_000]] for i in range(0, len(text), 10_000)]
    serial = parallel_count(iter(chunks), GPT2_PATTERN, ["<|endoftext|>"], num_workers=1)
    spawned = parallel_count(
        iter(chunks), GPT2_PATTERN, ["<|endoftext|>"], num_workers=2, start_method="spawn"
    )
    assert spawned == serial


def test_streaming_chunks_do_not_change_pretokens(tmp_path, shared_data):
    """Cutting a big file into blocks (at specials or safe newlines) gives the same counts as reading it whole."""
    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
    text = text.replace("\n\n", "\n\n<|endoftext|>", 50)
    f = tmp_path / "big.txt"
    f.write_text(text)
    whole = count_pretokens([text], GPT2_PATTERN, ["<|endoftext|>"])
    chunks = list(iter_file_chunks([f], ["<|endoftext|>"], chunk_chars=4096))
    assert len(chunks) > 20
    streamed = Counter()
    for c in chunks:
        streamed.update(count_pretokens(c, GPT2_PATTERN, ["<|endoftext|>"]))
    assert streamed == whole
    no_special = text.replace("<|endoftext|>", "")
    f.write_text(no_special)
    chunks = list(iter_file_chunks([f], [], chunk_chars=4096))
    streamed = Counter()
    for c in chunks:
        streamed.update(count_pretokens(c, GPT2_PATTERN, []))
    assert len(chunks) > 20 and streamed == count_pretokens([no_special], GPT2_PATTERN, [])


def test_special_tokens_split_training_text():
    # "ab" occurs only across the special token: no merge may join them, and the special is not learned
    text = "xa<|endoftext|>bx " * 50
    tok = train_bpe_from_iterator([text], 256 + 1 + 4, num_workers=1, progress=False)
    learned = {tok.token_bytes(a) + tok.token_bytes(b) for a, b in tok.merges}
    assert b"ab" not in learned and not any(b"<|" in t for t in learned)
    assert b"xa" in learned and b"bx" in learned


def test_trained_ids_follow_merge_order():
    tok = train_bpe_from_iterator(
        ["hello world hello there"] * 3,
        270,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        num_workers=1,
        progress=False,
    )
    for k, (a, b) in enumerate(tok.merges):
        assert tok.token_bytes(256 + k) == tok.token_bytes(a) + tok.token_bytes(b)
    assert tok.special_tokens == {"<|endoftext|>": tok.vocab_size - 2, "<|pad|>": tok.vocab_size - 1}


def test_bad_training_input(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe_from_iterator(["abc"], 256, progress=False)
    with pytest.raises(TokenizerError, match="twice"):
        train_bpe_from_iterator(["abc"], 300, special_tokens=["<|a|>", "<|a|>"], progress=False)
    with pytest.raises(DataError, match="does not exist"):
        train_bpe([tmp_path / "missing.txt"], 300, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        train_bpe([empty], 300, progress=False)
    with pytest.raises(DataError):
        train_bpe([], 300, progress=False)


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café au lait, ".encode("latin-1") * 20 + b"\xff\xfe ok")
    tok = train_bpe([f], 270, num_workers=1, progress=False)
    assert tok.train_info["replaced_bytes"] == 20 + 2


def test_small_text_gives_smaller_vocab(capsys):
    tok = train_bpe_from_iterator(["ab ab ab"], 1000, num_workers=1, progress=False)
    assert [(tok.token_bytes(a), tok.token_bytes(b)) for a, b in tok.merges] == [(b"a", b"b"), (b" ", b"ab")]
    assert tok.vocab_size == 256 + 2 + 1 and tok.eot_id == 258
    assert "only 2 merges" in capsys.readouterr().err


def test_lone_surrogates_in_training_text_are_replaced():
    # a lone surrogate cannot be UTF-8 encoded: it is trained on as U+FFFD, as encode() treats it
    tok = train_bpe_from_iterator(["a\ud800b a\ud800b"], 262, num_workers=1, progress=False)
    ref = train_bpe_from_iterator(["a\ufffdb a\ufffdb"], 262, num_workers=1, progress=False)
    assert tok.merges == ref.merges and len(tok.merges) == 3  # (ef, bf), (efbf, bd), (" ", "a")


def test_each_file_is_a_document(tmp_path):
    # "xy" + "zw" would be one pre-token if the files were glued together
    (tmp_path / "a.txt").write_text("xy")
    (tmp_path / "b.txt").write_text("zw")
    tok = train_bpe([tmp_path / "a.txt", tmp_path / "b.txt"] * 3, 270, num_workers=2, progress=False)
    learned = {tok.token_bytes(a) + tok.token_bytes(b) for a, b in tok.merges}
    assert learned == {b"xy", b"zw"}


def _mixed_text(shared_data, chars: int) -> str:
    """Prose, captions in three languages, code and runs of repeated bytes: every kind of pair update."""
    parts = [
        (shared_data / "tinyshakespeare.txt").read_text()[:chars],
        (shared_data / "multi30k/train.de").read_text()[:chars],
        (shared_data / "multi30k/train.fr").read_text()[:chars],
        "\n".join(p.read_text(errors="replace") for p in builtin_corpus().train.paths[:8])[:chars],
        " aaaa aaaaa abab ababab aaabaaab =========== ----  日本語日本語 😀😀😀" * 40,
    ]
    return "\n".join(parts)


def test_array_and_python_merge_paths_agree_with_brute_force(shared_data, monkeypatch):
    # a merge at few positions runs in Python, at many on arrays: force each path for every merge
    counts = count_pretokens([_mixed_text(shared_data, 5_000)], GPT2_PATTERN, [])
    reference = brute_force_merges(counts, 200)
    for small in (0, 10**9, 48):
        monkeypatch.setattr(bpe, "_SMALL", small)
        merges = learn_merges(counts, 200)
        vocab = [bytes([x]) for x in range(256)]
        for a, b in merges:
            vocab.append(vocab[a] + vocab[b])
        assert [(vocab[a], vocab[b]) for a, b in merges] == reference, small


def test_parallel_counting_equals_one_process(tmp_path, shared_data):
    # this process and 1 or 2 workers share many small chunks (and take back the queue at the end)
    text = _mixed_text(shared_data, 60_000)
    docs = [text[i : i + 20_000] + "<|endoftext|>" for i in range(0, len(text), 20_000)]
    chunks = [docs[i : i + 2] for i in range(0, len(docs), 2)]
    serial = parallel_count(iter(chunks), GPT2_PATTERN, ["<|endoftext|>"], num_workers=1)
    assert serial == count_pretokens(docs, GPT2_PATTERN, ["<|endoftext|>"])
    for workers in (2, 3):
        assert parallel_count(iter(chunks), GPT2_PATTERN, ["<|endoftext|>"], num_workers=workers) == serial
    files = []
    for i, d in enumerate(docs):
        files.append(tmp_path / f"{i:03d}.txt")
        files[-1].write_text(d)
    one = train_bpe(files, 600, num_workers=1, progress=False, chunk_chars=40_000)
    two = train_bpe(files, 600, num_workers=2, progress=False, chunk_chars=40_000)
    assert one.merges == two.merges and len(one.merges) == 600 - 257


def test_workers_that_flush_their_counts_often_give_the_same_counts(monkeypatch, shared_data):
    """A worker sends its counts whenever it holds _FLUSH_ITEMS distinct pre-tokens (its memory stays
    bounded); here after every chunk, many times over, while this process counts too."""
    monkeypatch.setattr(pretokenize, "_FLUSH_ITEMS", 50)
    monkeypatch.setattr(pretokenize, "_SEND_ITEMS", 7)  # several messages per flush
    text = _mixed_text(shared_data, 120_000)
    chunks = [[text[i : i + 3_000]] for i in range(0, len(text), 3_000)]
    serial = parallel_count(iter(chunks), GPT2_PATTERN, [], num_workers=1)
    for workers in (2, 3):
        assert (
            parallel_count(iter(chunks), GPT2_PATTERN, [], num_workers=workers, start_method="fork") == serial
        )


def _die(*args):
    os._exit(3)


def test_a_dead_worker_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(pretokenize, "_count_worker", _die)
    chunks = ([f"text number {i} " * 200] for i in range(50))
    with pytest.raises(TokenizerError, match="worker process died"):
        parallel_count(chunks, GPT2_PATTERN, [], num_workers=2, start_method="fork")
