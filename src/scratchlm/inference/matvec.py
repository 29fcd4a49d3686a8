"""Decoding's matrix-vector products, written so that torch.compile spreads them over every CPU thread.

Decoding one token at batch 1 multiplies every weight matrix W (N, K) by one activation row x (K,):

    y[n] = sum_k W[n, k] x[k]                      x (M, K), W (N, K) -> y (M, N), M = batch rows

Two FLOPs per weight read once, so the speed is the rate at which memory delivers the weights. torch's
float32 matrix-vector product (the BLAS GEMV behind ``F.linear``) runs on one thread on the 2-core machine
of benchmarks/results/decode_cpu.md and reads about 10 GB/s. Written as an elementwise product and a sum,

    y = (x[:, None, :] * W[None, :, :]).sum(-1)

inductor compiles it into one loop over the rows of W, vectorised and split across the threads, with no
(M, N, K) temporary: 23-28 GB/s on the same machine, about what llama.cpp reads per token. The int8 layer
(inference/quantize.py) uses the same form with its int8 weights converted in the loop.

The form is taken only inside ``torch.compile`` (the engine's compiled decode step) and only for at most
:data:`MAX_ROWS` rows: run eagerly it would build the temporary, and for more rows the product does enough
arithmetic per weight that the GEMM is faster (measured: at 4 rows the compiled form still reads 1.4x
faster than the GEMM, so 4 is the limit). Outside that the layer is exactly ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 4  # up to this many activation rows, a compiled product is written as a multiply-and-sum


def use_matvec(x: torch.Tensor) -> bool:
    """True where the multiply-and-sum form pays: inside torch.compile, for at most MAX_ROWS rows of x."""
    return torch.compiler.is_compiling() and x.numel() <= MAX_ROWS * x.shape[-1]


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) times weight (N, K)^T -> (..., N) as a multiply-and-sum (module docstring).

    ``weight`` may be int8: the product then promotes it to x's dtype inside the compiled loop."""
    return (x.unsqueeze(-2) * weight).sum(-1)


class MatVecLinear(nn.Linear):
    """nn.Linear whose compiled few-row product is :func:`matvec`; identical to nn.Linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_matvec(x):
            return F.linear(x, self.weight, self.bias)
        y = matvec(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_matvec_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of ``model`` a :class:`MatVecLinear`, in place; returns the model.

    Only the class changes: the parameters (a head tied to the embedding included), the state dict and the
    eager forward stay exactly as they were, so the model trains, saves and exports as before.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear
    return model
