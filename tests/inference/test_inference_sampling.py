"""Logits processors against their definitions (brute force) and against HF transformers' processors."""

from __future__ import annotations

import itertools

import pytest
import torch

from scratchlm.errors import GenerationError
from scratchlm.inference.sampling import (
    FrequencyPresencePenalty,
    MinP,
    RepetitionPenalty,
    SamplingParams,
    Temperature,
    TopK,
    TopP,
    find_stop,
    make_generator,
    sample,
    stop_prefix_len,
)

NEG_INF = float("-inf")


def _logits(B: int = 4, V: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 2


def _counts(B: int, V: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (B, V), generator=g).float() * (torch.rand(B, V, generator=g) < 0.5)


def test_top_p_keeps_smallest_set_with_mass_at_least_p_brute_force():
    V = 7
    logits = _logits(6, V)
    for p in (0.05, 0.3, 0.5, 0.8, 0.95, 0.999):
        out = TopP(p)(logits, None)
        for row in range(logits.size(0)):
            probs = torch.softmax(logits[row], -1)
            # brute force: the smallest subset (by size) with mass >= p, the most probable among those
            best = None
            for size in range(1, V + 1):
                subsets = [s for s in itertools.combinations(range(V), size) if probs[list(s)].sum() >= p]
                if subsets:
                    best = max(subsets, key=lambda s: probs[list(s)].sum())
                    break
            kept = set(torch.nonzero(out[row] > NEG_INF).flatten().tolist())
            assert kept == set(best), (p, row)
            assert torch.equal(out[row][list(best)], logits[row][list(best)])  # kept logits unchanged


def test_top_p_edge_cases():
    logits = _logits()
    assert torch.equal(TopP(1.0)(logits, None), logits)
    tiny = TopP(1e-9)(logits, None)  # always at least the most likely token
    assert ((tiny > NEG_INF).sum(-1) == 1).all()
    assert torch.equal(tiny.argmax(-1), logits.argmax(-1))


def test_top_k_and_edge_cases():
    logits = _logits(V=12)
    out = TopK(3)(logits, None)
    assert ((out > NEG_INF).sum(-1) == 3).all()
    top3 = torch.topk(logits, 3).indices
    assert torch.equal(torch.gather(out, 1, top3), torch.gather(logits, 1, top3))
    assert torch.equal(TopK(12)(logits, None), logits)
    assert torch.equal(TopK(1000)(logits, None), logits)  # k larger than the vocabulary: no-op


def test_min_p_threshold_relative_to_top_probability():
    logits = _logits(V=20)
    out = MinP(0.2)(logits, None)
    probs = torch.softmax(logits, -1)
    expected_keep = probs >= 0.2 * probs.max(-1, keepdim=True).values
    assert torch.equal(out > NEG_INF, expected_keep)
    assert torch.equal(MinP(0.0)(logits, None), logits)


def test_penalties_follow_their_formulas():
    logits, counts = _logits(V=9), _counts(4, 9)
    r = 1.7
    out = RepetitionPenalty(r)(logits, counts)
    for b, v in itertools.product(range(4), range(9)):
        l = logits[b, v].item()
        want = (l / r if l > 0 else l * r) if counts[b, v] > 0 else l
        assert out[b, v].item() == pytest.approx(want)
    f, p = 0.5, 0.3
    out = FrequencyPresencePenalty(f, p)(logits, counts)
    for b, v in itertools.product(range(4), range(9)):
        c = counts[b, v].item()
        assert out[b, v].item() == pytest.approx(logits[b, v].item() - f * c - p * (c > 0))


def test_against_hf_transformers_processors():
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = _logits(B=3, V=50)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(3))
    counts = torch.zeros(3, 50).scatter_add_(1, ids, torch.ones(3, 12))
    for ours, theirs in [
        (TopK(7), lp.TopKLogitsWarper(7)),
        (TopP(0.6), lp.TopPLogitsWarper(0.6)),
        (MinP(0.1), lp.MinPLogitsWarper(0.1)),
        (Temperature(0.7), lp.TemperatureLogitsWarper(0.7)),
        (RepetitionPenalty(1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
    ]:
        want = theirs(ids, logits.clone())
        if isinstance(ours, Temperature):  # ours also subtracts the row max: the same softmax
            want = want - want.amax(-1, keepdim=True)
        torch.testing.assert_close(ours(logits.clone(), counts), want, msg=str(ours))


def test_temperature_zero_is_greedy_and_penalties_still_apply():
    logits, counts = _logits(V=30), _counts(4, 30)
    assert torch.equal(sample(logits, None, SamplingParams(temperature=0)), logits.argmax(-1))
    params = SamplingParams(temperature=0, repetition_penalty=3.0, presence_penalty=2.0)
    penalised = FrequencyPresencePenalty(0, 2.0)(RepetitionPenalty(3.0)(logits, counts), counts)
    assert torch.equal(sample(logits, counts, params), penalised.argmax(-1))


def test_sampling_distribution_and_seed():
    # a draw follows softmax(l / T) restricted to the kept tokens
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0.5, top_k=3)
    draws = torch.stack([sample(logits.expand(2000, 4), None, params, make_generator(s)) for s in range(5)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    want = torch.softmax(torch.tensor([4.0, 2.0, 0.0, NEG_INF]), -1)
    torch.testing.assert_close(freq, want, atol=0.02, rtol=0)
    a = sample(_logits(V=100), None, SamplingParams(), make_generator(123))
    b = sample(_logits(V=100), None, SamplingParams(), make_generator(123))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=0),
        dict(min_p=-0.1),
        dict(repetition_penalty=0.0),
        dict(max_new_tokens=0),
        dict(stop=[""]),
        dict(seed=2**70),  # more than a torch.Generator seed holds (64 bits)
        dict(seed=-1),
        dict(temperature=float("inf")),
        dict(temperature=float("nan")),
        dict(top_p=float("nan")),
        dict(min_p=float("nan")),
        dict(repetition_penalty=1e-40),  # l / r overflows to inf
        dict(repetition_penalty=1e3),
        dict(repetition_penalty=float("inf")),
        dict(frequency_penalty=-1e38),  # l - f * count overflows to inf
        dict(frequency_penalty=float("nan")),
        dict(presence_penalty=101.0),
        dict(max_new_tokens=None),  # wrong types are a one-line error too, not a TypeError
        dict(temperature=None),
        dict(top_p="0.9"),
        dict(top_k=2.5),
        dict(seed=True),
        dict(stop_token_ids=["a"]),
        dict(stop_token_ids=[-1]),
    ],
)
def test_bad_values_raise_one_line_error(kwargs):
    with pytest.raises(GenerationError) as e:
        SamplingParams(**kwargs)
    assert "\n" not in str(e.value) and next(iter(kwargs)) in str(e.value)


