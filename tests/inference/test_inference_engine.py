"""Engine: KV cache vs full recomputation, batching vs alone, seeds, streaming UTF-8, stops, context policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.errors import GenerationError
from scratchlm.inference.engine import Engine
from scratchlm.model import build_model
from scratchlm.model.cache import KVCache
from scratchlm.tokenizer import train_bpe_from_iterator

TEXTS = ["hello world, hello there", "the quick brown fox jumps", "def main():\n    return 0\n"] * 3


@pytest.fixture(scope="module")
def tok():
    # 256 bytes + a few merges: multi-byte characters stay split across byte tokens
    return train_bpe_from_iterator(TEXTS, vocab_size=272, progress=False)


def tiny_gpt(vocab_size: int, style: str = "llama", context_length: int = 64, seed: int = 0) -> nn.Module:
    kw = dict(vocab_size=vocab_size, n_layer=2, d_model=32, n_head=4, context_length=context_length)
    if style == "llama":  # RoPE, RMSNorm, SwiGLU, GQA
        kw.update(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**kw))
    with torch.no_grad():  # larger random weights: varied, non-degenerate greedy outputs
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model.eval()


def recompute_greedy(model, ids: list[int], n: int, stop_id: int | None = None) -> list[int]:
    """Reference: greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    seq, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            token = int(logits[0, -1].argmax())
            if token == stop_id:
                break
            out.append(token)
            seq.append(token)
    return out


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_kv_cache_greedy_equals_full_recomputation(tok, style):
    model = tiny_gpt(tok.vocab_size, style)
    engine = Engine(model, tok)
    for prompt in ["hello", "def main"]:
        res = engine.generate(prompt, max_new_tokens=30, temperature=0)[0]
        assert res.token_ids == recompute_greedy(model, tok.encode(prompt), 30, tok.eot_id)
        assert res.text == tok.decode(res.token_ids)


def test_batched_rows_equal_alone(tok):
    model = tiny_gpt(tok.vocab_size, "llama")
    engine = Engine(model, tok)
    prompts = [
        "h",
        "the quick brown fox",
        "def main():\n  ",
        "hello world",
    ]  # different lengths: left padding
    batched = engine.generate(prompts, max_new_tokens=20, temperature=0)
    for prompt, res in zip(prompts, batched):
        alone = engine.generate(prompt, max_new_tokens=20, temperature=0)[0]
        assert res.token_ids == alone.token_ids and res.finish_reason == alone.finish_reason
    assert len({tuple(r.token_ids) for r in batched}) > 1  # the rows really differ


def test_fixed_seed_gives_identical_samples(tok):
    engine = Engine(tiny_gpt(tok.vocab_size), tok)
    kw = dict(max_new_tokens=25, temperature=1.0, top_k=50, top_p=0.95, seed=7, stop_token_ids=[])
    a = engine.generate(["hello", "the"], **kw)
    b = engine.generate(["hello", "the"], **kw)
    c = engine.generate(["hello", "the"], **{**kw, "seed": 8})
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    # the same request streamed: same tokens (a seed reproduces a request with the same prompts and batch)
    assert "".join(engine.stream("hello", **kw)) == engine.generate("hello", **kw)[0].text


def test_presence_penalty_prevents_repeats_in_engine(tok):
    engine = Engine(tiny_gpt(tok.vocab_size), tok)
    prompt = "hello"
    # 100 is the largest presence penalty allowed: far more than this model's logits span
    res = engine.generate(prompt, max_new_tokens=40, temperature=0, presence_penalty=100, stop_token_ids=[])[
        0
    ]
    seen = tok.encode(prompt) + res.token_ids
    assert len(seen) == len(set(seen))  # every token of the context is penalised out of reach


class ScriptedLM(nn.Module):
    """A stand-in decoder whose greedy output is a fixed token script (after the prompt), to test text
    handling exactly: logits are one-hot on script[number of tokens generated so far]."""

    def __init__(self, script: list[int], vocab_size: int, context_length: int = 128):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, context_length=context_length)
        self.script = script
        self.dummy = nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    def make_cache(self, batch_size, max_len=None, device=None, dtype=None):
        return KVCache(1, batch_size, 1, max_len or self.config.context_length, 1)

    def forward(self, idx, targets=None, *, cache=None, positions=None, attention_mask=None):
        B, T = idx.shape
        if cache.length == 0:
            self.prompt_len = T
        step = cache.length + T - self.prompt_len
        cache.advance(T)
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits, None


def test_stream_never_splits_utf8(tok):
    text = "héllo wörld — 日本語 ✓ 🙂!"
    script = tok.encode(text)
    assert len(script) > len(text)  # multi-byte characters are split across byte tokens
    engine = Engine(ScriptedLM(script + [tok.eot_id], tok.vocab_size), tok)
    deltas = list(engine.stream("x", max_new_tokens=100, temperature=0))
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(deltas) < len(script)  # deltas came per complete character, not per byte token
    assert engine.generate("x", max_new_tokens=100, temperature=0)[0].finish_reason == "stop"


