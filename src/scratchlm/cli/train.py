"""``scratchlm train``, ``scratchlm corpus info`` and ``scratchlm presets``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

from scratchlm.errors import ConfigError

MAIN_JOB_PRESET = "cpu-small"


def _options_help() -> str:
    """The epilog of ``scratchlm train --help``: every config option with its type, default and doc (built
    only when that help is shown: it imports the config module, which ``scratchlm --help`` does not need)."""
    from scratchlm.config import field_docs
    from scratchlm.presets import PRESETS

    lines = [
        "options (section.key=value; defaults < preset < YAML < command line):",
        "  list values: data.source=a.txt,b.txt or, quoted for the shell, "
        "\"tokenizer.special_tokens=['<|endoftext|>', '<|bos|>']\"",
        "  paths: relative paths in a CONFIG.yaml are relative to that file's folder; on the command line,",
        "  relative to the current directory",
    ]
    section = None
    for key, type_name, default, text in field_docs():
        sec = key.split(".")[0]
        if sec != section:
            lines.append(f"\n  [{sec}]")
            section = sec
        lines.append(f"  {key} ({type_name}, default {default!r})\n      {text}")
    lines.append(f"\npresets: {', '.join(PRESETS)} (preset=NAME; see `scratchlm presets`)")
    lines.append(f"With no CONFIG and no preset=, the main job's preset '{MAIN_JOB_PRESET}' is used.")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the main job on the built-in corpus)",
        description="Train a tokenizer (or reuse a cached one), prepare shards, train and evaluate a model, "
        "and print a sample. Arguments are an optional YAML config followed by dotted overrides.",
        epilog_factory=_options_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [section.key=value ...]",
        help="a YAML config file and/or dotted overrides, e.g. model.n_layer=8 train.lr=3e-4",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, parameter count, memory, FLOPs and an estimated time; write nothing",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR exactly where it stopped (overrides may extend it)",
    )
    add_console_options(p)
    p.set_defaults(func=run_train, intermixed="args")

    c = sub.add_parser("corpus", help="the built-in corpus (Python standard library source)")
    csub = c.add_subparsers(dest="corpus_command", metavar="COMMAND", required=True)
    info = csub.add_parser("info", help="size, file count and split of the built-in corpus")
    info.add_argument("--val-fraction", type=float, default=0.1, help="validation fraction (by file)")
    info.add_argument("--files", action="store_true", help="also list the files of each split")
    info.set_defaults(func=run_corpus_info)

    pr = sub.add_parser("presets", help="list the named presets and what each sets")
    pr.set_defaults(func=run_presets)


def add_console_options(p: argparse.ArgumentParser) -> None:
    """--verbose / --quiet of ``train`` and ``finetune`` (see scratchlm/console.py)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--verbose",
        action="store_true",
        help="print the resolved config before training (--dry-run always does); by default one summary line",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress, no log lines, no sample: only warnings, errors and the final result",
    )


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [k=v ...]`` -> (config path or None, overrides)."""
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError(
                f"unexpected argument '{a}': give one CONFIG.yaml, then section.key=value overrides"
            )
    return config, overrides


def run_train(args: argparse.Namespace) -> int:
    """``scratchlm train``; under torchrun (``torchrun --nproc_per_node N -m scratchlm train ...``) every
    rank runs it and only rank 0 prints (the config, the summary and the sample)."""
    from scratchlm.config import load_config, to_yaml
    from scratchlm.pipeline import resume_config, run
    from scratchlm.train.distributed import is_main_process

    config_path, overrides = split_args(args.args)
    if args.resume:
        if config_path:
            raise ConfigError(
                "--resume takes the config saved in the run directory; drop the CONFIG argument"
            )
        cfg = resume_config(args.resume, overrides)
    else:
        # the main job's preset only for a plain `scratchlm train`: a run started from pretrained weights
        # takes its model from them (the preset's model values would conflict)
        explicit = any(o.startswith(("preset=", "train.init_from=")) for o in overrides)
        preset = MAIN_JOB_PRESET if config_path is None and not explicit else None
        cfg = load_config(config_path, overrides, preset=preset)
        if cfg.train.init_from:  # the source's model and tokenizer; an override that disagrees is refused,
            from scratchlm.train.init_from import (
                apply_init_from,
                explicit_keys,
            )  # even one equal to the default

            cfg, _ = apply_init_from(cfg, explicit_keys(config_path, overrides))
    main = is_main_process()
    quiet = getattr(args, "quiet", False)
    if main and (args.dry_run or getattr(args, "verbose", False)):
        print("# resolved config" + (f" (preset {cfg.preset})" if cfg.preset else ""))
        print(to_yaml(cfg), end="")
    if args.dry_run:
        from scratchlm.train.dryrun import dry_run

        if main:
            print(dry_run(cfg))
        return 0

    start = time.time()
    if quiet:  # the run's own output goes nowhere (stdout is then no terminal: no bars either)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            result = run(cfg, progress=False)
    else:
        result = run(cfg)
    if not main:
        return 0
    print(("" if quiet else "\n") + f"run directory: {result['run_dir']}")
    print(f"steps: {result['step']}, tokens: {result['tokens']:,}, wall time: {time.time() - start:.0f} s")
    if result.get("val_loss") is not None:
        ppl = math.exp(min(result["val_loss"], 50.0))
        print(f"final validation loss: {result['val_loss']:.4f} (perplexity {ppl:.2f})")
    print(f"stopped: {result['stop_detail']}")
    if not quiet:
        _print_sample(result["run_dir"], cfg)
    return 0


def _print_sample(run_dir, cfg) -> None:
    """Print one sample from the finished run (the main job's last step)."""
    from scratchlm.api import load

    if cfg.model.arch != "gpt":
        return
    lm = load(run_dir)
    if cfg.data.format == "chat":  # an instruction-tuned run answers one turn, as `scratchlm chat` would
        _print_chat_sample(lm, cfg)
        return
    prompt = cfg.eval.sample_prompt
    text = lm.generate(
        prompt,
        max_new_tokens=min(200, cfg.model.context_length),
        temperature=0.8,
        top_k=50,
        seed=cfg.train.seed,
        context="slide",  # prompt + 200 tokens may exceed a small context window
    )
    print("\n--- sample ---")
    print(prompt + text)
    print("--- end of sample ---")
    sys.stdout.flush()


def _print_chat_sample(lm, cfg) -> None:
    """One chat turn through the run's template: the user message is eval.sample_prompt, else the first
    user message of the training conversations; the reply stops at the end of the turn."""
    from scratchlm.data.chat import read_conversations
    from scratchlm.inference.chat import ChatSession

    message = cfg.eval.sample_prompt
    if not message:
        first = read_conversations(list(cfg.data.source))[0][1]
        message = next((m["content"] for m in first if m["role"] == "user"), "Hello")
    session = ChatSession(
        lm.engine,
        temperature=0.8,
        top_k=50,
        seed=cfg.train.seed,
        max_new_tokens=min(200, cfg.model.context_length // 2),
    )
    reply = "".join(session.reply(message))
    print("\n--- sample ---")
    print(f"user: {message}\nassistant: {reply}")
    print("--- end of sample ---")
    sys.stdout.flush()


def run_corpus_info(args: argparse.Namespace) -> int:
    from scratchlm.corpus import builtin_corpus

    corpus = builtin_corpus(args.val_fraction)
    info = corpus.info()
    print(f"built-in corpus: {corpus.train.description.rsplit(',', 1)[0]}")
    print(f"  files: {info['files']:,} ({info['bytes'] / 1e6:.1f} MB)")
    print(f"  train: {info['train_files']:,} files, {info['train_bytes'] / 1e6:.1f} MB")
    print(f"  val:   {info['val_files']:,} files, {info['val_bytes'] / 1e6:.1f} MB")
    print(f"  fingerprint: {info['fingerprint']}")
    if args.files:
        for split in ("train", "val"):
            for p in getattr(corpus, split).paths:
                print(f"{split}\t{p.relative_to(corpus.root)}")
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from scratchlm.presets import PRESETS

    for name, values in PRESETS.items():
        flat = ", ".join(f"{sec}.{k}={v}" for sec, kv in values.items() for k, v in kv.items())
        print(f"{name}:\n  {flat}")
    return 0