def test_values_at_the_bounds_are_accepted():
    SamplingParams(seed=0)
    SamplingParams(seed=2**64 - 1, repetition_penalty=0.01, frequency_penalty=-100, presence_penalty=100)
    SamplingParams(
        repetition_penalty=100, frequency_penalty=100, presence_penalty=-100, stop_token_ids=(3, 4)
    )
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    """l / T overflows for a tiny T (inf - inf = NaN in the softmax); (l - max l) / T keeps the top at 0."""
    logits = _logits(V=50) * 10
    params = SamplingParams(temperature=temperature)
    for seed in range(3):
        assert torch.equal(sample(logits, None, params, make_generator(seed)), logits.argmax(-1))
    out = Temperature(temperature)(logits, None)
    assert not out.isnan().any() and (out.amax(-1) == 0).all()


def test_non_finite_distribution_is_a_generation_error():
    logits = _logits(V=20)
    logits[1, 3] = float("nan")  # e.g. a diverged model
    for params in (SamplingParams(), SamplingParams(temperature=0)):
        with pytest.raises(GenerationError, match="not finite") as e:
            sample(logits, None, params, make_generator(0))
        assert "\n" not in str(e.value)


def test_unknown_option_is_named():
    with pytest.raises(GenerationError, match="temprature"):
        SamplingParams.from_kwargs(temprature=0.5)


def test_stop_helpers():
    assert find_stop("hello\nUser: x", ["\nUser:"]) == 5
    assert find_stop("abcabc", ["c", "bc"]) == 1  # earliest occurrence wins
    assert find_stop("abc", ["x"]) is None
    assert stop_prefix_len("hello\nUs", ["\nUser:"]) == 3
    assert stop_prefix_len("hello", ["\nUser:"]) == 0
    assert stop_prefix_len("ab", ["abc", "bcd"]) == 2
