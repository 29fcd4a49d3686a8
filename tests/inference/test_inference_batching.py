"""The continuous batcher against the engine: requests that join and leave a running batch (prompts of
different lengths, so rows are shifted and padded) give the engine's greedy and seeded texts, the cache
compacts when it fills, n rows per prompt, cancellation frees rows, and the limits hold."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import GenerationError
from scratchlm.inference import batching
from scratchlm.inference.batching import (
    Batcher,
    ErrorEvent,
    FinishEvent,
    QueueFullError,
    ShuttingDownError,
    TokenEvent,
)
from scratchlm.inference.engine import Engine
from scratchlm.inference.sampling import SamplingParams
from scratchlm.model import build_model
from scratchlm.tokenizer import train_bpe_from_iterator

TEXTS = [
    "hello world, hello there",
    "the quick brown fox jumps",
    "def main():\n    return 0\n",
    "naïve café ü",
] * 3
TIMEOUT = 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe_from_iterator(TEXTS, vocab_size=280, progress=False)


def make(tok, pos: str, context_length: int = 48):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, context_length=context_length, pos=pos
    )
    model = build_model(cfg)
    with torch.no_grad():  # larger weights: varied greedy output
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def finished(ticket) -> list[FinishEvent]:
    events = list(ticket.events(timeout=TIMEOUT))
    assert not [e for e in events if isinstance(e, ErrorEvent)]
    return sorted((e for e in events if isinstance(e, FinishEvent)), key=lambda e: e.row)


class StepGate:
    """Runs the batcher's loop one step at a time from the test, so requests join at chosen steps whatever
    the machine's speed (a request of 20 tokens can finish within a 10 ms sleep on a fast CPU)."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.step = batcher, batcher._step
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        batcher._step = self._gated  # the loop looks the method up on every iteration

    def _gated(self) -> None:
        self.go.acquire()
        try:
            self.step()
        finally:
            self.done.release()

    def run(self, steps: int) -> None:
        """Let the loop take ``steps`` steps (each admits waiting requests, samples, decodes) and wait."""
        for _ in range(steps):
            self.go.release()
            assert self.done.acquire(timeout=TIMEOUT)

    def open(self) -> None:
        """Back to free running."""
        self.batcher._step = self.step
        self.go.release()  # the loop may be waiting for one more permit


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_staggered_requests_equal_the_engine(tok, pos):
    model = make(tok, pos)
    engine, batcher = Engine(model, tok), Batcher(model, tok, max_batch=8)
    gate = StepGate(batcher)
    prompts = ["hello", "def main", "the quick brown fox", "naïve", "a", "hello world, hello there the"]
    try:
        tickets = []
        for i, p in enumerate(prompts):  # each joins a batch already decoding (shorter and longer prompts)
            opts = dict(max_new_tokens=30 - 2 * i, temperature=0, stop_token_ids=[])
            tickets.append((p, opts, batcher.submit([tok.encode(p)], SamplingParams(**opts))))
            gate.run(2)
        seeded = dict(max_new_tokens=15, temperature=1.0, top_k=40, seed=3, repetition_penalty=1.1)
        tickets.append(("the", seeded, batcher.submit([tok.encode("the")], SamplingParams(**seeded))))
        gate.open()
        for p, opts, t in tickets:
            (done,) = finished(t)
            assert done.text == engine.generate(p, **opts)[0].text
        assert batcher.stats.max_rows_in_step > 1
    finally:
        batcher.close()


def test_cache_compaction_when_the_window_fills(tok):
    """Prompt + max_new_tokens = the whole context for every request, arriving one after another: the
    shared cache's filled length passes the window and must drop all-padding columns."""
    model = make(tok, "rope", context_length=24)
    engine, batcher = Engine(model, tok), Batcher(model, tok, max_batch=4)
    gate = StepGate(batcher)
    try:
        tickets = []
        for p in ["hello world", "def", "the quick brown", "naïve café"]:
            ids = tok.encode(p)
            opts = dict(max_new_tokens=24 - len(ids), temperature=0, stop_token_ids=[])
            tickets.append((p, opts, batcher.submit([ids], SamplingParams(**opts))))
            gate.run(3)  # each request joins the ones already decoding, three steps apart
        gate.open()
        for p, opts, t in tickets:
            (done,) = finished(t)
            assert done.new_tokens == opts["max_new_tokens"]
            assert done.text == engine.generate(p, **opts)[0].text
        assert batcher.stats.compactions > 0
    finally:
        batcher.close()


def test_n_rows_stop_strings_and_logprobs(tok):
    model = make(tok, "rope")
    engine, batcher = Engine(model, tok), Batcher(model, tok)
    try:
        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
        rows = finished(batcher.submit([tok.encode("the")], params, n=3))
        assert [r.row for r in rows] == [0, 1, 2]
        for i, r in enumerate(rows):  # row i is the engine's sample with seed + i
            assert r.text == engine.generate("the", max_new_tokens=12, temperature=1.0, seed=5 + i)[0].text
        free = engine.generate("hello", max_new_tokens=20, temperature=0, stop_token_ids=[])[0].text
        stop = free[5:7]
        events = list(
            batcher.submit(
                [tok.encode("hello")],
                SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[], stop=[stop]),
                top_logprobs=2,
            ).events(timeout=TIMEOUT)
        )
        done = events[-1]
        assert done.finish_reason == "stop" and done.text == free[: free.index(stop)]
        assert "".join(e.delta for e in events) == done.text  # streamed deltas never show the stop string
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in tokens)
        assert all(e.top_logprobs[0][1] >= e.logprob - 1e-6 for e in tokens)
    finally:
        batcher.close()


