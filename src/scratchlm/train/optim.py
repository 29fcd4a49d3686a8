"""Optimizers and learning-rate schedules.

Optimizers (``train.optimizer``):

- ``adamw``: :class:`torch.optim.AdamW` (the fused kernel where the device has one, else ``foreach``).
  Weight decay only on tensors with ``ndim >= 2`` (matrices and embeddings); biases and norm gains are not
  decayed, as in GPT-2 / nanoGPT.
- ``muon``: :class:`torch.optim.Muon` (on CPU the same update with a float32 Newton-Schulz step, see
  :func:`build_optimizers`) for the 2-D weight matrices *inside* the blocks (attention and MLP
  projections), and AdamW for everything else: token/position embeddings, the output head, norms and biases.
  Muon orthogonalises the momentum of each matrix with a Newton-Schulz iteration (Jordan et al. 2024,
  "Muon: An optimizer for hidden layers"); embeddings and the head are not "hidden" matrices, so they keep
  AdamW. Muon runs with weight decay 0 (the reference recipe); its lr is ``train.muon_lr``.

- ``adamw_reference`` / ``muon_reference``: the same, with the hand-written optimizers of
  :mod:`scratchlm.reference.optim` (same parameter groups, same state keys; slower, equal within rounding).

Schedules are pure functions of the optimizer step (0-based: the lr *used by* step ``s``), so they are
trivially resumable and testable against their closed forms. With ``W = warmup_steps``, ``N = max_steps``:

- warmup (all schedules): ``lr(s) = lr * (s + 1) / W`` for ``s < W``
- ``cosine``:   ``lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``, ``p = (s - W) / (N - W)`` in [0, 1]
- ``wsd``:      warmup-stable-decay (Hu et al. 2024, MiniCPM): ``lr`` until ``D = N - decay_fraction * N``,
  then linear to ``min_lr`` at ``N``: ``lr(s) = lr + (min_lr - lr) * (s - D) / (N - D)``
- ``constant``: ``lr(s) = lr`` after warmup
- ``noam``:     the inverse-square-root schedule of "Attention Is All You Need" (section 5.3),
  ``lr(s) = lr * min(n / W, sqrt(W / n))`` with ``n = s + 1``: linear warmup to ``lr`` at ``n = W``, then
  ``1/sqrt(n)`` decay (``min_lr`` is not used). It is the paper's
  ``factor * d_model**-0.5 * min(n**-0.5, n * W**-1.5)`` with ``lr = factor * (d_model * W)**-0.5``: the
  paper's base model (d_model 512, W 4000, factor 1) is ``train.lr=7e-4`` (:func:`noam_peak_lr`).

Each param group remembers its peak lr (``peak_lr``); :func:`set_lr` scales every group by
``lr(s) / train.lr`` so AdamW and Muon groups follow the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from scratchlm.config import TrainConfig
from scratchlm.errors import CheckpointError, ConfigError


def lr_at(step: int, cfg: TrainConfig, elapsed: float | None = None) -> float:
    """Learning rate (AdamW scale) used by optimizer step ``step`` (0-based) under ``cfg.schedule``.

    With ``schedule_clock=time`` the post-warmup progress is ``elapsed / max_time`` instead of
    ``step / max_steps`` (the virtual step ``W + (N - W) * elapsed / max_time``), so a fixed time budget
    always ends at ``min_lr`` whatever the machine's speed. That mode depends on wall time, so it is not
    bit-exactly resumable.
    """
    if cfg.schedule_clock == "time" and step >= cfg.warmup_steps and cfg.max_time:
        frac = min(1.0, (elapsed or 0.0) / cfg.max_time)
        step = cfg.warmup_steps + (cfg.max_steps - cfg.warmup_steps) * frac
    return schedule_lr(
        step,
        schedule=cfg.schedule,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_steps,
        decay_fraction=cfg.decay_fraction,
    )


def schedule_lr(
    step: int,
    *,
    schedule: str,
    lr: float,
    min_lr: float,
    max_steps: int,
    warmup_steps: int,
    decay_fraction: float = 0.2,
) -> float:
    """The closed forms in the module docstring. ``step`` beyond ``max_steps`` stays at the final value."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        p = min(1.0, (step - warmup_steps) / span)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - int(round(decay_fraction * max_steps)))
        if step < decay_start:
            return lr
        p = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return lr + (min_lr - lr) * p
    if schedule == "noam":
        return lr * math.sqrt(warmup_steps / (step + 1))
    raise ConfigError(f"train.schedule={schedule!r} is not one of cosine, wsd, constant, noam")


def noam_peak_lr(d_model: int, warmup_steps: int, factor: float = 1.0) -> float:
    """The peak ``train.lr`` that makes ``schedule=noam`` the paper's ``factor * d_model**-0.5 * min(...)``."""
    return factor / math.sqrt(d_model * warmup_steps)


