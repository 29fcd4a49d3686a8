"""``scratchlm finetune SOURCE DATA [CONFIG.yaml] [section.key=value ...]``: fine-tune pretrained weights.

The same pipeline and training loop as ``scratchlm train``, with three things set for you:

- ``train.init_from=SOURCE``: a Hugging Face GPT-2/Llama directory or a ScratchLM run or checkpoint; the model
  config and tokenizer come from it (``train/init_from.py``);
- ``data.source=DATA``: text (files, dirs, globs, jsonl with a text field) or, for instruction tuning, a jsonl
  of ``{"messages": [...]}`` conversations (detected from its first record: ``data.format=chat``);
- the ``finetune`` preset: a 10x lower peak learning rate (1e-4), 10 warmup steps, no weight decay,
  evaluations every 25 steps and early stopping after 3 without improvement (``scratchlm presets``).

A YAML file and overrides go on top (``train.freeze=wte.*,blocks.0.*``, ``train.max_steps=1000``).
``--lora`` trains LoRA adapters instead of every weight (``train.lora.rank=8``, ``train.lr=2e-4``;
``train/adapters.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scratchlm.errors import DataError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune pretrained weights (HF GPT-2/Llama dir or a ScratchLM run) on text or chat data",
        description="Fine-tune SOURCE (a Hugging Face GPT2LMHeadModel/LlamaForCausalLM directory, or a ScratchLM "
        "run or checkpoint) on DATA with the finetune preset (lr 1e-4, short warmup, early stopping). A jsonl "
        "of {'messages': [...]} is instruction tuning: loss on the assistant's tokens only, rendered by the "
        "chat template (data.chat_template). Options as in `scratchlm train --help`.",
    )
    p.add_argument(
        "source", metavar="SOURCE", help="pretrained weights: HF model dir, ScratchLM run or checkpoint"
    )
    p.add_argument("data", metavar="DATA", help="text to fine-tune on, or a jsonl of chat conversations")
    p.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [section.key=value ...]",
        help="a YAML config file and/or dotted overrides (e.g. train.max_steps=500 train.freeze=wte.*)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and estimates; write nothing"
    )
    p.add_argument(
        "--lora",
        action="store_true",
        help="LoRA instead of full fine-tuning: train.lora.rank=8 and train.lr=2e-4 (litgpt's LoRA default); "
        "only the adapters train and are saved; train.lora.* overrides go on top",
    )
    from scratchlm.cli.train import add_console_options

    add_console_options(p)
    p.set_defaults(func=run_finetune, intermixed="args")


def is_chat_jsonl(path: str) -> bool:
    """Whether ``path`` is a .jsonl file whose first record holds ``messages`` (instruction-tuning data)."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    with open(p, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}: the first record is not valid JSON ({e.msg})") from None
                return isinstance(record, dict) and "messages" in record
    return False


def run_finetune(args: argparse.Namespace) -> int:
    from scratchlm.cli.train import run_train

    given = [a for a in args.args if "=" in a]
    implied = [
        "preset=finetune",
        f"train.init_from={args.source}",
        f"data.source={args.data}",
        f"train.name=finetune-{Path(args.source).resolve().name}",
    ]
    if is_chat_jsonl(args.data):
        implied.append("data.format=chat")
    if getattr(args, "lora", False):  # the short form; the user's own train.lora.* / train.lr come later
        implied += ["train.lora.rank=8", "train.lr=2e-4"]
    config = [a for a in args.args if "=" not in a]
    return run_train(
        argparse.Namespace(
            args=[*config, *implied, *given],
            dry_run=args.dry_run,
            resume=None,
            verbose=args.verbose,
            quiet=args.quiet,
        )
    )