def test_cancel_frees_rows_and_limits(tok):
    model = make(tok, "rope")
    batcher = Batcher(model, tok, max_batch=2, max_queue=1)
    try:
        long = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
        a = batcher.submit([tok.encode("hello")], long, n=2)  # fills the batch
        deadline = time.monotonic() + TIMEOUT
        while batcher.active_rows < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        b = batcher.submit([tok.encode("def")], long)  # waits
        with pytest.raises(QueueFullError):
            batcher.submit([tok.encode("a")], long)
        a.cancel()
        assert len(finished(b)) == 1  # a's rows were freed for b
        deadline = time.monotonic() + TIMEOUT
        while batcher.active_rows and time.monotonic() < deadline:  # b's row leaves right after its event
            time.sleep(0.005)
        assert batcher.stats.cancelled_rows == 2 and batcher.active_rows == 0
        with pytest.raises(GenerationError, match="exceed this server's batch of 2"):
            batcher.submit([tok.encode("a")], long, n=3)
        with pytest.raises(GenerationError, match="exceeds the model's context_length 48"):
            batcher.submit([tok.encode("hello " * 10)], long)
        with pytest.raises(GenerationError, match="not in the vocabulary"):
            batcher.submit([[1]], SamplingParams(max_new_tokens=2, stop_token_ids=[999]))
    finally:
        batcher.close()


def test_a_failing_step_fails_its_requests_and_the_batcher_goes_on(tok, monkeypatch, capsys):
    model = make(tok, "rope")
    batcher = Batcher(model, tok)
    try:

        def broken(*args):
            raise RuntimeError("boom")

        monkeypatch.setattr(batcher, "_sample_row", broken)
        events = list(batcher.submit([[1, 2]], SamplingParams(max_new_tokens=3)).events(timeout=TIMEOUT))
        assert isinstance(events[-1], ErrorEvent) and not events[-1].client_error
        assert "RuntimeError: boom" in capsys.readouterr().err
        monkeypatch.undo()
        assert finished(batcher.submit([[1, 2]], SamplingParams(max_new_tokens=3, temperature=0)))
    finally:
        batcher.close()


def test_non_finite_logits_fail_only_their_request(tok, monkeypatch):
    model = make(tok, "rope")
    batcher = Batcher(model, tok, max_batch=4)
    forward = model.forward

    def poisoned(idx, *args, **kwargs):  # NaN logits for every row whose last input token is 7
        logits, loss = forward(idx, *args, **kwargs)
        logits = logits.clone()
        logits[idx[:, -1] == 7] = float("nan")
        return logits, loss

    monkeypatch.setattr(model, "forward", poisoned)
    try:
        params = SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[])
        bad, good = batcher.submit([[1, 7]], params), batcher.submit([[1, 2]], params)
        events = list(bad.events(timeout=TIMEOUT))
        assert (
            isinstance(events[-1], ErrorEvent)
            and events[-1].client_error
            and "not finite" in events[-1].message
        )
        assert finished(good)[0].new_tokens == 5
    finally:
        batcher.close()


def test_requests_admitted_together_share_one_padded_prefill(tok, monkeypatch):
    model = make(tok, "learned")
    engine, batcher = Engine(model, tok), Batcher(model, tok, max_batch=8)
    gate, step = threading.Event(), batcher._step

    def held_step():
        gate.wait(TIMEOUT)
        step()

    monkeypatch.setattr(batcher, "_step", held_step)
    try:
        opts = dict(max_new_tokens=20, temperature=0, stop_token_ids=[])
        prompts = ["a", "the quick brown fox", "def main():", "naïve café"]
        tickets = [batcher.submit([tok.encode(p)], SamplingParams(**opts)) for p in prompts]
        seeded = SamplingParams(max_new_tokens=10, temperature=0.9, seed=11)
        pair = batcher.submit([tok.encode("hello")], seeded, n=2)
        gate.set()
        for p, t in zip(prompts, tickets):
            assert finished(t)[0].text == engine.generate(p, **opts)[0].text
        assert [r.text for r in finished(pair)] == [
            engine.generate("hello", max_new_tokens=10, temperature=0.9, seed=11 + i)[0].text
            for i in range(2)
        ]
        assert batcher.stats.max_rows_in_step == 6  # all six rows from the first step on
    finally:
        gate.set()
        batcher.close()


def test_close_ends_every_request_and_joins_the_thread(tok):
    """Requests decoding and waiting when the batcher closes get a 'shutting down' event (no client waits
    forever), the scheduler thread has ended when close returns, and a later submit is refused."""
    batcher = Batcher(make(tok, "rope"), tok, max_batch=1)
    gate = StepGate(batcher)
    long = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[])
    active = batcher.submit([tok.encode("hello")], long)
    waiting = batcher.submit([tok.encode("the")], long)
    gate.run(2)  # "hello" decodes; "the" waits for the one row
    assert batcher.active_rows == 1 and batcher.queued == 1
    closer = threading.Thread(target=batcher.close)
    closer.start()
    gate.open()
    closer.join(TIMEOUT)
    assert not batcher._thread.is_alive()
    for ticket in (active, waiting):
        last = list(ticket.events(timeout=TIMEOUT))[-1]
        assert isinstance(last, ErrorEvent) and last.shutting_down and not last.client_error
        with pytest.raises(ShuttingDownError, match="shutting down"):
            raise last.as_exception()
    with pytest.raises(ShuttingDownError):
        batcher.submit([tok.encode("a")], long)


def test_batchers_left_open_are_closed_at_exit(tok):
    """The atexit hook closes a batcher its owner forgot, before daemon threads are stopped."""
    batcher = Batcher(make(tok, "rope"), tok)
    assert batcher in batching._LIVE
    batching._close_live_batchers()
    assert not batcher._thread.is_alive() and batcher not in batching._LIVE