def set_lr(
    optimizers: list[torch.optim.Optimizer], step: int, cfg: TrainConfig, elapsed: float | None = None
) -> float:
    """Set every param group's lr for ``step`` (and ``elapsed`` seconds, time clock); returns the AdamW lr."""
    lr = lr_at(step, cfg, elapsed)
    scale = lr / cfg.lr
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * scale
    return lr


def _is_hidden_matrix(name: str, p: nn.Parameter, embedding_ids: set[int]) -> bool:
    """A 2-D weight that is not an embedding table nor the output head (those share storage when tied)."""
    if p.ndim != 2 or id(p) in embedding_ids:
        return False
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "weight" and not any(k in name for k in ("lm_head", "wte", "wpe", "embed", "head."))


def param_groups(model: nn.Module, optimizer: str) -> dict[str, list[nn.Parameter]]:
    """Split trainable parameters into ``muon`` (hidden matrices, only for ``muon``), ``decay`` and ``no_decay``.

    Embeddings are found structurally (``nn.Embedding`` modules) and by name (``wte``/``wpe``/``embed``/
    ``lm_head``) so that a tied output head is treated like the embedding it shares storage with.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if optimizer in ("muon", "muon_reference") and _is_hidden_matrix(name, p, embedding_ids):
            groups["muon"].append(p)
        elif p.ndim >= 2:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    return groups


def _construct(cls: type[torch.optim.Optimizer], groups: list[dict], **kwargs: Any) -> torch.optim.Optimizer:
    return cls(groups, **kwargs)


def build_optimizers(model: nn.Module, cfg: TrainConfig, make: Callable = _construct) -> list[Any]:
    """AdamW, or [Muon, AdamW] for ``optimizer=muon``. Every group carries ``peak_lr`` for :func:`set_lr`.

    ``make(cls, param_groups, **kwargs)`` builds each optimizer (default ``cls(param_groups, **kwargs)``);
    ZeRO-1 passes one that wraps it in a ZeroRedundancyOptimizer (``train/distributed.py``).
    """
    kind = cfg.optimizer.removesuffix("_reference")
    if kind not in ("adamw", "muon"):
        raise ConfigError(
            f"train.optimizer={cfg.optimizer!r} is not one of adamw, muon, adamw_reference, muon_reference"
        )
    adamw_cls, muon_cls = torch.optim.AdamW, torch.optim.Muon
    if kind != cfg.optimizer:
        from scratchlm.reference import optim as reference

        adamw_cls, muon_cls = reference.AdamW, reference.Muon
    groups = param_groups(model, kind)
    device = next(model.parameters()).device
    # fused AdamW: one kernel for all tensors (CUDA, and CPU since torch 2.4); foreach as the fallback
    fused = device.type in ("cuda", "cpu") and all(p.dtype.is_floating_point for p in model.parameters())
    adam_groups = [
        {"params": groups["decay"], "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
        {"params": groups["no_decay"], "weight_decay": 0.0, "peak_lr": cfg.lr},
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if adamw_cls is torch.optim.AdamW:
        kwargs["fused" if fused else "foreach"] = True
    adamw = make(adamw_cls, adam_groups, **kwargs)
    if kind == "adamw":
        return [adamw]
    if not groups["muon"]:
        raise ConfigError("train.optimizer=muon but the model has no hidden 2-D weight matrices; use adamw")
    muon_kwargs = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=0.0)
    if device.type == "cpu" and muon_cls is torch.optim.Muon:
        # torch.optim.Muon always orthogonalises in bf16, which CPUs without bf16 matrix units run ~25x
        # slower than float32 (a 4-layer model's step went from 0.1 s to 1.2 s): on CPU the same update
        # comes from the written-out Muon with a float32 Newton-Schulz step (same state keys, so a
        # checkpoint moves between devices)
        from scratchlm.reference import optim as reference

        muon_cls, muon_kwargs["ns_dtype"] = reference.Muon, torch.float32
    muon = make(muon_cls, [{"params": groups["muon"], "peak_lr": cfg.muon_lr}], **muon_kwargs)
    return [muon, adamw]


def optimizer_state(optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """State dicts of all optimizers (tensors + plain Python: loadable with ``torch.load(weights_only=True)``)."""
    return [opt.state_dict() for opt in optimizers]


def load_optimizer_state(
    optimizers: list[torch.optim.Optimizer], states: list[dict], load: Callable | None = None
) -> None:
    """Load the state dicts of :func:`optimizer_state`; ``load(opt, sd)`` defaults to ``opt.load_state_dict``."""
    if len(states) != len(optimizers):
        raise CheckpointError(
            f"checkpoint holds {len(states)} optimizer state(s) but train.optimizer builds "
            f"{len(optimizers)}; resume with the same train.optimizer"
        )
    for opt, sd in zip(optimizers, states):
        opt.load_state_dict(sd) if load is None else load(opt, sd)
