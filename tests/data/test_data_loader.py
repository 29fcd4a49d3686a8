"""TokenLoader: windows match the shards, exact resume, disjoint DDP ranks, document-aligned rows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from data_bytetok import ByteTokenizer

from scratchlm.data.loader import TokenLoader
from scratchlm.data.prepare import prepare
from scratchlm.errors import DataError

T, B = 16, 4


class ListSource:
    def __init__(self, docs):
        self.docs, self.fingerprint, self.description = docs, "loader-test", "loader test documents"

    def documents(self):
        yield from self.docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = random.Random(1)
    # short documents (< T) and a few long ones (> 3T); several shards
    docs = [
        ("abcdefghij"[i % 10] * rng.randint(1, 12)) if i % 7 else "L" * rng.randint(3 * T, 6 * T)
        for i in range(400)
    ]
    out = tmp_path_factory.mktemp("shards")
    prepare(
        ListSource(docs),
        ByteTokenizer(),
        out,
        val_fraction=0.2,
        num_workers=1,
        progress=False,
        shard_tokens=1000,
    )
    return out


def shard_tokens(data_dir, loader):
    return [np.fromfile(data_dir / s["file"], dtype=np.uint16).astype(np.int64) for s in loader.shards]


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("doc_aligned", [False, True])
def test_batches_are_windows_of_the_shards(data_dir, mode, doc_aligned):
    loader = TokenLoader(data_dir, "train", B, T, mode=mode, doc_aligned=doc_aligned, seed=3)
    tokens = shard_tokens(data_dir, loader)
    for step in range(5):
        starts = loader.batch_starts(step)
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        for row, (i, off) in enumerate(starts):
            np.testing.assert_array_equal(x[row].numpy(), tokens[i][off : off + T])
            np.testing.assert_array_equal(y[row].numpy(), tokens[i][off + 1 : off + T + 1])


@pytest.mark.parametrize("mode", ["random", "sequential"])
@pytest.mark.parametrize("doc_aligned", [False, True])
def test_resume_gives_the_same_batches(data_dir, mode, doc_aligned):
    kw = dict(mode=mode, doc_aligned=doc_aligned, seed=7)
    ref = TokenLoader(data_dir, "train", B, T, **kw)
    expected = [ref.next_batch() for _ in range(60)]  # runs past an epoch in sequential mode
    first = TokenLoader(data_dir, "train", B, T, **kw)
    for _ in range(23):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what the trainer stores in state.json
    resumed = TokenLoader(data_dir, "train", B, T, **kw)
    resumed.load_state_dict(state)
    for x_ref, y_ref in expected[23:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert resumed.epoch == ref.epoch


def test_resume_refuses_other_settings(data_dir):
    state = TokenLoader(data_dir, "train", B, T, seed=1).state_dict()
    with pytest.raises(DataError, match="batch_size was 4, now 8"):
        TokenLoader(data_dir, "train", 8, T, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("doc_aligned", [False, True])
def test_ddp_ranks_read_disjoint_windows_that_cover_the_data(data_dir, world_size, doc_aligned):
    ranks = [
        TokenLoader(
            data_dir, "train", B, T, mode="sequential", doc_aligned=doc_aligned, rank=r, world_size=world_size
        )
        for r in range(world_size)
    ]
    per_rank = [{s for step in range(ld.batches_per_epoch) for s in ld.batch_starts(step)} for ld in ranks]
    assert sum(map(len, per_rank)) == len(set().union(*per_rank))  # disjoint
    # together: every window start of a full round, computed here from the shard sizes / documents
    one = TokenLoader(data_dir, "train", B, T, mode="sequential", doc_aligned=doc_aligned)
    all_starts = [s for step in range(one.batches_per_epoch) for s in one.batch_starts(step)]
    rounds = ranks[0].batches_per_epoch * B * world_size
    assert set().union(*per_rank) == set(all_starts[:rounds])
    if not doc_aligned:  # sequential windows tile each shard at stride T
        sizes = [s["tokens"] for s in one.shards]
        expected = [(i, o) for i, n in enumerate(sizes) for o in range(0, n - T, T)]
        assert all_starts == expected[: len(all_starts)] and len(expected) - len(all_starts) < B
    # random mode: ranks draw from disjoint ranges of starts
    rnd = [
        TokenLoader(data_dir, "train", B, T, doc_aligned=doc_aligned, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    drawn = [{s for step in range(20) for s in ld.batch_starts(step)} for ld in rnd]
    assert sum(map(len, drawn)) == len(set().union(*drawn))


def test_doc_aligned_rows_start_at_document_starts(data_dir):
    loader = TokenLoader(data_dir, "train", B, T, mode="random", doc_aligned=True, seed=0)
    tokens = shard_tokens(data_dir, loader)
    seen_long = 0
    for step in range(50):
        for i, off in loader.batch_starts(step):
            t = tokens[i]
            if off == 0 or t[off - 1] == 256:  # right after an end-of-text token: a document start
                continue
            # else a continuation point inside a long document: T-strided from its start
            doc_start = int(np.flatnonzero(t[:off] == 256)[-1]) + 1 if (t[:off] == 256).any() else 0
            assert (off - doc_start) % T == 0 and t[doc_start] == ord("L")
            seen_long += 1
    assert seen_long > 0
    # short documents are packed: a row runs on into the next document
    x, _ = loader.next_batch()
    assert (x == 256).any()


def test_validation_loader_is_deterministic(data_dir):
    a = TokenLoader(data_dir, "val", 2, T, mode="sequential")
    b = TokenLoader(data_dir, "val", 2, T, mode="sequential")
    for _ in range(a.batches_per_epoch + 2):  # wraps around to a second epoch
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.epoch == 1


def test_bad_loader_arguments(data_dir, tmp_path):
    with pytest.raises(DataError, match="too small"):
        TokenLoader(data_dir, "val", 1000, 512, mode="sequential")
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenLoader(tmp_path, "train", B, T)
    with pytest.raises(DataError, match="rank 2 is outside"):
        TokenLoader(data_dir, "train", B, T, rank=2, world_size=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches(data_dir):
    x, y = TokenLoader(data_dir, "train", B, T, device="cuda").next_batch()
    assert x.is_cuda and y.is_cuda and torch.equal(x[:, 1:].cpu(), y[:, :-1].cpu())


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_one_pass_and_the_remainder_score_every_target_once(data_dir, batch):
    """The full batches of one sequential pass, then remainder_batches: each target of each shard (every
    token but a shard's first) exactly once, each with the tokens before it in its shard as context."""
    loader = TokenLoader(data_dir, "val", batch, T, mode="sequential")
    tokens = shard_tokens(data_dir, loader)
    assert len(tokens) > 1  # several shards, each with a tail
    scored = [np.zeros(len(t), dtype=np.int64) for t in tokens]
    for step in range(loader.batches_per_epoch):
        for i, off in loader.batch_starts(step):
            scored[i][off + 1 : off + T + 1] += 1
    windows = loader.remainder_windows()
    assert windows and all(skip < length <= T for _, _, length, skip in windows)
    for i, start, length, skip in windows:
        scored[i][start + 1 + skip : start + 1 + length] += 1
    for counts in scored:
        assert counts[0] == 0 and (counts[1:] == 1).all()
    # the batches hold those windows: x the context, y the next tokens, the targets scored before -100
    rows = [(x[r], y[r]) for x, y in loader.remainder_batches() for r in range(len(x))]
    assert len(rows) == len(windows) and all(len(x) <= batch for x, _ in loader.remainder_batches())
    order = {}  # batches group the windows by length, keeping their order within a length
    for w in windows:
        order.setdefault(w[2], []).append(w)
    for (x, y), (i, start, length, skip) in zip(rows, [w for ws in order.values() for w in ws]):
        np.testing.assert_array_equal(x.numpy(), tokens[i][start : start + length])
        expect = tokens[i][start + 1 : start + length + 1].copy()
        expect[:skip] = -100
        np.testing.assert_array_equal(y.numpy(), expect)


def test_remainder_needs_one_sequential_rank(data_dir):
    for kw in (dict(mode="random"), dict(mode="sequential", doc_aligned=True), dict(world_size=2)):
        kw.setdefault("mode", "sequential")
        with pytest.raises(DataError, match="sequential, not doc-aligned loader on one rank"):
            TokenLoader(data_dir, "val", B, T, **kw).remainder_windows()
