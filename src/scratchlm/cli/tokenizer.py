"""``scratchlm tokenizer {train,encode,decode,stats}``: train, try out and inspect tokenizers."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from scratchlm.errors import DataError

DEFAULT_SPECIALS = ["<|endoftext|>"]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train, apply and inspect tokenizers (byte-level BPE, char)")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser(
        "train", help="train a byte-level BPE (or char-level) tokenizer and save tokenizer.json"
    )
    t.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="text files, directories, globs, .jsonl/.jsonl.gz/.parquet (one document per record, see "
        "--text-field), hf:NAME, or the word `builtin` (built-in corpus, train split); read as "
        "`train data.source=` reads them",
    )
    t.add_argument(
        "--text-field", default="text", help="the field of jsonl records / parquet column holding the text"
    )
    t.add_argument("--vocab-size", type=int, default=4096, help="256 bytes + merges + special tokens (bpe)")
    t.add_argument(
        "--special",
        nargs="*",
        action="extend",
        default=None,
        metavar="TOKEN",
        help="special tokens, the first is end-of-text; repeat or list several (default: <|endoftext|>; "
        "`--special` alone for none)",
    )
    t.add_argument("--pattern", default="gpt2", help="pre-tokenizer: gpt2 | gpt4 | a regex")
    t.add_argument(
        "--kind", choices=["bpe", "char"], default="bpe", help="bpe (default) or char (one id per character)"
    )
    t.add_argument(
        "--workers", type=int, default=None, help="pre-tokenization processes (default: all cores)"
    )
    t.add_argument("--out", default="tokenizer.json", help="output file (default: tokenizer.json)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    e = sub.add_parser("encode", help="print the token ids of a text")
    e.add_argument(
        "--tokenizer", required=True, help="tokenizer.json, char JSON, or a dir with vocab.json + merges.txt"
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to encode")
    src.add_argument("--file", help="a UTF-8 file to encode")
    e.add_argument("--allow-special", action="store_true", help="recognise special-token strings in the text")
    e.set_defaults(func=run_encode)

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--tokenizer", required=True, help="tokenizer.json, char JSON, or a GPT-2 vocab dir")
    d.add_argument("ids", nargs="+", type=int, metavar="ID", help="token ids")
    d.set_defaults(func=run_decode)

    s = sub.add_parser("stats", help="vocabulary summary, longest tokens, bytes per token on a text")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json, char JSON, or a GPT-2 vocab dir")
    s.add_argument("--file", help="measure bytes per token on this UTF-8 file")
    s.add_argument("--top", type=int, default=10, help="how many longest tokens to list")
    s.set_defaults(func=run_stats)


def _input_source(specs: list[str], text_field: str):
    """The ``--input`` specs as one text source, read as ``train data.source=`` and ``data prepare`` read
    them (``corpus.resolve_source``): text files are documents, jsonl / jsonl.gz records and parquet rows
    give their ``--text-field``, ``builtin`` is the built-in corpus' train split, ``hf:NAME`` a dataset."""
    from scratchlm.corpus import resolve_source

    for spec in specs:
        plain = spec != "builtin" and not spec.startswith("hf:") and not any(c in spec for c in "*?[")
        if plain and not Path(spec).expanduser().exists():
            raise DataError(f"training input {spec} does not exist; check the path")
    return resolve_source(specs, text_field=text_field)


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file {p} does not exist; check the path")
    return p.read_bytes().decode("utf-8", errors="replace")


def run_train(args: argparse.Namespace) -> int:
    from scratchlm.corpus import FileSource
    from scratchlm.tokenizer import CharTokenizer
    from scratchlm.tokenizer.bpe import _collect_files, check_training_args, train_bpe_on_source

    specials = DEFAULT_SPECIALS if args.special is None else args.special
    if args.kind != "char":
        check_training_args(args.vocab_size, specials, option="--vocab-size")  # before reading any input
    if args.workers is not None and args.workers < 1:
        raise DataError(f"--workers must be 1 or more (got {args.workers}); leave it out to use all cores")
    source = _input_source(args.input, args.text_field)
    start = time.perf_counter()
    if args.kind == "char":
        if isinstance(source, FileSource):
            _collect_files(source.paths)  # (an empty input is an error, as for bpe)
        tok = CharTokenizer.train(source.documents(), special_tokens=specials)
    else:
        tok = train_bpe_on_source(
            source,
            args.vocab_size,
            special_tokens=specials,
            pattern=args.pattern,
            num_workers=args.workers,
            progress=not args.no_progress,
        )
        replaced = getattr(tok, "train_info", {}).get("replaced_bytes", 0)
        if replaced:
            print(f"note: {replaced} undecodable byte(s) in the input were read as U+FFFD", file=sys.stderr)
    tok.save(args.out)
    print(
        f"saved {tok!r} to {args.out} in {time.perf_counter() - start:.2f}s (fingerprint {tok.fingerprint})"
    )
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else _read_text(args.file)
    ids = tok.encode(text, allowed_special="all" if args.allow_special else "none")
    print(" ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    sys.stdout.write(tok.decode(args.ids) + "\n")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from scratchlm.tokenizer import CharTokenizer, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(f"tokenizer: {tok!r}")
    print(f"fingerprint: {tok.fingerprint}")
    print(f"special tokens: {tok.special_tokens}")
    if isinstance(tok, CharTokenizer):
        print(f"characters: {len(tok.chars)}")
    else:
        vocab = tok.vocab()
        lengths = sorted(len(t) for t in vocab.values())
        print(
            f"token length in bytes: mean {sum(lengths) / len(lengths):.2f}, median {lengths[len(lengths) // 2]}, "
            f"max {lengths[-1]}"
        )
        longest = sorted(vocab.items(), key=lambda kv: (-len(kv[1]), kv[0]))[: args.top]
        print(f"longest {len(longest)} tokens:")
        for i, t in longest:
            print(f"  {i:>7}  {len(t):>3} bytes  {t.decode('utf-8', errors='replace')!r}")
    if args.file:
        text = _read_text(args.file)
        start = time.perf_counter()
        ids = tok.encode(text)
        seconds = time.perf_counter() - start
        n_bytes = len(text.encode("utf-8"))
        print(
            f"{args.file}: {n_bytes} bytes -> {len(ids)} tokens, {n_bytes / max(len(ids), 1):.3f} bytes/token, "
            f"encoded at {n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s"
        )
    return 0
