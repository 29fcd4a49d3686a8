"""``scratchlm translate``: translate text with a trained seq2seq run; ``scratchlm average``: average its
last checkpoints.

    scratchlm translate runs/de-en --src "Ein Mann fährt Fahrrad."
    scratchlm translate runs/de-en --src-file test.de --out test.hyp.en --beams 4 --length-penalty 1.0
    scratchlm average runs/de-en --last 5            # then: scratchlm translate runs/de-en --which averaged
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from scratchlm.errors import ConfigError, GenerationError


def add_search_options(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    """Search options shared by ``translate`` and ``eval`` on seq2seq runs (eval has its own --batch-size)."""
    s = p.add_argument_group("search (see docs/translation.md)")
    s.add_argument("--beams", type=int, default=1, metavar="N", help="beam size (default 1 = greedy)")
    s.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        metavar="A",
        help="beam score = log p(y|x) / len(y)**A (default 1.0; 0 favours short outputs)",
    )
    s.add_argument(
        "--max-len-a",
        type=float,
        default=1.5,
        metavar="A",
        help="at most A * source tokens + B output tokens (default 1.5)",
    )
    s.add_argument("--max-len-b", type=int, default=10, metavar="B", help="see --max-len-a (default 10)")
    s.add_argument(
        "--strict",
        action="store_true",
        help="refuse a source longer than the model's context (default: truncate it to the context, with one "
        "warning naming the sources, as fairseq)",
    )
    if batch_size:
        s.add_argument(
            "--batch-size", type=int, default=64, help="sentences translated together (default 64)"
        )


def check_search_options(args: argparse.Namespace) -> None:
    if args.beams < 1:
        raise GenerationError(f"--beams must be >= 1 (1 = greedy), got {args.beams}")
    if not (math.isfinite(args.length_penalty) and args.length_penalty >= 0):
        raise GenerationError(f"--length-penalty must be a finite number >= 0, got {args.length_penalty}")
    if not (math.isfinite(args.max_len_a) and args.max_len_a >= 0) or args.max_len_b < 0:
        raise GenerationError(
            f"--max-len-a and --max-len-b must be >= 0, got {args.max_len_a} and {args.max_len_b}"
        )
    if args.batch_size is not None and args.batch_size < 1:
        raise GenerationError(f"--batch-size must be >= 1, got {args.batch_size}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate",
        help="translate text with a trained seq2seq run (greedy or beam search)",
        description="Translate one sentence (--src) or a file of one sentence per line (--src-file, "
        "written to --out or printed), batched, with greedy or beam search.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a seq2seq run directory written by `scratchlm train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", metavar="TEXT", help="one source sentence")
    src.add_argument("--src-file", metavar="FILE", help="source sentences, one per line (UTF-8)")
    p.add_argument("--out", metavar="FILE", help="write the translations here, one per line")
    p.add_argument(
        "--which",
        choices=["best", "latest", "averaged"],
        default="best",
        help="checkpoint: best (default), latest, or averaged (made by `scratchlm average`)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    add_search_options(p)
    p.set_defaults(func=run_translate)

    a = sub.add_parser(
        "average",
        help="average the last K checkpoints of a run into one (Vaswani et al. 2017)",
        description="Write the mean of the weights of a run's last K complete checkpoints to --out "
        "(default RUN_DIR/averaged, used by `--which averaged`).",
    )
    a.add_argument("run_dir", metavar="RUN_DIR", help="a run directory with checkpoints")
    a.add_argument("--last", type=int, default=5, metavar="K", help="checkpoints to average (default 5)")
    a.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/averaged)")
    a.set_defaults(func=run_average)


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 file (trailing newline stripped); DataError-free OSError for the CLI."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def run_translate(args: argparse.Namespace) -> int:
    from scratchlm.api import load
    from scratchlm.device import autocast, resolve_dtype
    from scratchlm.inference.translate import translate_texts

    check_search_options(args)
    if args.out and args.src is not None:
        raise ConfigError("--out goes with --src-file; a --src sentence is printed")
    sources = [args.src] if args.src is not None else read_lines(args.src_file)
    empty = [i + 1 for i, s in enumerate(sources) if not s.strip()]
    if empty:
        where = f"line {empty[0]} of {args.src_file}" if args.src_file else "--src"
        raise GenerationError(f"{where} is empty; give one non-empty sentence per line")
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"--out {out} is a directory; give a file name")
        out.parent.mkdir(parents=True, exist_ok=True)
    lm = load(args.run_dir, which=args.which, device=args.device)
    if lm.config.model.arch != "seq2seq":
        raise ConfigError(
            f"{args.run_dir} is a decoder run (model.arch={lm.config.model.arch}); translate needs a seq2seq "
            "run, use `scratchlm generate` for this one"
        )
    dtype = resolve_dtype(lm.config.train.dtype, lm.device)
    with autocast(lm.device, dtype):
        hyps = translate_texts(
            lm.model,
            lm.tokenizer,
            sources,
            beam_size=args.beams,
            length_penalty=args.length_penalty,
            max_len_a=args.max_len_a,
            max_len_b=args.max_len_b,
            batch_size=args.batch_size,
            progress=args.src_file is not None,
            truncate=not args.strict,
            strict_option="--strict",
        )
    if args.out:
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        tmp.replace(args.out)
        print(f"wrote {len(hyps)} translations to {args.out}", file=sys.stderr)
    else:
        for h in hyps:
            print(h)
    return 0


def run_average(args: argparse.Namespace) -> int:
    from scratchlm.train.average import average_run

    out, n = average_run(args.run_dir, args.last, args.out)
    print(f"averaged the last {n} checkpoints of {args.run_dir} into {out}")
    return 0
