"""Sampling: turn next-token logits into a token, one small logits processor at a time.

Every processor is a callable ``(logits, counts) -> logits`` on a batch:

- ``logits`` (B, V) float32, the scores for the next token of each row;
- ``counts`` (B, V) float32, how often each token id occurs in the row's context so far (prompt and
  generated tokens, padding excluded). Only the penalties read it.

The order is the usual one (HF transformers, vLLM): penalties on the raw logits, then temperature, then the
truncations (top-k, top-p, min-p), then a draw from the softmax. Temperature 0 means greedy: the argmax of
the penalised logits, with no randomness. Removed tokens get ``-inf`` so that softmax gives them
probability exactly 0.

:class:`SamplingParams` holds one request's options and checks them; :func:`sample` applies them.
Stop strings are handled on decoded text by :func:`find_stop` / :func:`stop_prefix_len` (the engine uses
them); stop token ids end a row as soon as one is sampled.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import GenerationError

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SEED_LIMIT = 2**64  # a torch.Generator seed is an unsigned 64-bit integer
REPETITION_PENALTY_RANGE = (0.01, 100.0)
ADDITIVE_PENALTY_LIMIT = 100.0  # |frequency_penalty|, |presence_penalty|


@dataclass
class SamplingParams:
    """One request's sampling options (the CLI flags and the keyword arguments of ``Engine.generate``).

    Neutral values switch a processor off: ``temperature=1``, ``top_k=None``, ``top_p=1``, ``min_p=0``,
    ``repetition_penalty=1``, ``frequency_penalty=0``, ``presence_penalty=0``.

    Checked ranges (a :class:`GenerationError` names the first value outside them): every number finite;
    ``seed`` in ``[0, 2**64)`` (what a torch.Generator holds; negative seeds are refused rather than wrapped);
    ``repetition_penalty`` in ``[0.01, 100]``, ``frequency_penalty`` and ``presence_penalty`` in
    ``[-100, 100]``. The penalty bounds are wider than OpenAI's ``[-2, 2]`` so that a penalty can rule a
    token out (a trained LM's logits span a few tens), and narrow enough that ``l / r``, ``l * r`` and
    ``l - f * count`` stay finite in float32.
    """

    max_new_tokens: int = 128  # tokens to generate per row (at most)
    temperature: float = 1.0  # 0 = greedy (argmax), > 0 divides the logits
    top_k: int | None = None  # keep the k most likely tokens (None = off; k >= V is a no-op)
    top_p: float = 1.0  # nucleus: smallest set with probability mass >= top_p (1 = off)
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max (0 = off)
    repetition_penalty: float = 1.0  # CTRL penalty for tokens already in the context (1 = off)
    frequency_penalty: float = 0.0  # OpenAI: subtract frequency_penalty * count
    presence_penalty: float = 0.0  # OpenAI: subtract presence_penalty * (count > 0)
    stop: list[str] = field(default_factory=list)  # stop strings: output is cut right before the first one
    stop_token_ids: list[int] | None = None  # None = the tokenizer's end-of-text token
    seed: int | None = None  # seed of this request's torch.Generator (None = nondeterministic)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, str):
            self.stop_token_ids = list(self.stop_token_ids)
        self._check_types()
        r_lo, r_hi = REPETITION_PENALTY_RANGE
        a_max = ADDITIVE_PENALTY_LIMIT
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None (off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (
                r_lo <= self.repetition_penalty <= r_hi,
                f"repetition_penalty must be in [{r_lo}, {r_hi:g}] (1 = off), got {self.repetition_penalty}",
            ),
            (
                -a_max <= self.frequency_penalty <= a_max,
                f"frequency_penalty must be in [-{a_max:g}, {a_max:g}] (0 = off), got {self.frequency_penalty}",
            ),
            (
                -a_max <= self.presence_penalty <= a_max,
                f"presence_penalty must be in [-{a_max:g}, {a_max:g}] (0 = off), got {self.presence_penalty}",
            ),
            (
                self.seed is None or 0 <= self.seed < SEED_LIMIT,
                f"seed must be in [0, 2**64) or None, got {self.seed}",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                f"stop strings must be non-empty, got {self.stop!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GenerationError(message)

    def _check_types(self) -> None:
        """Integers where integers belong (bool excluded), finite numbers elsewhere; one line per problem."""
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if value is None and name != "max_new_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise GenerationError(f"{name} must be an integer, got {value!r}")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise GenerationError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise GenerationError(f"{name} must be finite, got {value}")
        ids = self.stop_token_ids
        if ids is not None and not (
            isinstance(ids, list)
            and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise GenerationError(f"stop_token_ids must be a list of token ids (integers >= 0), got {ids!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming an unknown one (``GenerationError``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise GenerationError(
                f"unknown sampling option {unknown[0]!r} (valid: {', '.join(sorted(names))})"
            )
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_counts(self) -> bool:
        """Whether a penalty needs the (B, V) token counts of the context."""
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


# ----------------------------------------------------------------------------------------------------------
# processors


@dataclass
class RepetitionPenalty:
    """CTRL repetition penalty (Keskar et al. 2019) on tokens seen in the context.

    For every token with count > 0:  ``l' = l / r`` if ``l > 0`` else ``l * r``  (r > 1 discourages
    repeats, r < 1 encourages them). Unseen tokens are unchanged.
    """

    penalty: float

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(counts > 0, penalised, logits)


@dataclass
class FrequencyPresencePenalty:
    """OpenAI frequency and presence penalties: ``l' = l - f * count - p * [count > 0]``."""

    frequency: float
    presence: float

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


