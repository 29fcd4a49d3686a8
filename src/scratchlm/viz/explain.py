"""``scratchlm explain`` with values: what one real forward pass computes, read from the model itself.

Forward hooks on the model's own modules record, for one input: the token embeddings (the rows of the
embedding table that the ids pick), the positional encoding added to them, for every attention module and
head the scaled scores Q K^T / sqrt(D) before the mask, the mask, and the softmax after it (recorded by the
attention's explicit computation, ``Attention.record``), the MLP activations (the input of each
``mlp.c_proj``), and the next-token probabilities. Nothing is re-implemented; the hooks are removed and the
attention modules restored afterwards.

    trace = trace_forward(model, idx)                 # GPT: idx (1, T)
    trace = trace_forward(model, src, tgt_in)         # Seq2Seq: encoder self-, decoder self-, cross-attention
    print(format_trace(trace, tokens))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from scratchlm.model.layers import Attention


@dataclass
class AttentionTrace:
    """One attention module on one input: scores (H, T, S) before the mask, mask (T, S) bool or None
    (True = may attend), probs (H, T, S) = softmax over the allowed keys."""

    name: str
    scores: torch.Tensor
    mask: torch.Tensor | None
    probs: torch.Tensor


@dataclass
class Trace:
    """Intermediates of one forward pass (batch row 0), in call order within each list."""

    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (T, C)
    positions: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> (T, C) added PE
    attention: list[AttentionTrace] = field(default_factory=list)
    mlp: dict[str, torch.Tensor] = field(default_factory=dict)  # MLP name -> activations (T, F)
    next_probs: torch.Tensor | None = None  # (V,) softmax of the last position's logits


def _mask_2d(mask: torch.Tensor | None, T: int, S: int) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.reshape(-1, *mask.shape[-2:])[0].expand(T, S).clone()  # (B|1, 1, T|1, S) -> (T, S)


@torch.no_grad()
def trace_forward(model: nn.Module, idx: torch.Tensor, tgt_in: torch.Tensor | None = None) -> Trace:
    """Run ``model(idx)`` (GPT) or ``model(idx, tgt_in)`` (Seq2Seq) once, in eval mode, and record."""
    trace = Trace()
    handles = []
    attention = {name: m for name, m in model.named_modules() if isinstance(m, Attention)}

    def record_output(store: dict, name: str):
        def hook(module, args, output):
            key = name if name not in store else f"{name}#{sum(k.startswith(name) for k in store)}"
            store[key] = output[0].detach().float().clone()

        return hook

    def record_attention(name: str):
        def hook(module, args, output):
            r = module.record
            probs = r["probs"][0].float().clone()
            H, T, S = probs.shape
            trace.attention.append(
                AttentionTrace(name, r["scores"][0].clone(), _mask_2d(r["mask"], T, S), probs)
            )

        return hook

    def record_activation(name: str):
        def hook(module, args):
            trace.mlp[name] = args[0][0].detach().float().clone()

        return hook

    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Embedding) and leaf in ("wte", "src_emb", "tgt_emb"):
            handles.append(m.register_forward_hook(record_output(trace.embeddings, name)))
        elif leaf in ("wpe", "sinusoid", "pos", "src_pos", "tgt_pos"):
            handles.append(m.register_forward_hook(record_output(trace.positions, name)))
        elif leaf == "c_proj" and name.endswith("mlp.c_proj"):
            handles.append(m.register_forward_pre_hook(record_activation(name.removesuffix(".c_proj"))))
    for name, m in attention.items():
        m.record = {}
        handles.append(m.register_forward_hook(record_attention(name)))
    was_training = model.training
    model.eval()
    try:
        logits = model(idx)[0] if tgt_in is None else model(idx, tgt_in)[0]
        trace.next_probs = torch.softmax(logits[0, -1].float(), dim=-1)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for m in attention.values():
            m.record = None
    return trace


def show_token(token: str) -> str:
    """A token as a readable label: spaces as a middle dot, newlines and tabs escaped."""
    return token.replace(" ", "\u00b7").replace("\n", "\\n").replace("\t", "\\t") or "''"


def _rows(values: torch.Tensor, labels: list[str], cols: int) -> list[str]:
    """One line per token: its label and the first ``cols`` values, 4 decimals."""
    width = max(len(lab) for lab in labels)
    return [
        f"  {lab:>{width}} ["
        + " ".join(f"{v:+.4f}" for v in row[:cols].tolist())
        + (" ...]" if row.numel() > cols else "]")
        for lab, row in zip(labels, values)
    ]


def format_trace(
    trace: Trace,
    tokens: list[str],
    target_tokens: list[str] | None = None,
    top: list[tuple[str, float]] | None = None,
    cols: int = 8,
    heads: int = 2,
) -> str:
    """The recorded values as text: first ``cols`` features per token, ``heads`` heads per attention."""
    src = [show_token(t) for t in tokens]
    tgt = [show_token(t) for t in target_tokens] if target_tokens else src
    out = []

    def labels_for(
        name: str, n: int
    ) -> list[str]:  # decoder side: decoder.*, tgt_*, a shared table's 2nd call
        return (tgt if name.startswith(("decoder", "tgt")) or name.endswith("#1") else src)[:n]

    for name, emb in trace.embeddings.items():
        out.append(f"\nembedding rows {name}.weight[ids]  ({tuple(emb.shape)}, first {cols} features)")
        out += _rows(emb, labels_for(name, emb.shape[0]), cols)
    for name, pe in trace.positions.items():
        out.append(f"\npositional encoding added ({name}, {tuple(pe.shape)}, first {cols} features)")
        out += _rows(pe, [f"pos {i}" for i in range(pe.shape[0])], cols)
    for a in trace.attention:
        H, T, S = a.probs.shape
        q_labels = labels_for(a.name, T)
        for h in range(min(heads, H)):
            out.append(f"\n{a.name} head {h}: scores Q.K^T/sqrt(D) before the mask  ({T} queries x {S} keys)")
            out += _rows(a.scores[h], q_labels, cols)
            out.append(f"{a.name} head {h}: softmax after the mask (each row sums to 1)")
            out += _rows(a.probs[h], q_labels, cols)
        if a.mask is not None:
            out.append(f"{a.name}: mask (1 = may attend)")
            out += _rows(a.mask.float(), q_labels, cols)
    for name, act in trace.mlp.items():
        out.append(f"\n{name} activations  ({tuple(act.shape)}, first {cols} of {act.shape[1]} features)")
        out += _rows(act, tgt[: act.shape[0]], cols)
    if top:
        out.append("\nnext token after the input:")
        out += [f"  {p:7.2%}  {show_token(t)!s}" for t, p in top]
    return "\n".join(out)
