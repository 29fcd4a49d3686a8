"""``scratchlm explain RUN_DIR``: a walkthrough of a real forward pass, and plots of positions and attention."""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="walk through a forward pass with shapes; plot positional encodings and attention",
        description="Run the model of RUN_DIR on a text, print every module it passes through with tensor "
        "shapes and parameter counts, and write positions.png and attention.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `scratchlm train`")
    p.add_argument("--text", default="def add(a, b):\n    return a + b\n", help="the input text")
    p.add_argument("--layer", type=int, default=-1, help="layer whose attention is plotted (-1 = last)")
    p.add_argument("--out", help="directory for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--no-plots", action="store_true", help="print the walkthrough only")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    import torch

    from scratchlm.api import load
    from scratchlm.viz.walkthrough import format_walkthrough, walkthrough

    lm = load(args.run_dir, device="cpu")
    if lm.config.model.arch != "gpt":
        raise ConfigError("scratchlm explain walks through decoder models (model.arch=gpt)")
    ids = lm.tokenizer.encode(args.text)[: lm.config.model.context_length]
    if not ids:
        raise ConfigError("--text is empty; give some text to run through the model")
    idx = torch.tensor([ids])
    tokens = [lm.tokenizer.decode([i]) for i in ids]
    print(f"input: {len(ids)} tokens: {tokens}")
    print(f"idx shape (B, T) = {tuple(idx.shape)}\n")
    print(format_walkthrough(walkthrough(lm.model, idx)))
    if args.no_plots:
        return 0
    from scratchlm.viz.plots import attention_maps, plot_attention, plot_positions

    n_layer = lm.config.model.n_layer
    if not -n_layer <= args.layer < n_layer:
        raise ConfigError(f"--layer {args.layer} is out of range for a model with {n_layer} layers")
    out = Path(args.out or Path(args.run_dir) / "plots")
    m = lm.config.model
    pos_png = plot_positions(
        m.d_model // m.n_head if m.pos == "rope" else m.d_model,
        m.context_length,
        out / "positions.png",
        m.rope_theta,
    )
    att_png = plot_attention(attention_maps(lm.model, idx), tokens, out / "attention.png", args.layer)
    print(f"\nwrote {pos_png} and {att_png}")
    return 0
