"""``scratchlm eval RUN_DIR``: validation loss, perplexity and bits per byte of a trained decoder; on a
seq2seq run, loss, perplexity, sacreBLEU and chrF of its translations (``--src F --ref F``)."""

from __future__ import annotations

import argparse
import itertools
import json
import warnings
from pathlib import Path

from scratchlm.errors import ConfigError, DataError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte of a finished run",
        description="Evaluate a run's model on held-out tokens: loss (nats/token), perplexity, "
        "and bits per byte (independent of the tokenizer).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `scratchlm train`")
    p.add_argument(
        "--which",
        choices=["best", "latest", "averaged"],
        default="best",
        help="checkpoint to evaluate (averaged: made by `scratchlm average`)",
    )
    p.add_argument("--split", choices=["val", "train"], default="val", help="shard split to evaluate on")
    p.add_argument("--data-dir", help="shard directory (default: the one recorded in the run's config)")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="score only the first N batches (default: the whole split once, every token with the tokens "
        "before it as context: one pass of full batches, then the windows they leave out; N at or above the "
        "split's batches is the whole split)",
    )
    p.add_argument("--batch-size", type=int, help="rows per batch (default: the run's train.batch_size)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument(
        "--task",
        choices=["hellaswag"],
        help="score a multiple-choice task instead of held-out tokens (acc, acc_norm; see scratchlm.eval.tasks)",
    )
    p.add_argument("--task-file", metavar="PATH", help="the task's data, e.g. hellaswag_val.jsonl")
    p.add_argument("--limit", type=int, help="score only the first N items of the task")
    from scratchlm.cli.translate import add_search_options

    t = p.add_argument_group("seq2seq runs: BLEU and chrF (sacrebleu) of the translations")
    t.add_argument("--src", metavar="FILE", help="source sentences (default: the run's validation pairs)")
    t.add_argument("--ref", metavar="FILE", help="reference translations, line-aligned with --src")
    add_search_options(p, batch_size=False)
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from scratchlm.api import load
    from scratchlm.data.loader import TokenLoader
    from scratchlm.data.shards import read_meta
    from scratchlm.device import resolve_dtype
    from scratchlm.eval import evaluate_lm, token_byte_lengths

    if args.batches is not None and args.batches <= 0:
        raise ConfigError(f"--batches must be positive, got {args.batches}")
    if (args.src is None) != (args.ref is None):
        raise ConfigError("--src and --ref go together (line-aligned source and reference files)")
    if args.task and not args.task_file:
        raise ConfigError(f"--task {args.task} needs --task-file PATH (e.g. hellaswag_val.jsonl)")
    lm = load(args.run_dir, which=args.which, device=args.device)
    cfg = lm.config
    if cfg.model.arch == "seq2seq":
        from scratchlm.cli.eval_translation import run_translation_eval

        return run_translation_eval(args, lm)
    if args.src is not None:
        raise ConfigError(f"--src/--ref score translations; {args.run_dir} is a decoder run (model.arch=gpt)")
    if args.task:
        return _run_task(args, lm)
    data_dir = Path(args.data_dir or cfg.data.data_dir or "")
    if not (data_dir / "meta.json").is_file():
        raise DataError(f"no shards at '{data_dir}'; pass --data-dir DIR (made by `scratchlm data prepare`)")
    made_with = read_meta(data_dir).get("tokenizer", {}).get("fingerprint")
    if made_with != lm.tokenizer.fingerprint:  # the ids would mean other tokens: a silently wrong loss
        raise DataError(
            f"the shards in {data_dir} were made with another tokenizer than this run's; make them with "
            f"`scratchlm data prepare --tokenizer {Path(args.run_dir) / 'tokenizer.json'} ...`"
        )
    loader = TokenLoader(
        data_dir,
        split=args.split,
        batch_size=args.batch_size or cfg.train.batch_size,
        context_length=cfg.model.context_length,
        mode="sequential",
        device=lm.device,
    )
    whole = loader.batches_per_epoch  # full batches in one pass; the remainder windows score what they leave
    n = whole if args.batches is None else min(args.batches, whole)
    if args.batches is not None and args.batches > whole:
        warnings.warn(
            f"--batches {args.batches} is more than the {args.split} split holds ({whole} batches of "
            f"{loader.B} x {loader.T} tokens); scoring the whole split once",
            stacklevel=2,
        )
    whole_split = n == whole
    documents = _documents_scored(loader, n, whole_split)
    dtype = resolve_dtype(cfg.train.dtype, lm.device)
    batches = (loader.next_batch() for _ in range(n))
    remainder = 0
    if whole_split:  # the windows after the last full batch and each shard's last < T targets
        remainder = len(loader.remainder_windows())
        batches = itertools.chain(batches, loader.remainder_batches())
    result = evaluate_lm(lm.model, batches, token_byte_lengths(lm.tokenizer), dtype=dtype)
    result.update(
        checkpoint=str(lm.checkpoint),
        split=args.split,
        batches=n,
        remainder_windows=remainder,
        whole_split=whole_split,
        documents=documents,
        split_tokens=loader.num_tokens,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(f"checkpoint: {lm.checkpoint}")
        tokens, shards = int(result["tokens"]), len(loader.shards)
        docs = f"{documents:,} document{'s' if documents != 1 else ''}"
        if whole_split:
            first = "its first" if shards == 1 else f"the first of each of its {shards} shards"
            print(
                f"scored {tokens:,} of the {args.split} split's {loader.num_tokens:,} tokens (all but {first}, "
                f"which has no context), {docs} (the whole split: {n} batches of {loader.B} x {loader.T}, "
                f"then the {remainder} window{'s' if remainder != 1 else ''} they leave out)"
            )
        else:
            print(
                f"scored {tokens:,} of the {args.split} split's {loader.num_tokens:,} tokens, {docs} "
                f"(the first {n} of {whole} batches of {loader.B} x {loader.T})"
            )
        print(f"loss: {result['loss']:.4f} nats/token   perplexity: {result['perplexity']:.2f}")
        if "bits_per_byte" in result:
            print(f"bits per byte: {result['bits_per_byte']:.4f}")
    return 0


def _documents_scored(loader, batches: int, whole_split: bool) -> int:
    """How many documents have at least one target token among the first ``batches`` sequential batches
    (``whole_split``: among all targets of the split).

    Sequential windows tile each shard from offset 0, so the targets scored in a shard are positions
    ``1 .. end`` (``end`` = its last window's start + T, or its last token for the whole split), and
    document d (starting at ``s_d``) has one of them exactly when ``s_d <= end``: a count of document
    starts, read from the shard's ``.idx``.
    """
    import numpy as np

    from scratchlm.data.shards import read_doc_starts

    end: dict[int, int] = {}
    if whole_split:
        end = {i: int(s["tokens"]) - 1 for i, s in enumerate(loader.shards)}
    else:
        for step in range(batches):
            for shard, offset in loader.batch_starts(step):
                end[shard] = max(end.get(shard, 0), offset + loader.T)
    return sum(
        int(np.searchsorted(read_doc_starts(loader.data_dir, loader.shards[i]), e, side="right"))
        for i, e in end.items()
    )


def _run_task(args: argparse.Namespace, lm) -> int:
    """``--task hellaswag``: multiple-choice accuracy (acc: sum of log-probs, acc_norm: per byte)."""
    from scratchlm.device import resolve_dtype
    from scratchlm.eval.tasks import evaluate_multiple_choice, load_hellaswag

    items = load_hellaswag(args.task_file, limit=args.limit)
    dtype = resolve_dtype(lm.config.train.dtype, lm.device)
    result = evaluate_multiple_choice(lm.model, lm.tokenizer, items, dtype=dtype, progress=not args.json)
    if args.json:
        print(json.dumps({"task": args.task, **result, "checkpoint": str(lm.checkpoint)}))
    else:
        print(f"checkpoint: {lm.checkpoint}")
        print(f"{args.task}: {int(result['items']):,} items")
        print(
            f"acc: {result['acc']:.4f}   acc_norm (per byte): {result['acc_norm']:.4f}   "
            f"acc_token: {result['acc_token']:.4f}"
        )
    return 0
