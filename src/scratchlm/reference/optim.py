"""The optimisation pieces written out: AdamW, Muon (with its Newton-Schulz step), gradient clipping, schedules.

AdamW and Muon are ``torch.optim.Optimizer`` subclasses with one plain loop over the parameters (no foreach,
no fused kernel) and the same state keys as torch's (``step``, ``exp_avg``, ``exp_avg_sq``;
``momentum_buffer``), so a run's optimizer.pt loads into either. ``train.optimizer=adamw_reference`` or
``muon_reference`` trains with them; tests/reference compares them with torch.optim.AdamW and
torch.optim.Muon step by step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), per parameter p with gradient g:

    p <- p - lr * wd * p                                  (decay, not through the gradient)
    m <- b1 m + (1 - b1) g,     v <- b2 v + (1 - b2) g^2   (moving averages, m = v = 0 at t = 0)
    m_hat = m / (1 - b1^t),     v_hat = v / (1 - b2^t)     (bias correction, t = 1, 2, ...)
    p <- p - lr * m_hat / (sqrt(v_hat) + eps)
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:  # torch's layout: step as a float tensor, moments shaped like p
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
        return loss


# Keller Jordan's quintic coefficients (https://kellerjordan.github.io/posts/muon/), as torch.optim.Muon
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximately orthogonalise G (rows x cols): push all its singular values towards 1.

    X = G / ||G||_F (so every singular value is <= 1), then ``steps`` times
        A = X X^T,   X <- a X + (b A + c A^2) X
    which maps each singular value s to a s + b s^3 + c s^5 (the quintic that climbs from 0 fastest).
    Wide form (rows <= cols) so that A is the small Gram matrix. Computed in ``dtype`` (bf16, as torch);
    ``torch.addmm(M, P, Q, beta=x, alpha=y)`` is x M + y P Q rounded once to bf16, so it rounds where
    torch.optim.Muon does (a separate b * A + c * (A @ A) rounds three times more, and after 30 steps the
    weights differ by ~3e-3).
    """
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.T  # (rows, rows)
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers"), for 2-D weight matrices W:

    B <- mu B + (1 - mu) g                     (momentum, an exponential moving average)
    U = (1 - mu) g + mu B  (nesterov)  or  B   (the direction)
    O = newton_schulz(U)                       (orthogonalised: all singular values ~ 1)
    W <- W - lr * wd * W;   W <- W - lr * sqrt(max(1, rows / cols)) * O

    ``ns_dtype`` is the precision of the Newton-Schulz step: bf16 as torch.optim.Muon (fast on GPUs), or
    float32 on CPUs without bf16 matrix units, where a bf16 matmul runs ~25x slower than a float32 one.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
        super().__init__(params, dict(defaults, ns_steps=ns_steps, eps=eps))
        self.ns_dtype = ns_dtype  # not a param-group entry: it stays out of state_dict, as in torch's Muon
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon optimises 2-D matrices only, got a parameter of shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                # lerp(x, y, w) = x + w (y - x): the moving averages written as torch computes them, since
                # the bf16 Newton-Schulz step turns any last-bit difference into a visible one
                buf.lerp_(g, 1 - mu)  # B = mu B + (1 - mu) g
                update = g.lerp(buf, mu) if group["nesterov"] else buf  # (1 - mu) g + mu B
                O = newton_schulz(update, group["ns_steps"], eps=group["eps"], dtype=self.ns_dtype).to(
                    p.dtype
                )
                rows, cols = p.shape
                p.mul_(1 - lr * wd)
                p.sub_(O * (lr * math.sqrt(max(1.0, rows / cols))))
        return loss


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale all gradients by min(1, max_norm / (||g|| + 1e-6)), ||g|| the norm of all of them as one vector.

    Returns ||g|| before clipping (as torch.nn.utils.clip_grad_norm_). The direction is kept; only a
    step that would be too long is shortened.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return float(total)


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedules: the lr used by optimizer step s (0-based), with W warmup steps and N steps in all


def warmup(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup: lr * (s + 1) / W, so step 0 already moves (by lr / W) and step W - 1 uses lr."""
    return lr * (step + 1) / warmup_steps


def cosine_schedule(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Warmup, then min_lr + (lr - min_lr) (1 + cos(pi p)) / 2 with p = (s - W) / (N - W) going 0 -> 1."""
    if step < warmup_steps:
        return warmup(step, lr, warmup_steps)
    p = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * p)) / 2


def wsd_schedule(
    step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay_fraction: float
) -> float:
    """Warmup-stable-decay (Hu et al. 2024): lr until D = N - decay_fraction N, then linear to min_lr at N."""
    if step < warmup_steps:
        return warmup(step, lr, warmup_steps)
    decay_start = max(warmup_steps, max_steps - round(decay_fraction * max_steps))
    if step < decay_start:
        return lr
    p = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return lr + (min_lr - lr) * p


def constant_schedule(step: int, *, lr: float, warmup_steps: int) -> float:
    """Warmup, then lr."""
    return warmup(step, lr, warmup_steps) if step < warmup_steps else lr
