"""Multiple-choice task evaluation of a decoder LM (HellaSwag style).

Each item is a context c and K candidate endings e_1..e_K, one of them right. The model "chooses" the
ending it finds most likely as a continuation of the context. With the ending's tokens e = (t_1..t_n)
(tokenized as ``" " + ending`` and appended to the tokens of the context, as in nanoGPT's hellaswag.py):

    score_sum(e)   = sum_i ln p(t_i | c, t_<i)                       (nats; favours short endings)
    score_norm(e)  = score_sum(e) / bytes(e)                         (nats per UTF-8 byte of the ending)
    score_token(e) = score_sum(e) / n                                (nats per token)

    acc       = mean over items of [argmax_k score_sum(e_k)   == label]
    acc_norm  = mean over items of [argmax_k score_norm(e_k)  == label]
    acc_token = mean over items of [argmax_k score_token(e_k) == label]

``acc_norm`` is the headline figure. It divides by the ending's length in bytes (lm-eval-harness divides
by its length in characters; bytes agree on ASCII text such as HellaSwag), so, unlike a per-token mean, it
does not depend on the tokenizer: models with different vocabularies compare fairly. ``acc_token`` (the
per-token mean that nanoGPT reports) is given too. ``bytes(e)`` is the summed byte length of the scored
tokens, the leading space included.

Batching: the K candidates of an item are right-padded into one (K, T) batch; padding inputs are token 0
and padding targets -100, and since attention is causal a real position never sees the padding after it.
Truncation: a sequence longer than ``context_length + 1`` tokens loses tokens from the left (the oldest
context); an ending longer than the whole window keeps only its last ``context_length`` tokens scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from scratchlm.device import autocast
from scratchlm.errors import DataError
from scratchlm.eval.perplexity import token_byte_lengths


@dataclass
class MultipleChoiceItem:
    """One question: a context, candidate endings and the index of the right one."""

    context: str
    endings: list[str]
    label: int
    ind: int = 0  # the item's id in its data set (HellaSwag ``ind``)
    activity_label: str = ""


# ----------------------------------------------------------------------------------------------------------
# data


def load_hellaswag(path: str | os.PathLike, limit: int | None = None) -> list[MultipleChoiceItem]:
    """Read HellaSwag JSON lines ``{ind, activity_label, ctx, label, endings[4]}``; the first ``limit`` items.

    Raises :class:`DataError` naming the file and line when the file is missing, empty or malformed.
    """
    path = Path(path)
    if limit is not None and limit <= 0:
        raise DataError(f"limit must be positive, got {limit}")
    if not path.is_file():
        raise DataError(f"HellaSwag file '{path}' not found; pass the path of hellaswag_val.jsonl")
    items: list[MultipleChoiceItem] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            items.append(_parse_hellaswag(line, f"{path}:{lineno}"))
    if not items:
        raise DataError(f"'{path}' holds no items; expected one JSON object per line (HellaSwag format)")
    return items


def _parse_hellaswag(line: str, where: str) -> MultipleChoiceItem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{where}: not valid JSON ({e.msg}); expected one HellaSwag object per line"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with ctx, endings and label")
    missing = [k for k in ("ctx", "endings", "label") if k not in row]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (a HellaSwag item has ctx, endings, label)")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str):
        raise DataError(f"{where}: 'ctx' must be a string")
    if not (
        isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) and e for e in endings)
    ):
        raise DataError(f"{where}: 'endings' must be a list of at least 2 non-empty strings")
    if isinstance(label, str) and label.isdigit():  # some exports store the label as a string
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise DataError(f"{where}: 'label' must be an integer in [0, {len(endings)}), got {row['label']!r}")
    return MultipleChoiceItem(
        ctx, list(endings), label, int(row.get("ind", 0)), str(row.get("activity_label", ""))
    )


# ----------------------------------------------------------------------------------------------------------
# scoring


def encode_choices(
    tokenizer, context: str, endings: Sequence[str], context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token batch of the K candidate continuations of ``context``.

    Returns ``idx`` (K, T) long and ``targets`` (K, T) long with T <= context_length: row k holds
    ``context + " " + endings[k]`` as inputs shifted by one; targets are the ending's tokens at the
    positions that predict them and -100 elsewhere (context and right padding). Left-truncated to fit.
    """
    ctx_ids = tokenizer.encode(context) or [tokenizer.eot_id]  # an empty context starts after end-of-text
    rows, targets = [], []
    for ending in endings:
        end_ids = tokenizer.encode(" " + ending)
        seq = (ctx_ids + end_ids)[-(context_length + 1) :]
        n_end = min(len(end_ids), len(seq) - 1)  # ending tokens that still have something before them
        rows.append(seq[:-1])
        targets.append([-100] * (len(seq) - 1 - n_end) + seq[-n_end:])
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for k, (r, t) in enumerate(zip(rows, targets)):
        idx[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        tgt[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    return idx, tgt


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    token_bytes: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Log-likelihood of each row's targets: idx, targets (K, T) -> ``sum`` (K,) nats, ``tokens`` (K,),
    ``bytes`` (K,) (UTF-8 bytes of the scored tokens, from ``token_bytes`` (V,))."""
    device = next(model.parameters()).device
    idx, targets = idx.to(device), targets.to(device)
    with autocast(device, dtype):
        logits, _ = model(idx)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (K, T, V)
    valid = targets != -100
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # (K, T)
    nbytes = token_bytes.to(device)[targets.clamp(min=0)] * valid
    return {
        "sum": (picked * valid).sum(-1).cpu(),
        "tokens": valid.sum(-1).cpu(),
        "bytes": nbytes.sum(-1).cpu(),
    }


def score_item(
    model: torch.nn.Module,
    tokenizer,
    item: MultipleChoiceItem,
    token_bytes: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The three scores (K,) of an item's endings, keyed by the accuracy they feed: ``acc`` (sum of
    log-probabilities), ``acc_norm`` (per byte), ``acc_token`` (per token). The prediction is the argmax."""
    idx, targets = encode_choices(tokenizer, item.context, item.endings, model.config.context_length)
    s = score_choices(model, idx, targets, token_bytes, dtype)
    return {
        "acc": s["sum"],
        "acc_norm": s["sum"] / s["bytes"].clamp(min=1),
        "acc_token": s["sum"] / s["tokens"].clamp(min=1),
    }


@torch.no_grad()
def evaluate_multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    items: Iterable[MultipleChoiceItem],
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy of ``model`` on multiple-choice ``items``: ``acc``, ``acc_norm`` (per byte), ``acc_token``
    (per token) and ``items`` (the count). Formulas in the module docstring. The model is put in eval mode
    for the pass and restored after.
    """
    was_training = model.training
    model.eval()
    token_bytes = token_byte_lengths(tokenizer)
    items = list(items)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="tasks", unit="item")
    correct = {"acc": 0, "acc_norm": 0, "acc_token": 0}
    n = 0
    for item in items:
        for name, score in score_item(model, tokenizer, item, token_bytes, dtype).items():
            correct[name] += int(int(score.argmax()) == item.label)
        n += 1
    model.train(was_training)
    return {name: c / max(n, 1) for name, c in correct.items()} | {"items": float(n)}