def test_truncated_utf8_is_flushed_with_replacement(tok):
    script = tok.encode("ab日")[:-1]  # ends inside a 3-byte character
    engine = Engine(ScriptedLM(script + [tok.eot_id], tok.vocab_size), tok)
    deltas = list(engine.stream("x", max_new_tokens=len(script), temperature=0))
    assert "".join(deltas) == tok.decode(script) == "ab\ufffd"
    res = engine.generate("x", max_new_tokens=50, temperature=0)[0]  # ended by the stop token instead
    assert (res.text, res.finish_reason, res.token_ids) == ("ab\ufffd", "stop", script)


def test_stop_string_cuts_exactly_and_never_streams_it(tok):
    text = "Sure, here it is.\nUser: next question"
    engine = Engine(ScriptedLM(tok.encode(text), tok.vocab_size), tok)
    res = engine.generate("x", max_new_tokens=60, temperature=0, stop=["\nUser:"])[0]
    assert res.text == "Sure, here it is." and res.finish_reason == "stop"
    deltas = list(engine.stream("x", max_new_tokens=60, temperature=0, stop=["\nUser:", "zzz"]))
    assert "".join(deltas) == "Sure, here it is."
    # earliest of several stop strings wins; a stop string completed mid-token is cut inside the token
    assert engine.generate("x", max_new_tokens=60, temperature=0, stop=["it is", "here"])[0].text == "Sure, "


def test_stop_token_and_length(tok):
    script = tok.encode("abc") + [tok.eot_id]
    engine = Engine(ScriptedLM(script, tok.vocab_size), tok)
    res = engine.generate("x", max_new_tokens=10, temperature=0)[0]
    assert (res.text, res.finish_reason, res.token_ids) == ("abc", "stop", tok.encode("abc"))
    res = engine.generate("x", max_new_tokens=2, temperature=0)[0]
    assert (res.text, res.finish_reason, res.new_tokens) == ("ab", "length", 2)
    res = engine.generate("x", max_new_tokens=10, temperature=0, stop_token_ids=[])[0]
    assert res.finish_reason == "length" and res.new_tokens == 10  # eot no longer stops


def test_context_policies(tok):
    model = tiny_gpt(tok.vocab_size, "gpt2", context_length=16)  # learned positions: cannot go past 16
    engine = Engine(model, tok)
    prompt = "the quick"
    ids = tok.encode(prompt)
    n = len(ids)
    with pytest.raises(GenerationError, match=rf"{n} tokens \+ max_new_tokens 20 = {n + 20} exceeds .* 16"):
        engine.generate(prompt, max_new_tokens=20, context="error")
    # no policy given: the window slides (as in HF and nanoGPT), said once as a warning naming the options
    with pytest.warns(UserWarning, match=r"exceeds the model's context_length 16: the window slides.*'stop'"):
        default = engine.generate(prompt, max_new_tokens=20, temperature=0, stop_token_ids=[])[0]
    slid = engine.generate(prompt, max_new_tokens=20, temperature=0, context="slide", stop_token_ids=[])[0]
    assert default.new_tokens == 20 and default.token_ids == slid.token_ids
    res = engine.generate(prompt, max_new_tokens=20, temperature=0, context="stop", stop_token_ids=[])[0]
    assert res.finish_reason == "context" and res.prompt_tokens + res.new_tokens == 16 + 1
    assert res.token_ids == recompute_greedy(model, ids, 16 + 1 - n)
    res = engine.generate(prompt, max_new_tokens=40, temperature=0, context="slide", stop_token_ids=[])[0]
    assert res.new_tokens == 40 and engine.last_stats.slides >= 2
    # before the first slide it is plain greedy; right after, greedy over the last 16 // 2 tokens
    first = 16 + 1 - n
    assert res.token_ids[:first] == recompute_greedy(model, ids, first)
    assert res.token_ids[first] == recompute_greedy(model, (ids + res.token_ids)[: 16 + 1][-8:], 1)[0]
    with pytest.raises(GenerationError, match="context"):
        engine.generate(prompt, max_new_tokens=4, context="bogus")
    with pytest.raises(GenerationError, match="stop token id .* not in the vocabulary"):
        engine.generate(prompt, max_new_tokens=4, stop_token_ids=[tok.vocab_size])


