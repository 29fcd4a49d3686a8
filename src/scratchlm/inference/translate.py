"""Batched translation of many sentences with a seq2seq model: sorted by length, greedy or beam search.

    texts = translate_texts(model, tokenizer, sources, beam_size=4, length_penalty=1.0, batch_size=64)

Sources are sorted by token length and cut into batches of ``batch_size`` so that a batch holds sentences
of nearly one length (little padding, and beam search stops together); the outputs come back in the input
order. Each batch may emit at most ``max_len_a * S + max_len_b`` tokens (EOS included), ``S`` the longest
source in the batch (with its EOS), capped by the model's context (fairseq's ``--max-len-a/b``): a
translation is rarely much longer than its source, and a bound relative to it stops a model that repeats
itself early. Search itself is :mod:`scratchlm.inference.beam` (KV cache; beam 1 = greedy).

A source longer than the model's context (``context_length`` tokens, its EOS included) is refused by
default; ``truncate=True`` cuts it to its first ``context_length - 1`` tokens + EOS, as fairseq's
``--truncate-source`` does, and says so in one warning naming the sources (1-based: the lines of a
file). ``scratchlm translate`` and ``scratchlm eval`` truncate unless ``--strict``: a test set is input a
user cannot edit, and one long sentence should not cost the whole file.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from scratchlm.console import is_terminal
from scratchlm.errors import GenerationError
from scratchlm.inference.beam import Hypothesis, beam_search, greedy_search


def fit_sources(
    ids: list[list[int]], ctx: int, eos: int, truncate: bool, strict_option: str = "truncate=False"
) -> list[list[int]]:
    """Sources (token ids, EOS last) that fit ``ctx``: unchanged when they do; otherwise a
    GenerationError naming the first too long one, or with ``truncate`` each cut to ``ids[:ctx - 1] + [EOS]``
    and one warning naming them (``source 48 (66 tokens)``, the first ten, then how many more)."""
    long = [i for i, s in enumerate(ids) if len(s) > ctx]
    if not long:
        return ids
    if not truncate:
        i = long[0]
        raise GenerationError(
            f"source {i + 1} has {len(ids[i])} tokens (EOS included) > context_length {ctx}; "
            "split it into shorter sentences"
        )
    named = ", ".join(f"source {i + 1} ({len(ids[i])} tokens)" for i in long[:10])
    more = f" and {len(long) - 10} more" if len(long) > 10 else ""
    warnings.warn(
        f"{len(long)} of {len(ids)} sources are longer than the model's context_length {ctx} (EOS included) "
        f"and were truncated to it: {named}{more}; {strict_option} refuses them instead",
        stacklevel=3,
    )
    return [s[: ctx - 1] + [eos] if len(s) > ctx else s for s in ids]


def translate_texts(model: Any, tokenizer: Any, sources: list[str], **options: Any) -> list[str]:
    """Detokenized translations of ``sources`` (list order kept); ``options`` are those of
    :func:`translate_batched` (beam_size, length_penalty, max_len_a, max_len_b, batch_size, progress)."""
    hyps = translate_batched(model, tokenizer, sources, **options)
    eos = tokenizer.eot_id
    return [tokenizer.decode([t for t in h.tokens if t != eos]).strip() for h in hyps]


@torch.inference_mode()
def translate_batched(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    batch_size: int = 64,
    progress: bool = False,
    truncate: bool = False,
    strict_option: str = "truncate=False",
) -> list[Hypothesis]:
    """The best hypothesis per source (tokens after BOS, EOS last when it ended), in input order.

    ``truncate``: cut over-long sources to the context (module docstring) instead of refusing them;
    ``strict_option`` is how the warning names the way back to the refusal (the CLI's ``--strict``).
    """
    if beam_size < 1:
        raise GenerationError(f"beam size must be >= 1 (1 = greedy), got {beam_size}")
    if batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch_size}")
    if max_len_a < 0 or max_len_b < 0 or (max_len_a == 0 and max_len_b == 0):
        raise GenerationError(
            f"the output bound max_len_a * S + max_len_b must be positive, got a={max_len_a}, b={max_len_b}"
        )
    if not sources:
        return []
    specials = tokenizer.special_tokens
    missing = [s for s in ("<|bos|>", "<|pad|>") if s not in specials]
    if missing:
        raise GenerationError(f"the tokenizer lacks the seq2seq special tokens {missing}; train it with them")
    bos, pad, eos = specials["<|bos|>"], specials["<|pad|>"], tokenizer.eot_id
    ctx = model.config.context_length
    ids = [ids + [eos] for ids in tokenizer.encode_batch(list(sources))]
    ids = fit_sources(ids, ctx, eos, truncate, strict_option)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Hypothesis | None] = [None] * len(ids)
    bar = None
    if progress and is_terminal():  # (in a log file a bar is carriage-return spam: scratchlm/console.py)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), unit="sent", desc="translate", leave=False)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            S = max(len(ids[i]) for i in rows)
            src = torch.full((len(rows), S), pad, dtype=torch.long)
            for r, i in enumerate(rows):
                src[r, : len(ids[i])] = torch.tensor(ids[i])
            lengths = torch.tensor([len(ids[i]) for i in rows])
            src_mask = (torch.arange(S)[None] < lengths[:, None]).to(dev)
            max_len = max(1, min(ctx, int(max_len_a * S + max_len_b)))
            if beam_size == 1:
                hyps = greedy_search(model, src.to(dev), src_mask, bos, eos, max_len, length_penalty)
            else:
                hyps = beam_search(model, src.to(dev), src_mask, bos, eos, max_len, beam_size, length_penalty)
            for i, h in zip(rows, hyps):
                out[i] = h
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out  # type: ignore[return-value]
