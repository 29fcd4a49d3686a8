"""``scratchlm explain RUN_DIR``: one real forward pass, with shapes and the values the model computes."""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="walk through a forward pass: shapes, values, attention scores/mask/weights, plots",
        description="Run the model of RUN_DIR on a text and print every module it passes through (shapes, "
        "parameters), then the values it computes, read with forward hooks: tokens and ids, embedding rows, "
        "the positional encoding, per attention module and head the scaled scores before the mask, the mask "
        "and the softmax after it, MLP activations and the top next tokens. Writes positions.png, "
        "attention.png and one attention_<module>.png per attention module. Seq2seq runs show encoder "
        "self-attention, decoder self-attention and cross-attention.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `scratchlm train`")
    p.add_argument(
        "--text", default="def add(a, b):\n    return a + b\n", help="the input (seq2seq: source) text"
    )
    p.add_argument(
        "--target", help="seq2seq: the target text fed to the decoder (default: its greedy output)"
    )
    p.add_argument("--untrained", action="store_true", help="fresh weights (train.seed), not the checkpoint")
    p.add_argument("--layer", type=int, default=-1, help="layer of the attention.png overview (-1 = last)")
    p.add_argument("--cols", type=int, default=8, help="values printed per row (default 8)")
    p.add_argument("--heads", type=int, default=2, help="heads printed per attention module (default 2)")
    p.add_argument("--top", type=int, default=5, help="most likely next tokens printed (default 5)")
    p.add_argument("--out", help="directory for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--no-plots", action="store_true", help="print only")
    p.set_defaults(func=run_explain)


def _load(args: argparse.Namespace):
    """(model, tokenizer, config): the run's checkpoint, or fresh weights with --untrained."""
    if not args.untrained:
        from scratchlm.api import load

        lm = load(args.run_dir, device="cpu")
        return lm.model, lm.tokenizer, lm.config
    import torch

    from scratchlm.config import load_run_config
    from scratchlm.model import build_model
    from scratchlm.model.size import check_model_fits
    from scratchlm.tokenizer import load_tokenizer

    cfg = load_run_config(Path(args.run_dir))
    check_model_fits(cfg.model, f"{args.run_dir}/config.yaml")
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model).eval(), load_tokenizer(Path(args.run_dir) / "tokenizer.json"), cfg


def run_explain(args: argparse.Namespace) -> int:
    import torch

    from scratchlm.viz.explain import format_trace, show_token, trace_forward
    from scratchlm.viz.walkthrough import format_walkthrough, walkthrough

    if args.cols < 1 or args.heads < 0 or args.top < 0:
        raise ConfigError("--cols must be >= 1, --heads and --top >= 0")
    model, tok, cfg = _load(args)
    m = cfg.model
    ids = tok.encode(args.text)
    if not ids:
        raise ConfigError("--text is empty; give some text to run through the model")
    seq2seq = m.arch == "seq2seq"
    if seq2seq:
        ids = (ids + [tok.eot_id])[: m.context_length]  # the source as the parallel-data loader makes it
        bos = tok.special_tokens.get("<|bos|>")
        if bos is None:
            raise ConfigError("the run's tokenizer lacks <|bos|>; explain needs a seq2seq-trained tokenizer")
        src = torch.tensor([ids])
        if args.target is not None:
            out_ids = tok.encode(args.target)
        else:
            out_ids = model.greedy_decode(src, None, bos, tok.eot_id, max_len=min(16, m.context_length - 1))[
                0
            ].tolist()
        tgt_ids = ([bos] + out_ids)[: m.context_length]
        tgt = torch.tensor([tgt_ids])
    else:
        ids = ids[: m.context_length]
        src, tgt, tgt_ids = torch.tensor([ids]), None, None
    tokens = [tok.decode([i]) for i in ids]
    target_tokens = [tok.decode([i]) for i in tgt_ids] if tgt_ids else None
    print(f"input: {len(ids)} tokens")
    for i, t in zip(ids, tokens):
        print(f"  {i:>6}  {show_token(t)}")
    if target_tokens:
        print(f"decoder input (target, after <|bos|>): {[show_token(t) for t in target_tokens]}")
    if not seq2seq:
        print(f"\nidx shape (B, T) = {tuple(src.shape)}\n")
        print(format_walkthrough(walkthrough(model, src)))
    trace = trace_forward(model, src, tgt)
    k = min(args.top, trace.next_probs.numel())
    p, i = trace.next_probs.topk(k)
    top = [(tok.decode([int(j)]), float(q)) for q, j in zip(p, i)]
    print(format_trace(trace, tokens, target_tokens, top, cols=args.cols, heads=args.heads))
    if args.no_plots:
        return 0
    from scratchlm.viz.plots import plot_attention, plot_attention_steps, plot_model_positions

    n_layer = m.n_layer if not seq2seq else len(trace.attention)
    if not -n_layer <= args.layer < n_layer:
        raise ConfigError(f"--layer {args.layer} is out of range for a model with {n_layer} layers")
    out = Path(args.out or Path(args.run_dir) / "plots")
    written = []
    pos_png = plot_model_positions(model, min(m.context_length, 128), out / "positions.png")
    if pos_png is None:
        print(f"\nmodel.pos={m.pos}: no positional encoding to plot")
    else:
        written.append(pos_png)
    if not seq2seq:
        maps = [a.probs for a in trace.attention]
        written.append(plot_attention(maps, tokens, out / "attention.png", args.layer))
    for a in trace.attention:
        queries = target_tokens if seq2seq and a.name.startswith("decoder") else tokens
        keys = (
            target_tokens if seq2seq and a.name.endswith(".attn") and a.name.startswith("decoder") else tokens
        )
        png = out / f"attention_{a.name.replace('.', '_')}.png"
        written.append(plot_attention_steps(a.name, a.scores, a.mask, a.probs, queries, keys, png))
    print("\nwrote " + ", ".join(str(w) for w in written))
    return 0
