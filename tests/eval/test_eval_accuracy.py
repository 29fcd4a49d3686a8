"""Top-k next-token accuracy against a hand computation, and evaluate_metrics against a manual loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.eval.accuracy import topk_correct
from scratchlm.model import build_model
from scratchlm.train.evaluate import evaluate_metrics


def test_topk_correct_by_hand():
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0, 3.0],  # ranking 0, 3, 1, 2
            [0.0, 2.0, 9.0, 1.0],  # ranking 2, 1, 3, 0
            [1.0, 0.0, 0.5, 4.0],  # ranking 3, 0, 2, 1
            [0.0, 0.0, 7.0, 0.0],  # padding row
        ]
    )
    targets = torch.tensor([0, 1, 1, -100])
    # top-1: row 0 right, rows 1, 2 wrong; top-2: rows 0, 1; top-3: rows 0, 1 (row 2's 1 is last); top-4: all
    hits, n = topk_correct(logits, targets, ks=(1, 2, 3, 4))
    assert (hits, n) == ([1, 2, 2, 3], 3)
    hits, n = topk_correct(logits[None], targets[None], ks=(1, 5))  # (B, T, V); k > V counts every row
    assert (hits, n) == ([1, 3], 3)
    assert topk_correct(logits, torch.full((4,), -100)) == ([0, 0], 0)


def test_evaluate_metrics_equals_a_manual_loop():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, context_length=8)
    model = build_model(cfg)
    batches = [(torch.randint(0, 50, (3, 8)), torch.randint(0, 50, (3, 8))) for _ in range(4)]

    class Loader:
        def __init__(self):
            self.i = -1

        def next_batch(self):
            self.i += 1
            return batches[self.i]

    got = evaluate_metrics(model, Loader, 3, torch.device("cpu"), torch.float32)
    losses, top1, top5 = [], 0, 0
    with torch.no_grad():
        for x, y in batches[:3]:
            logits = model(x)[0]
            losses.append(F.cross_entropy(logits.reshape(-1, 50), y.reshape(-1)).item())
            rank = (logits > logits.gather(-1, y[..., None])).sum(-1)  # how many logits beat the target
            top1 += int((rank == 0).sum())
            top5 += int((rank < 5).sum())
    assert abs(got["val_loss"] - sum(losses) / 3) < 1e-6
    assert got["val_acc_top1"] == top1 / 72 and got["val_acc_top5"] == top5 / 72
    assert model.training  # put back in train mode
