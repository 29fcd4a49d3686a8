"""Validation loss and the samples written to samples.txt during training.

Validation: the mean cross-entropy (nats per predicted token) over ``eval.batches`` batches of a *fresh*
sequential validation loader, so every evaluation sees the same tokens and numbers are comparable across
steps and across resumed runs. With W ranks each evaluates its share of those same batches (batch i on
rank ``i % W``) and the sum is all-reduced: the same number as one process, up to float summation order.
Top-1 / top-5 next-token accuracy (eval/accuracy.py) are counted on the same tokens.
Perplexity = ``exp(val_loss)``; bits per byte = ``val_loss / ln 2 * tokens / bytes`` when the shard metadata
records the validation split's byte count.

Samples use a small temperature/top-k sampler with its *own* ``torch.Generator`` seeded from
``(train.seed, step)``: writing samples never touches the global RNG, so it cannot change the training run
(a requirement of exact resume).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Config
from scratchlm.device import autocast
from scratchlm.eval.accuracy import ACCURACY_KS, topk_correct
from scratchlm.train.batches import batch_forward
from scratchlm.train.distributed import sum_over_ranks


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    make_val_loader: Callable[[], Any],
    batches: int,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean validation loss over ``batches`` batches (see :func:`evaluate_metrics`)."""
    return evaluate_metrics(model, make_val_loader, batches, device, dtype, rank, world_size)["val_loss"]


@torch.no_grad()
def evaluate_metrics(
    model: torch.nn.Module,
    make_val_loader: Callable[[], Any],
    batches: int,
    device: torch.device,
    dtype: torch.dtype,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """``{"val_loss", "val_acc_top1", "val_acc_top5"}`` over ``batches`` validation batches (model put
    back in train mode afterwards).

    val_loss is the mean of the batches' mean losses; the accuracies count every predicted token of those
    batches (eval/accuracy.py). ``make_val_loader`` gives this rank's share (batch j = batch
    ``j * world_size + rank``). Every rank runs ``ceil(batches / world_size)`` forwards (FSDP needs all
    ranks in each); a last-round batch past ``batches`` is not counted. The same values on every rank.
    ``batches`` beyond one pass over sequential shards is capped at one pass (it wrapped around and
    scored tokens twice). An ``eval.batches`` that covers the split scores the full batches of
    ``scratchlm eval``'s pass; that command also scores the windows they leave out (fewer than B windows,
    and each shard's last < T targets: ``TokenLoader.remainder_batches``).
    """
    loader = make_val_loader()
    per_pass = getattr(loader, "batches_per_epoch", None)  # sequential shards: never score a token twice
    if per_pass is not None and getattr(loader, "mode", None) == "sequential":
        batches = min(batches, per_pass * world_size)
    model.eval()
    total, correct, counted = 0.0, [0] * len(ACCURACY_KS), 0
    for j in range(-(-batches // world_size)):
        with autocast(device, dtype):
            logits, loss, targets = batch_forward(model, loader.next_batch())
        if j * world_size + rank < batches:
            total += loss.item()
            hits, n = topk_correct(logits, targets, ACCURACY_KS)
            correct = [c + h for c, h in zip(correct, hits)]
            counted += n
    model.train()
    total, counted, *correct = sum_over_ranks(total, counted, *correct)
    out = {"val_loss": total / batches}
    for k, c in zip(ACCURACY_KS, correct):
        out[f"val_acc_top{k}"] = c / max(counted, 1)
    return out


def eval_record(step: int, val_loss: float, data_meta: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """The metrics.jsonl record of one evaluation: loss, perplexity, bits per byte when bytes are known,
    and ``extra`` (accuracies, tokens, time)."""
    record: dict[str, Any] = {
        "kind": "eval",
        "step": step,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
    }
    val = (data_meta or {}).get("splits", {}).get("val", {})
    if val.get("bytes") and val.get("tokens"):
        record["val_bpb"] = val_loss / math.log(2) * val["tokens"] / val["bytes"]
    record.update(extra)
    return record


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    idx: torch.Tensor,
    new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
    context_length: int,
) -> torch.Tensor:
    """Append ``new_tokens`` sampled tokens to idx (B, T) -> (B, T + new_tokens); no KV cache (simplest).

    p(next) = softmax(logits[-1] / temperature) restricted to the top_k logits; temperature 0 = greedy.
    """
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -context_length:])
        logits = logits[:, -1].float()  # (B, V)
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@torch.no_grad()
def write_samples(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: Config,
    run_dir: Path,
    step: int,
    device: torch.device,
    dtype: torch.dtype,
    make_val_loader: Callable[[], Any] | None,
    write: bool = True,
) -> None:
    """Append ``eval.num_samples`` generations to run_dir/samples.txt (GPT: from the prompt; seq2seq:
    greedy translations of the first validation sources). ``write=False`` generates without writing (the
    other ranks of an FSDP run, which must take part in every forward)."""
    ec = cfg.eval
    if ec.num_samples <= 0 or tokenizer is None:
        return
    model.eval()
    lines = [f"=== step {step} ==="]
    with autocast(device, dtype):
        if cfg.model.arch == "seq2seq":
            if make_val_loader is None:
                model.train()
                return
            batch = make_val_loader().next_batch()
            n = min(ec.num_samples, batch["src"].size(0))
            bos = tokenizer.special_tokens.get("<|bos|>", tokenizer.eot_id)
            out = model.greedy_decode(
                batch["src"][:n], batch["src_mask"][:n], bos, tokenizer.eot_id, ec.sample_tokens
            )
            for i in range(n):
                src = batch["src"][i][batch["src_mask"][i]].tolist()
                hyp = out[i].tolist()
                hyp = hyp[: hyp.index(tokenizer.eot_id)] if tokenizer.eot_id in hyp else hyp
                lines.append(f"src: {tokenizer.decode([t for t in src if t != tokenizer.eot_id])}")
                lines.append(f"out: {tokenizer.decode(hyp)}")
        else:
            gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step)
            prompt = tokenizer.encode(ec.sample_prompt) if ec.sample_prompt else [tokenizer.eot_id]
            idx = torch.tensor([prompt] * ec.num_samples, dtype=torch.long, device=device)
            out = sample(
                model, idx, ec.sample_tokens, ec.temperature, ec.top_k, gen, cfg.model.context_length
            )
            for row in out.tolist():
                text = tokenizer.decode(row[len(prompt) :])
                lines.append((ec.sample_prompt + text).rstrip() + "\n---")
    model.train()
    if not write:
        return
    with open(Path(run_dir) / "samples.txt", "a", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n\n")


_SAMPLE_HEADER = re.compile(r"^=== step (\d+) ===$", re.MULTILINE)


def truncate_samples(run_dir: Path, step: int) -> None:
    """On resume from ``step``: drop the samples.txt blocks written after it (the resumed run writes them
    again), so a run killed between a checkpoint and its next one has each block once."""
    path = Path(run_dir) / "samples.txt"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    cut = next((m.start() for m in _SAMPLE_HEADER.finditer(text) if int(m.group(1)) > step), None)
    if cut is not None:
        from scratchlm import fileio

        fileio.write_text(path, text[:cut])
