"""``scratchlm generate`` (alias ``sample``) and ``scratchlm chat``: text from a trained run.

scratchlm generate runs/demo --prompt "def " --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --stats
scratchlm generate runs/demo --prompts-file prompts.txt --out results.jsonl --temperature 0
scratchlm generate runs/de-en --prompt "Ein Mann fährt Fahrrad." --beams 4 --length-penalty 1.0
scratchlm chat runs/demo --temperature 0.7

On a decoder run (``model.arch=gpt``) ``generate`` samples with the KV-cache engine; on a seq2seq run
(``model.arch=seq2seq``) it translates each prompt with greedy search, or beam search with ``--beams N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from scratchlm.errors import GenerationError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "generate",
        aliases=["sample"],
        help="generate text from a trained run (KV cache, batched), or translate with a seq2seq run",
        description="Complete prompts with a trained run's model. One --prompt, or --prompts-file for a "
        "batch (written to --out as JSON lines). A seq2seq run (model.arch=seq2seq) translates each prompt "
        "instead: greedy, or beam search with --beams.",
    )
    gen.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory (config.yaml, tokenizer.json, checkpoints/)"
    )
    src = gen.add_mutually_exclusive_group()
    src.add_argument(
        "--prompt", default="", help="the prompt (default: '' = start after an end-of-text token)"
    )
    src.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="one prompt per line (.txt, '\\n' escapes allowed) or {\"prompt\": ...} per line (.jsonl)",
    )
    gen.add_argument(
        "--out", metavar="FILE", help="write one JSON object per completion to FILE (JSON lines)"
    )
    gen.add_argument("--num-samples", type=int, default=1, help="completions per prompt (default 1)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    _add_common(gen)
    t = gen.add_argument_group("translation (seq2seq runs only; see docs/generation.md)")
    t.add_argument(
        "--beams", type=int, default=None, metavar="N", help="beam search with N beams (default: greedy)"
    )
    t.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        metavar="A",
        help="score = log p(y|x) / len(y)**A (default 1.0 = mean per-token log-prob; 0 favours short outputs)",
    )
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat",
        help="chat with a trained run in an interactive REPL (streaming)",
        description="Interactive chat. Turns are rendered by the chat template stored with the run's tokenizer "
        "(an instruction-tuned run's, e.g. chatml), else as a plain 'User:/Assistant:' transcript for base "
        "models. Commands: /reset, /set NAME VALUE, /show, /help, /quit. Ctrl-C stops a reply, Ctrl-D exits.",
    )
    chat.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    chat.add_argument("--system", metavar="TEXT", help="a system message put before the conversation")
    _add_common(chat, chat_defaults=True)
    chat.set_defaults(func=run_chat)


def _add_common(p: argparse.ArgumentParser, chat_defaults: bool = False) -> None:
    s = p.add_argument_group("sampling (see docs/generation.md)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per completion")
    s.add_argument(
        "--temperature",
        type=float,
        default=0.8 if chat_defaults else 1.0,
        help="0 = greedy; < 1 sharper, > 1 flatter",
    )
    s.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with mass >= p (1 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="keep tokens with p >= min_p * p_max (0 = off)")
    s.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="CTRL penalty on seen tokens, 0.01..100 (1 = off)",
    )
    s.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="subtract F * count, -100..100 (0 = off)"
    )
    s.add_argument(
        "--presence-penalty",
        type=float,
        default=0.0,
        help="subtract P if the token was seen, -100..100 (0 = off)",
    )
    s.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="S",
        help="stop string, repeatable; '\\n' escapes allowed; the output is cut before it",
    )
    s.add_argument(
        "--stop-token-id",
        dest="stop_token_ids",
        type=int,
        action="append",
        default=None,
        metavar="ID",
        help="stop when token ID is sampled, repeatable; replaces the default stop at end-of-text "
        "(give its id too to keep it)",
    )
    s.add_argument(
        "--seed", type=int, default=None, help="seed for reproducible sampling (0 <= seed < 2**64)"
    )
    s.add_argument(
        "--context",
        choices=("slide", "stop", "error"),
        default=None,
        help="when prompt + new tokens exceed the model's context: slide (a sliding window; the default, "
        "said once on stderr) | stop (end at the context) | error (refuse)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--which", choices=("best", "latest"), default="best", help="checkpoint to load")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    r.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (fixed shapes; its compile time, tens of seconds on a CPU, is "
        "reported apart and pays off over long generations and chats)",
    )
    r.add_argument(
        "--int8",
        action="store_true",
        help="int8 weights with one scale per output row (CPU, float32 runs): a quarter of the bytes read "
        "per token; the logits move slightly (benchmarks/results/decode_cpu.md, docs/generation.md)",
    )
    r.add_argument("--stats", action="store_true", help="print tokens/s after generating (to stderr)")


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        stop=[_unescape(s) for s in args.stop],
        stop_token_ids=args.stop_token_ids,
        seed=args.seed,
    )


def _check_stop_token_ids(args: argparse.Namespace, vocab_size: int) -> None:
    for t in args.stop_token_ids or []:
        if t >= vocab_size:
            raise GenerationError(f"--stop-token-id {t} is not in the vocabulary (0..{vocab_size - 1})")


def _unescape(s: str) -> str:
    """Turn backslash escapes typed on the command line (``\\n``, ``\\t``) into characters; keep others."""
    try:
        return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return s


def _load(args: argparse.Namespace):
    from scratchlm.api import load

    return load(args.run_dir, which=args.which, device=args.device)


def _engine(args: argparse.Namespace, lm):
    from scratchlm.inference.engine import CLI_NAMES, Engine

    if args.int8:
        from scratchlm.inference.quantize import quantize_int8

        try:
            quantize_int8(lm.model)
        except ValueError as e:
            raise GenerationError(str(e)) from None
    engine = Engine(lm.model, lm.tokenizer, compile=args.compile)
    engine.option_names = CLI_NAMES  # hints name --context / --max-new-tokens, not Python keywords
    _check_stop_token_ids(args, engine.vocab_size)
    return engine


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise GenerationError(f"--prompts-file {path} does not exist")
    from scratchlm.fileio import read_utf8

    lines = read_utf8(p, "--prompts-file").splitlines()
    if p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # bad JSON, a 5,000-digit number, 100k nested brackets
                record = None
            prompt = record.get("prompt") if isinstance(record, dict) else None
            if not isinstance(prompt, str):  # null or 5 would be generated from as the text "None" / "5"
                got = "" if not isinstance(record, dict) else f", got {json.dumps(prompt)[:40]}"
                raise GenerationError(
                    f"{path}:{i} is not a JSON object with a string 'prompt' field{got}; "
                    'write {"prompt": "text"} per line'
                )
            prompts.append(prompt)
    else:
        prompts = [_unescape(line) for line in lines if line.strip()]
    if not prompts:
        raise GenerationError(f"--prompts-file {path} holds no prompts; write one prompt per line")
    return prompts


def run_generate(args: argparse.Namespace) -> int:
    """Generate (or, on a seq2seq run, translate) for --prompt or --prompts-file; print, or write JSON lines
    to --out."""
    if args.batch_size < 1:
        raise GenerationError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = _read_prompts(args.prompts_file) if args.prompts_file else [_unescape(args.prompt)]
    _check_out(args)  # before the work, not after it
    lm = _load(args)
    if lm.config.model.arch == "seq2seq":
        rows, new_tokens, seconds = _translate(args, lm, prompts)
        _write_rows(args, rows)
        if args.stats:
            print(
                f"{new_tokens} new tokens ({len(rows)} rows) in {seconds:.2f}s: "
                f"{new_tokens / max(seconds, 1e-9):.1f} tok/s",
                file=sys.stderr,
            )
        return 0
    if args.beams is not None or args.length_penalty is not None:
        raise GenerationError(
            "--beams and --length-penalty are for translation with a seq2seq run (model.arch=seq2seq); "
            f"{args.run_dir} is a {lm.config.model.arch} run: use the sampling options "
            "(--temperature, --top-p, ...)"
        )
    engine = _engine(args, lm)
    sampling = _sampling(args)
    rows, seconds, new_tokens = [], 0.0, 0
    for i in range(0, len(prompts), args.batch_size):
        results = engine.generate(
            prompts[i : i + args.batch_size], context=args.context, num_samples=args.num_samples, **sampling
        )
        seconds += results[0].seconds if results else 0.0
        new_tokens += engine.last_stats.new_tokens
        for r in results:
            rows.append(
                dict(
                    prompt=r.prompt,
                    completion=r.text,
                    finish_reason=r.finish_reason,
                    prompt_tokens=r.prompt_tokens,
                    new_tokens=r.new_tokens,
                    token_ids=r.token_ids,
                    seconds=round(r.seconds, 4),
                    tokens_per_second=round(r.tokens_per_second, 1),
                )
            )
            if not args.out:
                print(r.prompt + r.text, flush=True)
                if len(prompts) * args.num_samples > 1:
                    print("-" * 40)
    _write_rows(args, rows)
    note = engine.last_stats.compile_note() if args.compile else None
    if note and len(prompts) <= args.batch_size:
        print(f"warning: {note}", file=sys.stderr)
    if args.stats:
        if len(prompts) <= args.batch_size:
            print(engine.last_stats.summary(), file=sys.stderr)
        else:
            print(
                f"{new_tokens} new tokens in {seconds:.2f}s: {new_tokens / max(seconds, 1e-9):.1f} tok/s",
                file=sys.stderr,
            )
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """--out must name a file in a writable directory that exists."""
    if not args.out:
        return
    out = Path(args.out)
    if out.is_dir():
        raise GenerationError(f"--out {out} is a directory; give a file path, e.g. {out / 'results.jsonl'}")
    parent = out.parent
    if not parent.is_dir():
        raise GenerationError(f"--out {out}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise GenerationError(f"--out {out}: the directory {parent} is not writable; choose another path")


def _write_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """--out: the rows as JSON lines, written atomically (a temporary file, then a rename)."""
    if not args.out:
        return
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GenerationError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    print(f"wrote {len(rows)} completions to {out}", file=sys.stderr)


def _translate(args: argparse.Namespace, lm, prompts: list[str]) -> tuple[list[dict], int, float]:
    """Translate each prompt with a seq2seq run; print one translation per line unless --out.

    Greedy search, or beam search with ``--beams N``; ``--max-new-tokens`` caps each output (EOS
    included). Returns the rows (as in --out), the generated tokens and the seconds spent.
    Options that only mean something to sampling are refused, not ignored.
    """
    from scratchlm.inference.beam import translate_hypotheses
    from scratchlm.inference.sampling import SamplingParams

    beams = 1 if args.beams is None else args.beams
    alpha = 1.0 if args.length_penalty is None else args.length_penalty
    if beams < 1:
        raise GenerationError(f"--beams must be >= 1 (1 = greedy), got {beams}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise GenerationError(f"--length-penalty must be a finite number >= 0, got {alpha}")
    used = SamplingParams.from_kwargs(**_sampling(args))
    neutral = SamplingParams(max_new_tokens=used.max_new_tokens)
    flags = {"stop_token_ids": "--stop-token-id"}
    for f in dataclasses.fields(SamplingParams):
        if getattr(used, f.name) != getattr(neutral, f.name):
            flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
            raise GenerationError(
                f"{flag} does not apply to {args.run_dir}: a seq2seq run translates deterministically "
                "(greedy, or beam search with --beams N); drop it"
            )
    for flag, unused in [
        ("--num-samples", args.num_samples != 1),
        ("--context", args.context is not None),
        ("--compile", args.compile),
        ("--int8", args.int8),
    ]:
        if unused:
            raise GenerationError(
                f"{flag} is for decoder runs; {args.run_dir} is a seq2seq (translation) run"
            )
    if not all(p.strip() for p in prompts):
        raise GenerationError(
            "a seq2seq run translates a source text: give it with --prompt TEXT or --prompts-file FILE"
        )
    tok, eos = lm.tokenizer, lm.tokenizer.eot_id
    rows, new_tokens, seconds = [], 0, 0.0
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i : i + args.batch_size]
        start = time.perf_counter()
        hyps = translate_hypotheses(
            lm.model, tok, batch, beam_size=beams, length_penalty=alpha, max_len=used.max_new_tokens
        )
        elapsed = time.perf_counter() - start
        seconds += elapsed
        for prompt, h in zip(batch, hyps):
            ended = h.tokens[-1:] == [eos]
            ids = h.tokens[:-1] if ended else h.tokens
            new_tokens += len(ids)
            text = tok.decode(ids)
            rows.append(
                dict(
                    prompt=prompt,
                    completion=text,
                    finish_reason="stop" if ended else "length",
                    prompt_tokens=len(tok.encode(prompt)) + 1,  # the source ends with EOS
                    new_tokens=len(ids),
                    token_ids=ids,
                    logprob=round(h.logprob, 4),
                    score=round(h.score, 4),
                    seconds=round(elapsed, 4),
                    tokens_per_second=round(len(ids) / max(elapsed, 1e-9), 1),
                )
            )
            if not args.out:
                print(text, flush=True)
    return rows, new_tokens, seconds


def run_chat(args: argparse.Namespace) -> int:
    """Interactive chat on stdin/stdout (prompt and banner only when stdin is a terminal)."""
    from scratchlm.inference.chat import ChatSession, run_repl

    lm = _load(args)
    if lm.config.model.arch == "seq2seq":
        raise GenerationError(
            f"{args.run_dir} is a seq2seq (translation) run and cannot chat; translate with "
            f"scratchlm generate {args.run_dir} --prompt TEXT"
        )
    engine = _engine(args, lm)
    sampling = _sampling(args)
    session = ChatSession(engine, system=args.system, **sampling)
    if args.context not in (None, "slide"):
        print("note: chat always uses a sliding window when a message does not fit", file=sys.stderr)
    return run_repl(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty(), show_stats=args.stats)
