"""Seq2seq training speed: batches of rows vs batches of tokens, and the pair collate, on Multi30k.

    python benchmarks/translation_speed.py                 # CPU, configs/multi30k-transformer.yaml's model
    python benchmarks/translation_speed.py --device cuda   # the same on a GPU

Peers, in the same process and alternating round by round (the machine's load drifts):

- ``rows``: the previous data path, ``train.batch_size=128`` rows per batch (length-bucketed), with the
  previous per-row tensor collate (reproduced here as :func:`collate_rows_reference`);
- ``tokens``: ``data.batch_tokens`` padded source + target tokens per batch, length-sorted, shapes rounded to
  multiples of 8, the vectorised collate.

Reported: target tokens per second of whole training steps (data + forward + backward + AdamW), seconds per
step, padding fraction, and the collate's milliseconds per batch. Writes
``benchmarks/results/translation_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from scratchlm.config import load_config
from scratchlm.data.pairs import PairLoader, load_pairs
from scratchlm.device import resolve_dtype
from scratchlm.model import build_model
from scratchlm.train.optim import build_optimizers
from scratchlm.train.trainer import train_step

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def collate_rows_reference(loader: PairLoader, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """The collate before this change: one small tensor write per row and field."""
    s, t = loader.src_special, loader.tgt_special
    S = max(len(loader.src[i]) for i in idx) + 1
    T = max(len(loader.tgt[i]) for i in idx) + 1
    src = torch.full((len(idx), S), s["pad"], dtype=torch.long)
    tgt_in = torch.full((len(idx), T), t["pad"], dtype=torch.long)
    targets = torch.full((len(idx), T), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        a, b = torch.from_numpy(loader.src[i]), torch.from_numpy(loader.tgt[i])
        src[row, : len(a)] = a
        src[row, len(a)] = s["eos"]
        tgt_in[row, 0] = t["bos"]
        tgt_in[row, 1 : len(b) + 1] = b
        targets[row, : len(b)] = b
        targets[row, len(b)] = t["eos"]
    src_lens = torch.tensor([len(loader.src[i]) + 1 for i in idx])
    src_mask = torch.arange(S)[None, :] < src_lens[:, None]
    return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in, "targets": targets}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-tokens", type=int, default=12000)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi30k"))
    args = p.parse_args()
    from scratchlm.pipeline import _seq2seq_tokenizer

    cfg = load_config(REPO / "configs" / "multi30k-transformer.yaml", [f"data.source={args.data}/train"])
    tok = _seq2seq_tokenizer(cfg, progress=False)
    pairs = load_pairs(f"{args.data}/train", "de", "en")
    device = torch.device(args.device)
    dtype = resolve_dtype("auto" if device.type == "cuda" else "float32", device)
    cfg.model.vocab_size = tok.vocab_size
    loaders = {
        "rows": PairLoader(pairs, tok, 128, max_len=63, seed=0, device=device),
        "tokens": PairLoader(
            pairs, tok, 128, max_len=63, seed=0, device=device, batch_tokens=args.batch_tokens
        ),
    }
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opts = build_optimizers(model, cfg.train)
    stats = {k: {"tokens": 0, "seconds": 0.0, "steps": 0, "pad": [], "collate_ms": []} for k in loaders}

    def step(name: str) -> None:
        ld = loaders[name]
        plan = ld._batches(ld.epoch)
        idx = plan[ld.index % len(plan)]
        c0 = time.perf_counter()
        if name == "rows":
            batch = {k: v.to(device) for k, v in collate_rows_reference(ld, idx).items()}
            ld.index += 1
        else:
            batch = ld.next_batch()
        c1 = time.perf_counter()
        train_step(model, model, opts, [batch], grad_clip=1.0, device=device, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = stats[name]
        s["seconds"] += time.perf_counter() - c0
        s["collate_ms"].append(1000 * (c1 - c0))
        s["tokens"] += int((batch["targets"] != -100).sum())
        s["steps"] += 1
        real = int(batch["src_mask"].sum()) + int((batch["targets"] != -100).sum())
        s["pad"].append(1 - real / (batch["src"].numel() + batch["targets"].numel()))

    for name in loaders:  # warm-up
        step(name)
    for s in stats.values():
        s.update(tokens=0, seconds=0.0, steps=0, pad=[], collate_ms=[])
    for r in range(args.rounds):
        for name in loaders if r % 2 == 0 else reversed(list(loaders)):
            for _ in range(args.steps):
                step(name)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v['tokens'] / v['seconds']:,.0f} tok/s" for k, v in stats.items()),
            flush=True,
        )
    rows = {
        k: {
            "target_tokens_per_s": v["tokens"] / v["seconds"],
            "seconds_per_step": v["seconds"] / v["steps"],
            "target_tokens_per_step": v["tokens"] / v["steps"],
            "padding_fraction": statistics.mean(v["pad"]),
            "collate_ms_median": statistics.median(v["collate_ms"]),
        }
        for k, v in stats.items()
    }
    ratio = rows["tokens"]["target_tokens_per_s"] / rows["rows"]["target_tokens_per_s"]
    out = {
        "machine": {
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "cores": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
            "dtype": str(dtype),
        },
        "model": "configs/multi30k-transformer.yaml (3+3 layers, d_model 256)",
        "command": "python benchmarks/translation_speed.py "
        + (f"--device {args.device}" if args.device != "cpu" else ""),
        "results": rows,
        "speedup_tokens_vs_rows": ratio,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else "_" + device.type
    (RESULTS / f"translation_speed{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        "# Seq2seq training speed: batches of rows vs batches of tokens (Multi30k De->En)",
        "",
        f"`{out['command'].strip()}` on {out['machine']['device']} ({out['machine']['cores']} cores, load average "
        f"{out['machine']['load_average']}), {dtype}, {args.rounds} alternating rounds of {args.steps} steps.",
        "",
        "| batches | target tokens/s | s/step | target tokens/step | padding | collate ms/batch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k, v in rows.items():
        label = (
            "128 rows, per-row collate (before)"
            if k == "rows"
            else f"{args.batch_tokens} tokens, vectorised collate"
        )
        md.append(
            f"| {label} | {v['target_tokens_per_s']:,.0f} | {v['seconds_per_step']:.3f} | "
            f"{v['target_tokens_per_step']:,.0f} | {100 * v['padding_fraction']:.1f}% | {v['collate_ms_median']:.2f} |"
        )
    md += ["", f"Speed-up of token batches: {ratio:.2f}x target tokens/s.", ""]
    (RESULTS / f"translation_speed{suffix}.md").write_text("\n".join(md))
    if os.environ.get("OUT"):  # a device run: the results come back from $OUT
        out_dir = Path(os.environ["OUT"])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"translation_speed{suffix}.json").write_text(json.dumps(out, indent=1) + "\n")
        (out_dir / f"translation_speed{suffix}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
