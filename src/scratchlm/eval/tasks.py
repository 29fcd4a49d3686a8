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
Long inputs: a sequence longer than ``context_length + 1`` tokens loses tokens from the left (the oldest
context). An ending longer than the window itself is scored in several rows of one window each, every
token of it with at least ``context_length // 2`` tokens before it (the rows' sums are added), so every
ending is scored on all its tokens: keeping only its last tokens would compare sums over different
numbers of tokens across the candidates.
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token batch of the K candidate continuations of ``context``.

    Returns ``idx`` (R, T) long, ``targets`` (R, T) long with T <= context_length, and ``owner`` (R,) long,
    the candidate of each row. Row r holds inputs of ``context + " " + endings[owner[r]]`` and, as
    targets, the ending's tokens at the positions that predict them, -100 elsewhere (context and right
    padding). An ending that fits the window is one row (R = K when all fit), its context cut from the
    left to fit; a longer one is several rows (:func:`_ending_rows`).
    """
    ctx_ids = tokenizer.encode(context) or [tokenizer.eot_id]  # an empty context starts after end-of-text
    rows, targets, owner = [], [], []
    for k, ending in enumerate(endings):
        for x, y in _ending_rows(ctx_ids + tokenizer.encode(" " + ending), len(ctx_ids), context_length):
            rows.append(x)
            targets.append(y)
            owner.append(k)
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for k, (r, t) in enumerate(zip(rows, targets)):
        idx[k, : len(r)] = torch.tensor(r, dtype=torch.long)
        tgt[k, : len(t)] = torch.tensor(t, dtype=torch.long)
    return idx, tgt, torch.tensor(owner, dtype=torch.long)


def _ending_rows(seq: list[int], first: int, T: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) rows of at most T tokens that score ``seq[first:]`` (the ending) given all before it.

    If the ending has at most T tokens: one row, the last ``T + 1`` tokens of ``seq`` (the oldest context
    dropped). Otherwise rows from the end backwards, each scoring the ``T // 2`` targets before where the
    last one stopped, with the T tokens before its last target as inputs: every ending token is a target
    once, with at least ``T // 2`` tokens (or all of ``seq``) before it.
    """
    if len(seq) - first <= T:
        window = seq[-(T + 1) :]
        n = len(seq) - first
        return [(window[:-1], [-100] * (len(window) - 1 - n) + window[-n:])]
    stride = max(T // 2, 1)
    rows = []
    end = len(seq)  # targets seq[lo:end] in this row
    while end > first:
        lo = max(first, end - stride)
        start = max(0, end - 1 - T)  # inputs seq[start:end - 1], targets seq[start + 1:end]
        rows.append((seq[start : end - 1], [-100] * (lo - start - 1) + seq[lo:end]))
        end = lo
    return rows[::-1]


@torch.no_grad()
def score_choices(
    model: torch.nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    token_bytes: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Log-likelihood of each row's targets: idx, targets (R, T) -> ``sum`` (R,) nats, ``tokens`` (R,),
    ``bytes`` (R,) (UTF-8 bytes of the scored tokens, from ``token_bytes`` (V,))."""
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
    idx, targets, owner = encode_choices(tokenizer, item.context, item.endings, model.config.context_length)
    rows = score_choices(model, idx, targets, token_bytes, dtype)
    K = len(item.endings)  # a long ending's rows add up
    s = {name: torch.zeros(K, dtype=v.dtype).index_add_(0, owner, v) for name, v in rows.items()}
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
