"""Translation with the encoder-decoder model: greedy search and beam search, both with the KV cache.

    hyps = beam_search(model, src, src_mask, bos_id, eos_id, max_len=64, beam_size=4, length_penalty=1.0)
    texts = translate(model, tokenizer, ["ein Hund läuft."], beam_size=4)
    hyps = translate_hypotheses(model, tokenizer, ["ein Hund läuft."], beam_size=4)  # ids and scores

``scratchlm generate RUN_DIR --prompt "ein Hund läuft." [--beams 4] [--length-penalty 1.0]`` on a seq2seq run
calls :func:`translate_hypotheses`.

The source is encoded once (``model.encode``); the decoder then runs one token per step with a
``Seq2SeqCache`` (self-attention K/V grow, cross-attention K/V are computed once).

Scores. A hypothesis y = (y_1 .. y_n) (EOS included when it ended) has log-probability
``log p(y | x) = sum_t log p(y_t | y_<t, x)`` and score ``log p(y | x) / n ** alpha`` where ``alpha`` is the
length penalty (0 = raw log-probability, which favours short outputs; 1 = mean per-token log-probability).
Greedy's result is scored the same way, so the two are comparable.

Beam search keeps the ``beam_size`` best partial hypotheses per source. Each step expands every beam by every
token, takes the ``2 * beam_size`` best by log-probability; a candidate ending in EOS among the top
``beam_size`` becomes a finished hypothesis, the others refill the beams. A source is done when it has
``beam_size`` finished hypotheses and no live beam can still beat the worst of them: log-probabilities only
decrease, so a live beam's final score is at most ``logp_now / max_len ** alpha`` (alpha >= 0).
At ``max_len``, live beams count as finished (without EOS). With ``beam_size=1`` this is exactly greedy.
Beam search usually finds a higher-scoring output than greedy, but is not guaranteed to: the greedy path can
fall out of the beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scratchlm.errors import GenerationError


@dataclass
class Hypothesis:
    """One output: tokens after BOS (EOS included if it ended), their total log-probability and score."""

    tokens: list[int]
    logprob: float
    score: float


def sequence_score(logprob: float, length: int, length_penalty: float) -> float:
    """``logprob / length ** length_penalty`` (length counts EOS; at least 1)."""
    return logprob / max(length, 1) ** length_penalty


@torch.inference_mode()
def greedy_search(
    model,
    src: torch.Tensor,
    src_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_len: int,
    length_penalty: float = 1.0,
) -> list[Hypothesis]:
    """Argmax decoding per row: src (B, S) long, src_mask (B, S) bool -> B hypotheses."""
    B = src.shape[0]
    memory = model.encode(src, src_mask)
    cache = model.make_cache(B, max_len=max_len)
    token = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
    tokens: list[list[int]] = [[] for _ in range(B)]
    logprob = [0.0] * B
    done = [False] * B
    for _ in range(max_len):
        logprobs = F.log_softmax(model.decode(token, memory, src_mask, cache=cache)[:, -1].float(), dim=-1)
        best = logprobs.argmax(dim=-1)  # (B,)
        best_lp = logprobs.gather(1, best[:, None])[:, 0]
        for b, (t, lp) in enumerate(zip(best.tolist(), best_lp.tolist())):
            if not done[b]:
                tokens[b].append(t)
                logprob[b] += lp
                done[b] = t == eos_id
        if all(done):
            break
        token = best[:, None]
    return [Hypothesis(t, lp, sequence_score(lp, len(t), length_penalty)) for t, lp in zip(tokens, logprob)]


@torch.inference_mode()
def beam_search(
    model,
    src: torch.Tensor,
    src_mask: torch.Tensor | None,
    bos_id: int,
    eos_id: int,
    max_len: int,
    beam_size: int = 4,
    length_penalty: float = 1.0,
) -> list[Hypothesis]:
    """Best hypothesis per source row (module docstring): src (B, S), src_mask (B, S) -> B hypotheses."""
    if beam_size < 1:
        raise GenerationError(f"beam_size must be >= 1, got {beam_size}")
    if length_penalty < 0:
        raise GenerationError(f"length_penalty must be >= 0, got {length_penalty}")
    B, K, dev = src.shape[0], beam_size, src.device
    memory = model.encode(src, src_mask).repeat_interleave(K, dim=0)  # (B*K, S, C)
    mask = None if src_mask is None else src_mask.repeat_interleave(K, dim=0)
    cache = model.make_cache(B * K, max_len=max_len)
    seqs = torch.full((B * K, 0), bos_id, dtype=torch.long, device=dev)  # tokens after BOS, per beam
    token = torch.full((B * K, 1), bos_id, dtype=torch.long, device=dev)
    beam_logp = torch.full((B, K), float("-inf"), device=dev)
    beam_logp[:, 0] = 0.0  # all beams start identical: expand only the first at step 1
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_len):
        logprobs = F.log_softmax(model.decode(token, memory, mask, cache=cache)[:, -1].float(), dim=-1)
        V = logprobs.shape[-1]
        cand = (beam_logp.view(B * K, 1) + logprobs).view(B, K * V)  # (B, K*V)
        top_logp, top_idx = cand.topk(min(2 * K, K * V), dim=-1)  # (B, 2K)
        src_beam, top_tok = top_idx // V, top_idx % V
        next_beam = torch.zeros(B, K, dtype=torch.long, device=dev)
        next_tok = torch.full((B, K), eos_id, dtype=torch.long, device=dev)
        next_logp = torch.full((B, K), float("-inf"), device=dev)
        rows_logp, rows_beam, rows_tok = top_logp.tolist(), src_beam.tolist(), top_tok.tolist()
        for b in range(B):
            n = 0
            for rank, (lp, beam, tok) in enumerate(zip(rows_logp[b], rows_beam[b], rows_tok[b])):
                if lp == float("-inf"):
                    break
                if tok == eos_id:
                    if rank < K and not done[b]:
                        hyp = seqs[b * K + beam].tolist() + [eos_id]
                        finished[b].append(Hypothesis(hyp, lp, sequence_score(lp, len(hyp), length_penalty)))
                    continue
                next_beam[b, n], next_tok[b, n], next_logp[b, n] = beam, tok, lp
                n += 1
                if n == K:
                    break
            done[b] = done[b] or len(finished[b]) >= K
        if all(done):
            break
        order = (torch.arange(B, device=dev)[:, None] * K + next_beam).view(-1)  # (B*K,) rows to keep
        cache.reorder(order)
        seqs = torch.cat([seqs[order], next_tok.view(-1, 1)], dim=1)
        beam_logp = next_logp
        token = next_tok.view(-1, 1)
    for b in range(B):
        if not done[b]:  # max_len reached: live beams compete as they are
            for k in range(K):
                lp = beam_logp[b, k].item()
                if lp > float("-inf"):
                    hyp = seqs[b * K + k].tolist()
                    finished[b].append(Hypothesis(hyp, lp, sequence_score(lp, len(hyp), length_penalty)))
    return [max(f, key=lambda h: h.score) for f in finished]


def translate(
    model,
    tokenizer,
    src_texts: list[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_len: int | None = None,
) -> list[str]:
    """Translate each text: beam_size 1 = greedy. The decoded best hypotheses of
    :func:`translate_hypotheses` (same arguments), EOS removed."""
    eos = tokenizer.eot_id
    hyps = translate_hypotheses(
        model, tokenizer, src_texts, beam_size=beam_size, length_penalty=length_penalty, max_len=max_len
    )
    return [tokenizer.decode([t for t in h.tokens if t != eos]) for h in hyps]


def translate_hypotheses(
    model,
    tokenizer,
    src_texts: list[str],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_len: int | None = None,
) -> list[Hypothesis]:
    """The best hypothesis per source text (tokens after BOS, EOS last when it ended), in order.

    beam_size 1 = greedy. ``max_len`` caps the output tokens (EOS included; default and upper bound: the
    model's ``context_length``). Uses the seq2seq special tokens ``<|bos|>``, ``<|pad|>`` and
    ``<|endoftext|>`` (EOS), as the parallel-data loader does (source = ids + [EOS]).
    """
    if not src_texts:
        return []
    specials = tokenizer.special_tokens
    missing = [s for s in ("<|bos|>", "<|pad|>") if s not in specials]
    if missing:
        raise GenerationError(f"the tokenizer lacks the seq2seq special tokens {missing}; train it with them")
    bos, pad, eos = specials["<|bos|>"], specials["<|pad|>"], tokenizer.eot_id
    ctx = model.config.context_length
    max_len = min(max_len or ctx, ctx)
    ids = [tokenizer.encode(t) + [eos] for t in src_texts]
    too_long = max(len(s) for s in ids)
    if too_long > ctx:
        raise GenerationError(
            f"a source has {too_long} tokens (EOS included) > context_length {ctx}; split it"
        )
    dev = next(model.parameters()).device
    S = max(len(s) for s in ids)
    src = torch.full((len(ids), S), pad, dtype=torch.long)
    for i, s in enumerate(ids):
        src[i, : len(s)] = torch.tensor(s)
    src_mask = (torch.arange(S)[None] < torch.tensor([len(s) for s in ids])[:, None]).to(dev)
    model.eval()
    if beam_size == 1:
        return greedy_search(model, src.to(dev), src_mask, bos, eos, max_len, length_penalty)
    return beam_search(model, src.to(dev), src_mask, bos, eos, max_len, beam_size, length_penalty)
