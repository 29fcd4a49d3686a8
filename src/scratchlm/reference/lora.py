"""LoRA written out by hand: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021).

    h = W x + b + (alpha / r) * B A dropout(x)

    x (..., in)      the layer's input
    W (out, in)      the pretrained weight, frozen; b (out,) its bias (may be absent)
    A (r, in)        the down-projection, initialised like nn.Linear (Kaiming-uniform, a = sqrt(5))
    B (out, r)       the up-projection, initialised to zero, so the adapted layer starts equal to the base
    alpha / r        the scaling: with r changed, alpha keeps the update's size (the paper's "alpha")

Only A and B are trained: r * (in + out) numbers instead of in * out. After training the update folds into
the weight, W' = W + (alpha / r) B A, and the layer costs nothing extra at inference (:func:`merge`).

This is the teaching version (``model.impl=reference``); training uses ``scratchlm.train.adapters`` with
the same parameters under the same names (``lora_A.weight``, ``lora_B.weight``, as peft names them). Both
are tested equal to peft's ``LoraModel`` (tests/reference/test_reference_lora.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from scratchlm.reference import functional
from scratchlm.reference.modules import Linear


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    alpha: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """h = x W^T + b + (alpha / r) * dropout(x) A^T B^T.

    x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r) -> h (..., out); r = A.shape[0].
    ``dropout_p`` is applied to the adapter's input only (0 at eval time), as in the paper and peft.
    """
    r = A.shape[0]
    base = functional.linear(x, weight, bias)  # (..., out)
    down = functional.linear(functional.dropout(x, dropout_p), A)  # (..., r)
    return base + (alpha / r) * functional.linear(down, B)  # (..., out)


def merge(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> torch.Tensor:
    """W' = W + (alpha / r) B A: the weight of the adapted layer with the update folded in. (out, in)."""
    return weight + (alpha / A.shape[0]) * (B @ A)


class LoRALinear(Linear):
    """A reference ``Linear`` (frozen W, b) with a LoRA update; forward is :func:`lora_linear`.

    Made from an existing layer in place (``scratchlm.train.adapters.add_lora``), so W and b keep their
    names; A and B live in ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r).
    """

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_alpha: float
    lora_dropout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_dropout_p if self.training else 0.0
        return lora_linear(
            x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.lora_alpha, p
        )
