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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def attention_maps(model: torch.nn.Module, idx: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities of every layer for idx (1, T): a list of (H, T, T) tensors.

    Switches each attention module to the ``manual`` backend for the pass (so the probabilities exist),
    then restores its backend.
    """
    from scratchlm.model.layers import Attention

    modules = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [(m.backend, m.store_attn) for m in modules]
    for m in modules:
        m.backend, m.store_attn = "manual", True
    try:
        model.eval()
        model(idx)
        return [m.last_attn[0].float().cpu() for m in modules]
    finally:
        for m, (backend, store) in zip(modules, saved):
            m.backend, m.store_attn, m.last_attn = backend, store, None


def plot_attention(maps: list[torch.Tensor], tokens: list[str], out: str | Path, layer: int = -1) -> Path:
    """Heatmaps of one layer's heads (H, T, T), labelled with the tokens."""
    plt = _pyplot()
    probs = maps[layer]
    H, T = probs.shape[0], probs.shape[-1]
    cols = min(H, 4)
    rows = (H + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.2 * rows + 0.5), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        if T <= 24:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels, fontsize=6)
        else:
            ax.set(xticks=[], yticks=[])
    layer_no = layer if layer >= 0 else len(maps) + layer
    fig.suptitle(f"attention probabilities, layer {layer_no} (rows: queries, columns: keys)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
