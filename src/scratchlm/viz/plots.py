"""Plots that explain the model: positional encodings, masks and attention maps (PNG, needs matplotlib).

- ``plot_positions``: the sinusoidal table PE[pos, i] of "Attention Is All You Need" as a heatmap, and the
  RoPE rotation angle pos * theta^(-2i/D) of each feature pair, which shows why low pairs spin fast (local
  position) and high pairs slowly (long range).
- ``plot_attention``: per-head attention probabilities softmax(QK^T/sqrt(D) + M) of one layer on a real
  text, recorded by the ``manual`` attention backend; the causal mask shows as the empty upper triangle.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm import fileio
from scratchlm.errors import ScratchLMError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ScratchLMError("plots need matplotlib: pip install 'scratchlm[viz]'") from None
    return plt


def plot_positions(d_model: int, n_pos: int, out: str | Path, theta: float = 10000.0) -> Path:
    """Write a two-panel PNG: the sinusoidal table (n_pos, d_model) and RoPE angles (n_pos, d_model/2)."""
    from scratchlm.model.layers import sinusoidal_table

    plt = _pyplot()
    table = sinusoidal_table(n_pos, d_model)
    inv_freq = theta ** (-torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    angles = torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq  # (n_pos, d_model/2)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = a.imshow(table.numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
    a.set(title="sinusoidal PE[pos, i]", xlabel="feature i", ylabel="position")
    fig.colorbar(im, ax=a)
    im = b.imshow(torch.sin(angles).numpy(), aspect="auto", cmap="RdBu", interpolation="nearest")
    b.set(title="RoPE: sin(pos * theta^(-2i/D)) per feature pair", xlabel="pair i", ylabel="position")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix[1:] or "png")
    plt.close(fig)
    return out


@torch.no_grad()
def attention_maps(model: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every layer for idx (1, T): a list of (H, T, T) tensors (recorded by the
    model's attention modules, see ``Attention.record``; the modules are restored afterwards)."""
    from scratchlm.viz.explain import trace_forward

    return [a.probs for a in trace_forward(model, idx).attention]


def _token_ticks(ax, labels_y: list[str], labels_x: list[str]) -> None:
    """Token labels on both axes, small enough to stay readable (none beyond 48 tokens)."""
    size = 8 if max(len(labels_x), len(labels_y)) <= 16 else 6
    if len(labels_x) <= 48:
        ax.set_xticks(range(len(labels_x)), labels_x, rotation=90, fontsize=size, fontfamily="monospace")
    if len(labels_y) <= 48:
        ax.set_yticks(range(len(labels_y)), labels_y, fontsize=size, fontfamily="monospace")


def plot_attention(maps: list[torch.Tensor], tokens: list[str], out: str | Path, layer: int = -1) -> Path:
    """Heatmaps of one layer's heads (H, T, T), labelled with the tokens, one colorbar per head."""
    from scratchlm.viz.explain import show_token

    plt = _pyplot()
    probs = maps[layer]
    H = probs.shape[0]
    cols = min(H, 4)
    rows = (H + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.8 * rows + 0.8), squeeze=False)
    labels = [show_token(t) for t in tokens]
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        _token_ticks(ax, labels, labels)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="probability")
    layer_no = layer if layer >= 0 else len(maps) + layer
    fig.suptitle(f"attention probabilities, layer {layer_no} (rows: queries, columns: keys)")
    fig.tight_layout()
    return _save(fig, out)


def plot_attention_steps(
    name: str,
    scores: torch.Tensor,
    mask: torch.Tensor | None,
    probs: torch.Tensor,
    query_tokens: list[str],
    key_tokens: list[str],
    out: str | Path,
) -> Path:
    """One attention module, a row per head: scores Q.K^T/sqrt(D) before the mask | mask | softmax after.

    scores, probs (H, T, S); mask (T, S) bool (True = may attend) or None (every key allowed).
    """
    from scratchlm.viz.explain import show_token

    plt = _pyplot()
    H, T, S = probs.shape
    qs, ks = [show_token(t) for t in query_tokens], [show_token(t) for t in key_tokens]
    cell = 0.22 if max(T, S) > 12 else 0.3
    w, h = max(3.2, cell * S + 1.6), max(2.6, cell * T + 1.2)
    fig, axes = plt.subplots(H, 3, figsize=(3 * w + 0.5, H * h + 0.8), squeeze=False)
    allowed = torch.ones(T, S, dtype=torch.bool) if mask is None else mask
    for i in range(H):
        panels = [
            (scores[i], "RdBu_r", f"head {i}: Q.K^T / sqrt(D)", "score", None),
            (allowed.float(), "Greys", "mask (1 = may attend)", "allowed", (0, 1)),
            (probs[i], "viridis", "softmax after the mask", "probability", (0, 1)),
        ]
        for ax, (values, cmap, title, unit, lim) in zip(axes[i], panels):
            if lim is None:
                lim = (-float(values.abs().max()), float(values.abs().max()))
            im = ax.imshow(values.numpy(), cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
            _token_ticks(ax, qs, ks)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=unit)
    fig.suptitle(f"{name}: scores, mask and attention weights per head")
    fig.tight_layout()
    return _save(fig, out)


def plot_model_positions(model: torch.nn.Module, n_pos: int, out: str | Path) -> Path | None:
    """The model's own positional encoding, read from it: learned tables (wpe, or src_pos and tgt_pos)
    plotted from the weights, the sinusoidal table it adds, or its RoPE angles; None for pos=none."""
    plt = _pyplot()
    panels = []
    for name in ("wpe", "src_pos", "tgt_pos"):
        table = getattr(model, name, None)
        if isinstance(table, torch.nn.Embedding):
            panels.append(
                (table.weight[:n_pos].detach().float(), f"learned {name}.weight[pos, i]", "feature i")
            )
    sinusoid = getattr(model, "sinusoid", None) or getattr(model, "pos", None)
    if sinusoid is not None and hasattr(sinusoid, "table"):
        table = sinusoid(torch.arange(n_pos)[None])[0]
        panels.append((table.float(), "sinusoidal PE[pos, i] (fixed)", "feature i"))
    rope = getattr(model, "rope", None)
    if rope is not None:
        angles = torch.arange(n_pos, dtype=torch.float32)[:, None] * rope.inv_freq.float().cpu()
        panels.append((torch.sin(angles), "RoPE sin(pos * theta^(-2i/D)) per plane", "plane i"))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (values, title, xlabel) in zip(axes[0], panels):
        lim = float(values.abs().max()) or 1.0
        im = ax.imshow(
            values.cpu().numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest"
        )
        ax.set(title=title, xlabel=xlabel, ylabel="position")
        fig.colorbar(im, ax=ax, label="value")
    fig.suptitle(f"positional encoding of this model (first {n_pos} positions)")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    plt = _pyplot()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix[1:] or "png")
    plt.close(fig)
    return out