@pytest.mark.parametrize("context", ["stop", "slide"])
def test_batch_rows_equal_solo_rows_when_the_window_fills(tok, context):
    # prompts of different lengths share one cache, which fills when the longest row reaches the window;
    # every row must still stop or slide when it would alone (the short ones were cut short before)
    model = tiny_gpt(tok.vocab_size, "gpt2", context_length=16)
    engine = Engine(model, tok)
    prompts = ["the quick brown", "x", "hello there"]  # 12, 1 and 4 tokens
    assert len({len(tok.encode(p)) for p in prompts}) == 3
    options = dict(max_new_tokens=30, temperature=0, context=context, stop_token_ids=[])
    solo = [engine.generate(p, **options)[0] for p in prompts]
    batch = engine.generate(prompts, **options)
    assert [(r.token_ids, r.finish_reason) for r in batch] == [(r.token_ids, r.finish_reason) for r in solo]
    if context == "stop":  # each row filled its own window: 16 in the cache + the token sampled after
        assert all(r.finish_reason == "context" and r.prompt_tokens + r.new_tokens == 17 for r in batch)
    else:
        assert all(r.new_tokens == 30 for r in batch) and engine.last_stats.slides >= 2


def test_a_fixed_shape_decode_step_gives_the_logits_of_the_growing_cache(tok):
    """cache.slot set: the new k, v go to that slot and attention runs over the mask's S slots: all
    max_len of them (the unfilled ones masked) or the filled ones only (what the engine passes)."""
    model = tiny_gpt(tok.vocab_size).eval()
    ids = torch.tensor([[5, 9, 200, 17, 3, 44, 8]])
    with torch.inference_mode():
        grow, fixed = model.make_cache(1, max_len=16), model.make_cache(1, max_len=16)
        model(ids[:, :4], cache=grow), model(ids[:, :4], cache=fixed)
        for t, width in ((4, 16), (5, 6), (6, 16)):
            want, _ = model(ids[:, t : t + 1], cache=grow)
            fixed.slot = torch.tensor([t])
            keys = torch.arange(width)[None] <= t  # (1, S): the slots filled, this one included
            got, _ = model(ids[:, t : t + 1], cache=fixed, positions=torch.tensor([[t]]), attention_mask=keys)
            fixed.slot, fixed.length = None, t + 1  # the caller advances (the model did not)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fixed.k[0][:, :, :7], grow.k[0][:, :, :7])  # every step wrote its slot
        with pytest.raises(ValueError, match="needs positions and attention_mask"):
            fixed.slot = torch.tensor([6])
            model(ids[:, :1], cache=fixed)


@pytest.mark.parametrize("context", ["slide", "stop"])
def test_the_compiled_engine_path_gives_the_eager_tokens(tok, context):
    """Engine(compile=True)'s fixed-shape decoding, run here without the compiler (the same model as the
    'compiled' step): padded batches, window slides and stops all give the eager path's tokens."""
    model = tiny_gpt(tok.vocab_size, context_length=16)
    eager, fixed = Engine(model, tok), Engine(model, tok)
    fixed._compiled = model  # the fixed-shape path, without torch.compile's minutes (slow test below)
    options = dict(max_new_tokens=30, temperature=0, context=context, stop_token_ids=[])
    for prompts in (["the quick brown"], ["the quick brown", "x", "hello there"]):
        want = eager.generate(prompts, **options)
        got = fixed.generate(prompts, **options)
        assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in want]
    assert fixed.last_stats.compile_seconds > 0  # a batch of 3 is a new shape: its first step is counted
    fixed.generate(["the quick brown", "x", "hello there"], **options)
    assert fixed.last_stats.compile_seconds == 0 and fixed.last_stats.decode_steps > 0


def test_compile_time_is_reported_apart_and_warned_about_when_it_does_not_pay():
    from scratchlm.inference.engine import GenerationStats

    short = GenerationStats(
        batch_size=1, new_tokens=8, decode_seconds=0.05, compile_seconds=20.0, decode_steps=6
    )
    assert "torch.compile took 20.0s" in short.compile_note()
    assert "compile 20.0s" in short.summary() and "(120.0 tok/s)" in short.summary()
    assert short.seconds == pytest.approx(20.05)
    long = GenerationStats(batch_size=1, new_tokens=9000, decode_seconds=30.0, compile_seconds=20.0)
    assert long.compile_note() is None


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(tok):
    from torch._dynamo.utils import counters

    model = tiny_gpt(tok.vocab_size, context_length=32)
    engine = Engine(model, tok, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    for prompts, n in ((["hello", "the"], 12), (["hello"], 40)):  # padded; slides past the window
        eager = Engine(model, tok).generate(prompts, max_new_tokens=n, temperature=0, context="slide")
        compiled = engine.generate(prompts, max_new_tokens=n, temperature=0, context="slide")
        assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
        assert engine.last_stats.compile_seconds > 0  # each batch size compiles once
    engine.generate(["the"], max_new_tokens=12, temperature=0)
    assert engine.last_stats.compile_seconds == 0  # the same shape: no compilation
    # one graph per batch size, whatever the number of filled slots (dynamic) or the prompt
    assert counters["stats"]["unique_graphs"] - graphs == 2
