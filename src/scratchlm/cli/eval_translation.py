"""``scratchlm eval RUN_DIR`` on a seq2seq run: loss, perplexity, sacreBLEU and chrF, printed as a table
with the sacrebleu signatures, appended to the run's metrics.jsonl and written to ``RUN_DIR/eval/*.json``.

    scratchlm eval runs/de-en                                  # the run's validation pairs, greedy
    scratchlm eval runs/de-en --src test.de --ref test.en --beams 4 --which averaged
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scratchlm.errors import ConfigError, DataError


def run_translation_eval(args: argparse.Namespace, lm) -> int:
    from scratchlm.cli.translate import check_search_options, read_lines
    from scratchlm.data.pairs import split_pairs
    from scratchlm.device import resolve_dtype
    from scratchlm.eval.translation import evaluate_translation

    check_search_options(args)
    if args.task:
        raise ConfigError(f"--task scores decoder LMs; {args.run_dir} is a seq2seq (translation) run")
    if args.src is not None:
        src, ref = read_lines(args.src), read_lines(args.ref)
        if len(src) != len(ref):
            raise DataError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)}; line-align them")
        pairs, name, prefix = list(zip(src, ref)), Path(args.src).stem, ""
    else:
        pairs, name, prefix = split_pairs(lm.config.data)[1], "val", "val_"
    if args.limit is not None:
        pairs = pairs[: args.limit]
    empty = [i + 1 for i, (s, _) in enumerate(pairs) if not s.strip()]
    if empty:
        raise DataError(f"source line {empty[0]} is empty; every line needs a sentence")
    dtype = resolve_dtype(lm.config.train.dtype, lm.device)
    start = time.perf_counter()
    r = evaluate_translation(
        lm.model,
        lm.tokenizer,
        pairs,
        beam_size=args.beams,
        length_penalty=args.length_penalty,
        max_len_a=args.max_len_a,
        max_len_b=args.max_len_b,
        batch_size=args.batch_size or 64,
        dtype=dtype,
        progress=not args.json,
        truncate=not args.strict,
        strict_option="--strict",
    )
    seconds = time.perf_counter() - start
    step = _checkpoint_step(lm.checkpoint)
    record = {
        "kind": "eval_translation",
        "step": step,
        "checkpoint": str(lm.checkpoint),
        "src": args.src or "validation pairs",
        "ref": args.ref or "validation pairs",
        "sentences": r["sentences"],
        "beams": r["beams"],
        "length_penalty": r["length_penalty"],
        f"{prefix}loss": r["loss"],
        f"{prefix}ppl": r["ppl"],
        f"{prefix}bleu": r["bleu"],
        f"{prefix}chrf": r["chrf"],
        "bleu_signature": r["bleu_signature"],
        "chrf_signature": r["chrf_signature"],
        "seconds": round(seconds, 2),
    }
    run_dir = Path(args.run_dir)
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    tag = f"{name}_{Path(lm.checkpoint).name}_beam{args.beams}"
    (out_dir / f"{tag}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    (out_dir / f"{tag}.hyp").write_text("".join(h + "\n" for h in r["hypotheses"]), encoding="utf-8")
    if args.json:
        print(json.dumps(record))
        return 0
    search = "greedy" if args.beams == 1 else f"beam {args.beams}, length penalty {args.length_penalty}"
    print(f"checkpoint: {lm.checkpoint}   pairs: {record['src']} ({r['sentences']:,})   search: {search}")
    print()
    print("| metric | value | signature |")
    print("|---|---:|---|")
    print(f"| loss (nats/token, no label smoothing) | {r['loss']:.4f} | {r['loss_tokens']:,} target tokens |")
    print(f"| perplexity | {r['ppl']:.2f} | exp(loss) |")
    print(f"| sacreBLEU | {r['bleu']:.2f} | {r['bleu_signature']} |")
    print(f"| chrF | {r['chrf']:.2f} | {r['chrf_signature']} |")
    print()
    print(f"stored in {run_dir / 'metrics.jsonl'} and {out_dir / (tag + '.json')} (translations: .hyp)")
    return 0


def _checkpoint_step(ckpt_dir) -> int | None:
    try:
        return int(json.loads((Path(ckpt_dir) / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
