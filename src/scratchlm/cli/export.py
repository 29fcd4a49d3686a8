"""``scratchlm export RUN_DIR --out DIR``: write a trained GPT as a Hugging Face transformers checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained GPT to the Hugging Face format (GPT2LMHeadModel / LlamaForCausalLM)",
        description="Write config.json, model.safetensors and tokenizer.json that transformers loads with "
        "AutoModelForCausalLM.from_pretrained(DIR). GPT-2 style models become GPT2LMHeadModel, Llama style "
        "models LlamaForCausalLM.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `scratchlm train`")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory: new or empty (created if missing)"
    )
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out, replacing files of the same names"
    )
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to export")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from scratchlm.api import load
    from scratchlm.model.hf import export_hf

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(
            f"--out {out} is not empty; export into a new directory, or pass --force to replace "
            "config.json, model.safetensors and tokenizer.json there"
        )
    lm = load(args.run_dir, which=args.which, device="cpu")
    out = export_hf(lm.model, args.out, tokenizer=lm.tokenizer)
    arch = "GPT2LMHeadModel" if lm.config.model.pos == "learned" else "LlamaForCausalLM"
    print(f"exported {lm.checkpoint} as {arch} to {out}")
    return 0
