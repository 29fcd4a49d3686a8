"""``scratchlm data prepare`` and ``scratchlm data info``: text -> token shards, and what a shard dir holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.errors import DataError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="prepare token shards from text; inspect a shard directory")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prep = sub.add_parser(
        "prepare",
        help="encode text sources into train/val token shards + meta.json",
        description="Encode documents in parallel and write train_*.bin / val_*.bin shards "
        "and meta.json. Re-running with the same inputs reuses the directory.",
    )
    prep.add_argument(
        "source",
        nargs="*",
        metavar="SOURCE",
        help="files, directories, globs, *.jsonl, *.parquet, hf:NAME[:split[:config]]; "
        "none or 'builtin' = the built-in corpus (data.source)",
    )
    prep.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="tokenizer.json, char tokenizer JSON, or a GPT-2 vocab dir (tokenizer.path)",
    )
    prep.add_argument("--out", required=True, metavar="DIR", help="shard directory to write (data.data_dir)")
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="fraction of documents held out for validation, by content hash (data.val_fraction)",
    )
    prep.add_argument(
        "--val-source",
        nargs="+",
        action="extend",
        default=[],
        metavar="SOURCE",
        help="explicit validation source instead of --val-fraction (data.val_source)",
    )
    prep.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="encoding processes; default all cores, 1 = in this process (data.num_workers)",
    )
    prep.add_argument(
        "--text-field",
        default="text",
        metavar="F",
        help="field holding the text in jsonl/parquet/HF records (data.text_field)",
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare, intermixed="source")

    info = sub.add_parser(
        "info", help="tokens, documents, dtype, tokenizer and a decoded peek of a shard dir"
    )
    info.add_argument("dir", metavar="DIR", help="a directory written by `scratchlm data prepare`")
    info.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="tokenizer to decode the peek with (default: DIR/tokenizer.json)",
    )
    info.add_argument("--peek", type=int, default=64, metavar="N", help="tokens of the train split to decode")
    info.set_defaults(func=run_info)


def run_prepare(args: argparse.Namespace) -> int:
    from scratchlm.corpus import builtin_corpus, resolve_source
    from scratchlm.data.prepare import prepare
    from scratchlm.tokenizer import load_tokenizer

    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    tokenizer = load_tokenizer(args.tokenizer)
    val_source = resolve_source(args.val_source, args.text_field) if args.val_source else None
    if args.source in ([], ["builtin"]) and val_source is None:  # the built-in corpus is split by file
        corpus = builtin_corpus(args.val_fraction)
        source, val_source = corpus.train, corpus.val
    else:
        source = resolve_source(args.source, args.text_field, args.val_fraction)
    meta = prepare(
        source,
        tokenizer,
        args.out,
        val_source=val_source,
        val_fraction=args.val_fraction,
        num_workers=args.workers,
        progress=not args.no_progress,
    )
    for split in ("train", "val"):
        s = meta["splits"][split]
        print(f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents, {len(s['shards'])} shard(s)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from scratchlm.data.shards import TOKENIZER, read_meta

    d = Path(args.dir)
    meta = read_meta(d)
    tok = meta["tokenizer"]
    print(f"directory:  {d}")
    print(f"source:     {meta['source']['description']} (fingerprint {meta['source']['fingerprint']})")
    if meta.get("val_source"):
        print(f"val source: {meta['val_source']['description']}")
    print(f"split rule: {meta['split_rule']} (val_fraction {meta['val_fraction']})")
    print(f"tokenizer:  {tok['kind']} {tok['fingerprint']}, vocab {tok['vocab_size']}, eot {tok['eot_id']}")
    print(f"dtype:      {meta['dtype']}")
    for split in ("train", "val"):
        s = meta["splits"][split]
        print(
            f"{split + ':':<11} {s['tokens']:,} tokens, {s['documents']:,} documents, {len(s['shards'])} shard(s)"
        )
    if meta.get("skipped_empty_documents"):
        print(f"skipped:    {meta['skipped_empty_documents']} empty document(s)")
    shards = meta["splits"]["train"]["shards"]
    tok_path = Path(args.tokenizer) if args.tokenizer else d / TOKENIZER
    if args.peek > 0 and shards and tok_path.exists():
        import numpy as np

        from scratchlm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_path)
        if tokenizer.fingerprint != tok["fingerprint"]:
            raise DataError(
                f"tokenizer {tok_path} ({tokenizer.fingerprint}) is not the one these shards were "
                f"prepared with ({tok['fingerprint']}); pass the right --tokenizer"
            )
        ids = np.memmap(d / shards[0]["file"], dtype=meta["dtype"], mode="r")[: args.peek]
        print(f"peek:       {tokenizer.decode(ids.tolist())!r}")
    return 0
