"""A walkthrough of one real forward pass: every module the input flows through, with its tensor shapes.

Forward hooks record, for each leaf-level step (embedding, norm, attention, MLP, head), the shape and dtype
of what goes in and what comes out, plus the module's parameter count, in call order. Nothing in the model
is changed; the hooks are removed afterwards.

    steps = walkthrough(model, idx)          # idx (B, T) long
    print(format_walkthrough(steps))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Step:
    """One module call: its qualified name, class, input/output shapes and own parameter count."""

    name: str
    kind: str
    inputs: list[tuple[int, ...]]
    output: tuple[int, ...]
    params: int
    tied_to: str = ""  # the module that owns this one's weight when it is shared (lm_head tied to wte)


def _shape(x) -> tuple[int, ...] | None:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, tuple | list) and x and isinstance(x[0], torch.Tensor):
        return tuple(x[0].shape)
    return None


# containers whose calls only repeat their children's: skipped to keep the table readable
_SKIP = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Dropout, nn.Identity)


@torch.no_grad()
def walkthrough(model: nn.Module, idx: torch.Tensor) -> list[Step]:
    """Run ``model(idx)`` once and return the module calls in order, with shapes (B, T, ...)."""
    steps: list[Step] = []
    handles = []
    owner: dict[int, str] = {}  # parameter id -> the module that used it first: a tied parameter (wte =
    # lm_head) is counted at its first use only, and the later module says "(tied to wte)"

    def hook(name: str):
        def record(module, args, output):
            shapes = [s for s in (_shape(a) for a in args) if s is not None]
            out = _shape(output)
            params = list(module.parameters(recurse=False))
            own = sum(p.numel() for p in params if id(p) not in owner)
            tied = sorted({owner[id(p)] for p in params if id(p) in owner})
            for p in params:
                owner.setdefault(id(p), name or "model")
            steps.append(
                Step(name or "model", type(module).__name__, shapes, out or (), own, ", ".join(tied))
            )

        return record

    for name, module in model.named_modules():
        if not isinstance(module, _SKIP):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()
        model(idx)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return steps


def format_walkthrough(steps: list[Step], vocab: dict[str, int] | None = None) -> str:
    """A fixed-width table of the steps: name, class, input shape -> output shape, parameters."""
    lines = [f"{'module':<28} {'kind':<20} {'in':<18} {'out':<18} {'params':>10}"]
    for s in steps:
        shape_in = "x".join(map(str, s.inputs[0])) if s.inputs else "-"
        shape_out = "x".join(map(str, s.output)) if s.output else "-"
        tied = f"  (tied to {s.tied_to})" if s.tied_to else ""
        lines.append(f"{s.name:<28} {s.kind:<20} {shape_in:<18} {shape_out:<18} {s.params:>10,}{tied}")
    total = sum(s.params for s in steps)
    lines.append(f"{'':<28} {'':<20} {'':<18} {'total':<18} {total:>10,}")
    return "\n".join(lines)
