"""The output layer and its cross-entropy in row chunks, so the (N, V) fp32 logits never exist whole.

    loss = mean_i CE(h_i W^T, y_i)   over the N = B*T rows with y_i != ignore_index
    CE(z, y) = logsumexp(z) - ((1 - eps) z_y + eps * mean_v z_v)          (label smoothing eps)
    dL/dz = (softmax(z) - q) / n_valid,   q = (1 - eps) onehot(y) + eps / V  (0 for ignored rows)
    dL/dh = dL/dz W,   dL/dW = sum_i dL/dz_i^T h_i

The plain path (``lm_head`` then ``F.cross_entropy`` on ``logits.float()``) holds, for GPT-2's vocabulary
of 50,257 at B*T = 16K rows, 16-bit logits (1.6 GB), their fp32 copy (3.3 GB) and its gradient (3.3 GB) at
once. Here each chunk of ``chunk_rows`` rows computes its logits, its loss and, in the same pass, its gradient
with respect to h and W (the gradient of a mean loss does not depend on the rest of the batch), then frees
them: peak extra memory is ``chunk_rows * V`` fp32 values, plus the (N, C) and (V, C) gradients that the
backward returns (scaled by the incoming gradient). This is the approach of Liger-Kernel's fused linear
cross-entropy, written with plain PyTorch matmuls.

Precision matches the plain path: the matmuls run in the autocast dtype when autocast is on (as
``nn.Linear`` would), the softmax and the loss in fp32, and dL/dz is cast to the matmul dtype before the two
gradient matmuls, as autograd does for the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _matmul_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would multiply in: the autocast dtype when autocast is on for h's device."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return h.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h W^T) against targets, computed chunk by chunk with its gradients."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows: int, ignore_index: int, label_smoothing: float):  # noqa: D102
        dt = _matmul_dtype(h)
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(dt)
        V = weight.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_rows):
                h_c = h[start : start + chunk_rows].to(dt)  # (n, C)
                y_c = targets[start : start + chunk_rows]  # (n,)
                z = (h_c @ w.t()).float()  # (n, V) fp32 logits of this chunk only
                loss += F.cross_entropy(
                    z, y_c, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
                )
                # dL/dz = softmax(z) - q, zero on ignored rows, / n_valid; in place in z's memory
                grad_z = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_()
                valid = y_c != ignore_index
                if label_smoothing:
                    grad_z.sub_(label_smoothing / V)
                rows = torch.arange(y_c.shape[0], device=h.device)
                grad_z[rows, y_c.clamp(min=0)] -= (1.0 - label_smoothing) * valid.float()
                grad_z.mul_((valid.float() / n_valid)[:, None])
                grad_z = grad_z.to(dt)
                if grad_h is not None:
                    grad_h[start : start + chunk_rows] = (grad_z @ w).to(h.dtype)  # (n, C)
                if grad_w is not None:
                    grad_w += (grad_z.t() @ h_c).float()  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None


def chunked_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = 4096,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``h @ weight.T`` without materialising them: h (..., C), weight
    (V, C) (the output layer, no bias), targets (...) long -> scalar fp32, equal (forward and gradients) to
    ``F.cross_entropy((h @ weight.T).float().flatten(0, -2), targets.flatten(), ...)``.

    ``chunk_rows`` rows of logits exist at a time. A batch with no target left (all ``ignore_index``) gives
    loss 0 and zero gradients, where ``F.cross_entropy`` gives NaN.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    h2 = h.reshape(-1, h.shape[-1])
    return ChunkedLinearCrossEntropy.apply(
        h2, weight, targets.reshape(-1), int(chunk_rows), int(ignore_index), float(label_smoothing)
    )
