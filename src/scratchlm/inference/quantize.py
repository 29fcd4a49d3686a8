"""Weight-only int8 quantization for decoding on a CPU: a quarter of the float32 weights' bytes per token.

Decoding one token at batch 1 reads every weight matrix once and does two FLOPs per weight, so its speed
is set by how many bytes of weights memory delivers per second. Storing each matrix as int8 with one scale
per output row (symmetric, per channel) moves 1 byte per weight instead of 4:

    s[n] = max_k |W[n, k]| / 127                       (N,) float32
    Q[n, k] = round(W[n, k] / s[n])  in [-127, 127]     (N, K) int8
    y = x W^T  ~=  (x Q^T) * s                         x (M, K) -> y (M, N)

Eagerly the product runs in torch's own int8 weight kernel (``torch._weight_int8pack_mm``, the CPU kernel
of gpt-fast's and torchao's int8 weight-only mode) with bfloat16 activations (and a bfloat16 copy of the
scales): its float32 variant is a slow reference loop, the bfloat16 one is vectorised. So the eager error
has two parts: the rounding of each weight (at most s[n] / 2) and of each activation to bfloat16 (8 bits of
mantissa); llama.cpp's q8_0 rounds weights in blocks of 32 and quantizes activations to 8 bits as well.
Under torch.compile (``--compile``), a product of at most 4 rows is the multiply-and-sum of
inference/matvec.py instead: float32 activations, the int8 weight converted inside the compiled loop,
faster than the kernel and only the weights' rounding as error. The measured effect on logits is in
benchmarks/results/decode_cpu.md and tested in tests/inference/test_quantize.py.

Embeddings stay float32 (a lookup reads one row, not the matrix); a head tied to the embedding gets its own
int8 copy. Norm weights and biases stay float32. The model is changed in place; training it afterwards is
not supported (the int8 weights are buffers, not parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.inference.matvec import matvec, use_matvec


class Int8Linear(nn.Module):
    """y = (x Q^T) * s + b: a Linear whose weight is int8 with one float32 scale per output feature.

    x (..., K) float32 -> y (..., N) float32 (the product in bfloat16 activations, module docstring).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (N, K)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)  # (N,) float32
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16), persistent=False)  # the kernel's
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_matvec(x):  # compiled decoding: float32 activations, int8 converted in the loop
            y = matvec(x, self.weight) * self.scales
        else:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # (M, K)
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales_bf16).to(x.dtype)  # (M, N)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer computes with: Q * s (N, K)."""
        return self.weight.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of ``model`` (a float32 model on the CPU) by an :class:`Int8Linear`, in place.

    Returns the model. Refuses a model on another device or in another dtype with a one-line reason.
    """
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError(
            f"int8 weights are for float32 models on the CPU (torch's int8 weight kernel); this model is "
            f"{p.dtype} on {p.device.type}: drop --int8, or run on the CPU (--device cpu)"
        )
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model
