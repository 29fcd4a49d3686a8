"""Next-token accuracy: how often the model's top-1 (or any of its top-k) predictions is the true token.

For logits ``z`` (N, V) and targets ``y`` (N,), position i is correct at k when ``y_i`` is among the k
largest logits of row i (ties broken by ``torch.topk``)::

    acc@k = #{i : y_i in topk(z_i, k), y_i != ignore_index} / #{i : y_i != ignore_index}

Accuracy complements the loss: cross-entropy rewards probability spread over plausible tokens, accuracy
only the ranking, so two models with equal loss can differ in accuracy (and a very peaked wrong model has a
high loss but may keep its accuracy). Counts, not means, are returned so that batches and ranks add up
exactly; divide at the end.
"""

from __future__ import annotations

import torch

ACCURACY_KS = (1, 5)  # the metrics.jsonl keys val_acc_top1 and val_acc_top5


@torch.no_grad()
def topk_correct(
    logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = ACCURACY_KS, ignore_index: int = -100
) -> tuple[list[int], int]:
    """(correct count for each k, counted positions) of logits (..., V) against targets (...) long.

    Positions whose target is ``ignore_index`` (padding) are not counted. A k above V counts every position.
    """
    V = logits.size(-1)
    z = logits.reshape(-1, V)
    y = targets.reshape(-1)
    keep = y != ignore_index
    z, y = z[keep], y[keep]
    if y.numel() == 0:
        return [0 for _ in ks], 0
    top = torch.topk(z, min(max(ks), V), dim=-1).indices  # (N, kmax), best first
    hit = top == y[:, None]  # (N, kmax): at most one True per row
    return [int(hit[:, :k].any(dim=-1).sum()) for k in ks], int(y.numel())
