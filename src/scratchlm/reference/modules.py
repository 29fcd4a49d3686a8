"""Run a built model through the hand-written pieces: ``model.impl=reference``.

:func:`use_reference` changes only the arithmetic: every ``nn.Linear``, ``nn.Embedding`` and ``nn.Dropout``
becomes the subclass below (same parameters, names, state dict and hooks; its forward calls the hand-written
:func:`~scratchlm.reference.functional.linear` / ``embedding`` / ``dropout``), every layer that does math
through an ``ops`` attribute (norms, MLP, RoPE, masks, attention, the loss) gets
:mod:`scratchlm.reference.functional` instead of :mod:`scratchlm.model.functional`, and attention is computed step by step (``attention=manual``: the fused
flash kernel has no reference twin). Slow, and equal to the fast path within float rounding (tested over
50 training steps).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scratchlm.reference import functional


class Linear(nn.Linear):
    """nn.Linear whose forward is the hand-written x W^T + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding (no padding_idx, max_norm or sparse gradient) whose forward is the row lookup E[ids]."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return functional.embedding(ids, self.weight)


class Dropout(nn.Dropout):
    """nn.Dropout whose forward is the hand-written inverted dropout (p in training, nothing in eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.dropout(x, self.p if self.training else 0.0)


def use_reference(model: nn.Module) -> nn.Module:
    """Switch ``model`` (in place) to the reference implementation; returns it. Weights are untouched.

    The module classes are swapped in place (``module.__class__``) rather than rebuilt, so parameters stay
    the same objects: a tied head stays tied, and an optimizer built before still holds them.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
        elif type(module) is nn.Embedding:
            module.__class__ = Embedding
        elif type(module) is nn.Dropout:
            module.__class__ = Dropout
        if hasattr(module, "ops"):
            module.ops = functional
        if hasattr(module, "backend"):  # Attention: no fused kernel
            module.backend = "manual"
    return model
