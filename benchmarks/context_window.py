"""What the context policy costs when prompt + max_new_tokens exceed a model's context: stop vs slide.

    python benchmarks/context_window.py RUN_DIR [--windows 64] [--prompt "ROMEO:"]

1. Quality after a slide. When a row's window is full, ``context="slide"`` goes on from its last
   ``context_length // 2`` tokens, so every later token is predicted from between C/2 and C tokens of context.
   The table gives the run's mean validation loss (nats/token) of tokens predicted from k tokens of context,
   by range of k, over ``--windows`` sequential windows of C + 1 tokens: if the loss from C/2..C tokens equals
   the loss from full windows, a slide loses nothing a full window would have had.
2. What each policy returns for ``--prompt`` with ``max_new_tokens = C`` (the README's
   ``scratchlm sample RUN --prompt "def "`` on a context-128 run): new tokens, wall time, window slides.
   ``stop`` ends at the context (fewer tokens than asked for), ``slide`` gives them all.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from scratchlm.api import load
from scratchlm.data.loader import TokenLoader


@torch.no_grad()
def loss_by_context(lm, windows: int) -> list[tuple[str, float, int]]:
    """[(range of k, mean NLL of tokens predicted from k tokens of context, tokens)] on the val split."""
    cfg = lm.config
    C = cfg.model.context_length
    loader = TokenLoader(cfg.data.data_dir, split="val", batch_size=1, context_length=C, mode="sequential")
    n = min(windows, loader.batches_per_epoch)
    nll = torch.zeros(C)
    for _ in range(n):
        x, y = loader.next_batch()
        logits, _ = lm.model(x.to(lm.device))
        nll += F.cross_entropy(logits[0].float(), y[0].to(lm.device), reduction="none").cpu()
    nll /= n  # nll[t]: mean loss of the token predicted from t + 1 tokens of context
    ranges = [(1, C // 8), (C // 8 + 1, C // 2 - 1), (C // 2, C)]
    rows = [(f"{lo}..{hi}", float(nll[lo - 1 : hi].mean()), n * (hi - lo + 1)) for lo, hi in ranges]
    rows.append((f"{C} (a full window)", float(nll[C - 1]), n))
    return rows


def policies(lm, prompt: str, seed: int = 0) -> list[tuple[str, int, float, int]]:
    """[(policy, new tokens, seconds, slides)] for ``prompt`` and max_new_tokens = context_length."""
    C = lm.config.model.context_length
    out = []
    for policy in ("stop", "slide"):
        start = time.perf_counter()
        (r,) = lm.engine.generate([prompt], context=policy, max_new_tokens=C, temperature=0.8, seed=seed,
                                  stop_token_ids=[])  # fmt: skip
        out.append((policy, r.new_tokens, time.perf_counter() - start, lm.engine.last_stats.slides))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a decoder run directory with prepared shards")
    ap.add_argument("--windows", type=int, default=64, help="validation windows of C + 1 tokens to score")
    ap.add_argument("--prompt", default="def ", help="the prompt of part 2")
    args = ap.parse_args()
    lm = load(args.run_dir, device="cpu")
    C = lm.config.model.context_length
    print(f"run: {args.run_dir} (context_length {C}, {lm.config.tokenizer.kind} tokenizer)\n")
    print("| tokens of context | mean val loss (nats/token) | tokens |")
    print("|---|---:|---:|")
    for name, loss, n in loss_by_context(lm, args.windows):
        print(f"| {name} | {loss:.4f} | {n:,} |")
    prompt_tokens = len(lm.engine.encode_prompt(args.prompt))
    print(f"\nprompt {args.prompt!r} ({prompt_tokens} tokens), max_new_tokens {C}:\n")
    print("| context= | new tokens | seconds | slides |")
    print("|---|---:|---:|---:|")
    for policy, new, seconds, slides in policies(lm, args.prompt):
        print(f"| {policy} | {new} | {seconds:.2f} | {slides} |")


if __name__ == "__main__":
    main()
