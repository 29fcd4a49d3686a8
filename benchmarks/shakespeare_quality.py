"""Quality benchmark: validation loss of configs/shakespeare-char.yaml after 137 s of training on this CPU.

    python benchmarks/shakespeare_quality.py                 # ours (137 s) + the nanoGPT recipe (2000 steps)
    python benchmarks/shakespeare_quality.py --skip-peer     # ours only

Peer, in the same run: nanoGPT's CPU recipe for shakespeare_char (4 layers, 4 heads, 128 wide, context 64,
batch 12, lr 1e-3 cosine to 1e-4 over 2000 iterations, warmup 100, beta2 0.99, no dropout, fp32,
learned positions, LayerNorm, GELU) re-created in ScratchLM's trainer; ../shared/data/README.md records
that nanoGPT itself reaches val loss ~1.89 in ~137 s on this kind of machine.

Both runs are scored the same way after training: the mean cross-entropy (nats/char) of the final weights
over *every* window of the validation split (the last 10% of the text), in fp32. Writes
benchmarks/results/shakespeare_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

NANOGPT_RECIPE = [
    "model.n_layer=4",
    "model.n_head=4",
    "model.d_model=128",
    "model.context_length=64",
    "model.pos=learned",
    "model.norm=layernorm",
    "model.mlp=gelu",
    "model.bias=false",
    "model.dropout=0.0",
    "train.batch_size=12",
    "train.max_steps=2000",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.warmup_steps=100",
    "train.beta2=0.99",
    "train.weight_decay=0.1",
    "train.dtype=float32",
    "train.schedule=cosine",
    "train.schedule_clock=steps",
    "train.optimizer=adamw",
    "train.max_time=None",
    "eval.interval=100000",
]


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
    }


@torch.no_grad()
def full_val_loss(run_dir: Path) -> tuple[float, int]:
    """Mean loss of the run's latest weights over every token of its validation split (fp32): one pass of
    sequential windows, then the windows it leaves out (``TokenLoader.remainder_batches``), as
    ``scratchlm eval`` scores it. Returns (loss, tokens scored)."""
    import itertools

    from scratchlm.config import load_run_config
    from scratchlm.data.loader import TokenLoader
    from scratchlm.eval import evaluate_lm
    from scratchlm.model import build_model
    from scratchlm.train.checkpoint import find_checkpoint, load_model_state

    cfg = load_run_config(run_dir)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(find_checkpoint(run_dir, "latest")))
    model.eval()
    T = cfg.model.context_length
    loader = TokenLoader(cfg.data.data_dir, split="val", batch_size=16, context_length=T, mode="sequential")
    one_pass = (loader.next_batch() for _ in range(loader.batches_per_epoch))
    result = evaluate_lm(model, itertools.chain(one_pass, loader.remainder_batches()))
    return result["loss"], int(result["tokens"])


def run(name: str, overrides: list[str], config: Path, workdir: Path) -> dict:
    from scratchlm.config import load_config
    from scratchlm.pipeline import run as run_pipeline

    cfg = load_config(config, overrides + [f"train.run_dir={workdir / name}", "train.progress=false"])
    t0 = time.time()
    result = run_pipeline(cfg, progress=False)
    wall = time.time() - t0
    val, tokens = full_val_loss(Path(result["run_dir"]))
    row = {
        "name": name,
        "val_loss_full": val,
        "val_tokens": tokens,
        "train_time_s": result["wall_time"],
        "total_wall_s": wall,
        "steps": result["step"],
        "tokens_seen": result["tokens"],
        "stopped_reason": result["stopped_reason"],
        "overrides": overrides,
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "shakespeare-char.yaml"))
    p.add_argument("--time", type=float, default=137.0, help="training seconds for our recipe")
    p.add_argument("--skip-peer", action="store_true", help="do not run the nanoGPT recipe")
    p.add_argument("--out", default="shakespeare_quality", help="results file stem")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for our recipe")
    args = p.parse_args(argv)
    os.chdir(REPO)  # data.source in the config is relative to the repository root
    rows = []
    with tempfile.TemporaryDirectory(prefix="scratchlm-quality-") as tmp:
        rows.append(
            run(
                "scratchlm (configs/shakespeare-char.yaml)",
                [f"train.max_time={args.time}"] + args.overrides,
                Path(args.config),
                Path(tmp),
            )
        )
        if not args.skip_peer:
            rows.append(
                run("nanoGPT CPU recipe (same trainer)", NANOGPT_RECIPE, Path(args.config), Path(tmp))
            )
    report = {
        "benchmark": "shakespeare_quality",
        "goal": "val loss <= 1.75 after 137 s",
        "reference": "nanoGPT itself: ~1.89 in ~137 s (../shared/data/README.md)",
        "machine": machine(),
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Tiny Shakespeare (char) quality after {args.time:.0f} s of training",
        "",
        f"Command: `python benchmarks/shakespeare_quality.py{' --skip-peer' if args.skip_peer else ''}`",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
        f"{report['machine']['torch']}, load average {report['machine']['load_avg_1m']:.1f} at the end "
        "(shared machine)",
        "",
        "| run | val loss (full val split) | train time (s) | steps | tokens seen |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['val_loss_full']:.4f} | {r['train_time_s']:.1f} | {r['steps']:,} | "
            f"{r['tokens_seen']:,} |"
        )
    lines += ["", f"Goal: <= 1.75. {report['reference']}."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
