"""Loss, perplexity and bits per byte.

For held-out targets y_1..y_N with model probabilities p(y_i | y_<i):

    loss        = -(1/N) * sum_i ln p(y_i | y_<i)              (nats per token)
    perplexity  = exp(loss)
    bits/byte   = -(sum_i ln p(y_i | y_<i)) / (ln 2 * sum_i bytes(y_i))

Perplexity depends on the tokenizer (a bigger vocabulary makes each token harder to predict); bits per byte
does not, so it compares models with different tokenizers. Special tokens have no bytes and are left out of
the bits-per-byte sums (as in nanochat).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from scratchlm.device import autocast


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """(vocab_size,) int64: the UTF-8 byte length of each token; 0 for special tokens."""
    specials = set(tokenizer.special_tokens.values())
    lengths = [0 if i in specials else len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.long)


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Mean loss, perplexity and (with ``token_bytes``) bits per byte over ``batches`` of (x, y), each (B, T).

    Targets equal to -100 are ignored. The model is put in eval mode for the pass and restored after.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll_sum, n_tokens, nll_bytes_sum, n_bytes = 0.0, 0, 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none")
        valid = y.flatten() != -100
        nll_sum += nll[valid].sum().item()
        n_tokens += int(valid.sum())
        if token_bytes is not None:
            b = token_bytes.to(device)[y.flatten().clamp(min=0)] * valid
            nll_bytes_sum += nll[b > 0].sum().item()
            n_bytes += int(b.sum())
    model.train(was_training)
    loss = nll_sum / max(n_tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(n_tokens)}
    if token_bytes is not None and n_bytes:
        out["bits_per_byte"] = nll_bytes_sum / (math.log(2) * n_bytes)
    return out