@dataclass
class Temperature:
    """``l' = (l - max_j l_j) / T`` (T > 0): T < 1 sharpens the distribution, T > 1 flattens it. T = 0 is
    greedy (in :func:`sample`), never a division.

    Subtracting the row max does not change ``softmax(l / T)`` (softmax is shift-invariant) but keeps the
    division finite: the top logit stays exactly 0 and the others go to ``-inf`` at worst, so a tiny T
    (1e-40, where ``l / T`` would overflow to inf and the softmax to NaN) becomes greedy instead of failing.
    """

    temperature: float

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        shifted = logits - logits.amax(dim=-1, keepdim=True)  # (B, V), <= 0
        # the where() keeps 0 at 0 even when 1 / T itself overflows (0 * inf would be NaN)
        return torch.where(shifted < 0, shifted / self.temperature, shifted)


@dataclass
class TopK:
    """Keep the k largest logits per row, set the rest to -inf: ``l'_i = l_i if l_i >= l_(k) else -inf``
    where ``l_(k)`` is the k-th largest (ties with it are kept). ``k >= V`` keeps everything."""

    k: int

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.k >= logits.size(-1):
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[:, -1:]  # (B, 1)
        return logits.masked_fill(logits < kth, float("-inf"))


@dataclass
class TopP:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose total
    probability is >= p, and at least one token.

    With the probabilities sorted descending ``p_(1) >= p_(2) >= ...`` and ``c_j = sum_{i<=j} p_(i)``, token
    ``(j)`` is kept iff ``c_{j-1} < p`` (the mass before it has not reached p yet). ``p = 1`` keeps all.
    """

    p: float

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.p >= 1.0:
            return logits
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # c_{j-1}
        drop_sorted = mass_before >= self.p
        drop_sorted[:, 0] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))


@dataclass
class MinP:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with ``p_i >= min_p * max_j p_j``.

    The threshold scales with the model's confidence: a peaked distribution keeps few tokens, a flat one
    many. The most likely token always survives.
    """

    min_p: float

    def __call__(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.min_p <= 0:
            return logits
        probs = torch.softmax(logits, dim=-1)
        threshold = self.min_p * probs.amax(dim=-1, keepdim=True)
        return logits.masked_fill(probs < threshold, float("-inf"))


def build_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The processors ``params`` switches on, in application order (penalties, temperature, truncations)."""
    procs: list[LogitsProcessor] = []
    if params.repetition_penalty != 1:
        procs.append(RepetitionPenalty(params.repetition_penalty))
    if params.frequency_penalty != 0 or params.presence_penalty != 0:
        procs.append(FrequencyPresencePenalty(params.frequency_penalty, params.presence_penalty))
    if params.greedy:
        return procs  # truncations cannot change the argmax
    if params.temperature != 1:
        procs.append(Temperature(params.temperature))
    if params.top_k is not None:
        procs.append(TopK(params.top_k))
    if params.top_p < 1:
        procs.append(TopP(params.top_p))
    if params.min_p > 0:
        procs.append(MinP(params.min_p))
    return procs


def sample(
    logits: torch.Tensor,
    counts: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    processors: Sequence[LogitsProcessor] | None = None,
) -> torch.Tensor:
    """Next token per row: (B, V) logits -> (B,) long.

    Greedy (temperature 0) takes the argmax of the penalised logits; otherwise one draw from
    ``softmax(processed logits)`` using ``generator`` (seeded per request for reproducible samples).
    ``processors`` can be passed pre-built (the engine builds them once per request).

    Raises :class:`GenerationError` when the logits (greedy) or the probabilities (sampling) are not
    finite: the checked options cannot cause that, a model that produces NaN logits can.
    """
    procs = build_processors(params) if processors is None else processors
    logits = logits.float()
    for proc in procs:
        logits = proc(logits, counts)  # type: ignore[arg-type]
    if params.greedy:
        if bool(logits.isnan().any()):
            raise _not_finite("logits")
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise _not_finite("probabilities")
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _not_finite(what: str) -> GenerationError:
    return GenerationError(
        f"the next-token {what} are not finite (NaN/inf): the model's output has diverged; "
        "check the checkpoint (e.g. scratchlm eval on it)"
    )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded with ``seed`` (a random seed when None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------------------------------------
# stop strings


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index in ``text`` of the earliest stop string that occurs at or after ``start``, else None.

    ``start`` lets the engine search only the part that new tokens can have completed
    (``len(old_text) - max(len(s)) + 1``).
    """
    best = None
    for s in stops:
        i = text.find(s, max(0, start))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string.

    A streamer holds these characters back: the next token may complete a stop string, and text that turns
    out to belong to it must never have been shown.
    """
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
