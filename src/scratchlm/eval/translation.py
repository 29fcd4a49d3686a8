"""Scoring a translation model on source/reference pairs: loss, perplexity, sacreBLEU and chrF.

    result = evaluate_translation(model, tokenizer, pairs, beam_size=4)
    result["loss"], result["ppl"], result["bleu"], result["chrf"], result["hypotheses"]

- loss: the mean cross-entropy of the references under teacher forcing, in nats per target token (EOS
  included), *without* label smoothing (training's loss includes it); ppl = exp(loss). Pairs longer than
  the model's context are left out of the loss (and counted in ``loss_pairs``).
- bleu / chrf: :func:`scratchlm.eval.bleu.corpus_scores` of the detokenized translations (greedy or beam
  search, :mod:`scratchlm.inference.translate`) against the raw references, every pair included.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from scratchlm.device import autocast
from scratchlm.eval.bleu import corpus_scores
from scratchlm.inference.translate import translate_texts


@torch.inference_mode()
def reference_loss(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], dtype: torch.dtype = torch.float32
) -> tuple[float, int, int]:
    """(mean nats per target token, target tokens, pairs scored) of the references under teacher forcing."""
    from scratchlm.data.pairs import PairLoader
    from scratchlm.errors import DataError

    device = next(model.parameters()).device
    try:
        loader = PairLoader(
            pairs,
            tokenizer,
            batch_size=64,
            max_len=model.config.context_length - 1,
            shuffle=False,
            device=device,
        )
    except DataError:  # every pair is too long for the context
        return math.nan, 0, 0
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    for batch in loader.epoch_batches():
        with autocast(device, dtype):
            logits, _ = model(batch["src"], batch["tgt_in"], src_mask=batch["src_mask"])
        targets = batch["targets"].flatten()
        nll += F.cross_entropy(
            logits.float().flatten(0, 1), targets, ignore_index=-100, reduction="sum"
        ).item()
        n += int((targets != -100).sum())
    model.train(was_training)
    return nll / max(n, 1), n, len(loader)


def evaluate_translation(
    model: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    truncate: bool = False,
    strict_option: str = "truncate=False",
) -> dict[str, Any]:
    """Loss, perplexity, BLEU and chrF on ``pairs`` (module docstring), with the translations.

    ``truncate``/``strict_option``: sources longer than the context (inference/translate.py)."""
    loss, tokens, scored = reference_loss(model, tokenizer, pairs, dtype)
    device = next(model.parameters()).device
    with autocast(device, dtype):
        hyps = translate_texts(
            model,
            tokenizer,
            [s for s, _ in pairs],
            beam_size=beam_size,
            length_penalty=length_penalty,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            batch_size=batch_size,
            progress=progress,
            truncate=truncate,
            strict_option=strict_option,
        )
    scores = corpus_scores(hyps, [t for _, t in pairs])
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan,
        "loss_tokens": tokens,
        "loss_pairs": scored,
        **scores,
        "beams": beam_size,
        "length_penalty": length_penalty,
        "hypotheses": hyps,
    }
