"""``scratchlm plot RUN_DIR``: loss, perplexity, learning-rate and throughput curves of a run as PNG files."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="write loss / perplexity / lr / throughput plots of a run (RUN_DIR/plots/*.png)",
        description="Read RUN_DIR/metrics.jsonl and write RUN_DIR/plots/{loss,perplexity,lr,throughput}.png.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    from scratchlm.train.metrics import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
