"""``scratchlm export RUN_DIR --out DIR``: write a trained GPT as a Hugging Face transformers checkpoint
(a LoRA run merged; ``--adapters-only``: its base plus the adapters in peft's format), or
``scratchlm export RUN_DIR --format gguf --out FILE.gguf [--dtype f32|f16|q8_0]`` for llama.cpp, or
``scratchlm export RUN_DIR --format ollama --out DIR`` (model.gguf + Modelfile) for ``ollama create``."""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained GPT to the Hugging Face format or to GGUF (llama.cpp, Ollama)",
        description="--format hf (default): write config.json, model.safetensors and tokenizer.json that "
        "transformers loads with AutoModelForCausalLM.from_pretrained(DIR). GPT-2 style models become "
        "GPT2LMHeadModel, Llama style models LlamaForCausalLM. --format gguf: write one .gguf file (llama or "
        "gpt2 architecture, with the tokenizer and chat template) for llama.cpp; --format ollama: a directory "
        "with model.gguf and a Modelfile for `ollama create NAME -f DIR/Modelfile`; see docs/serving.md.",
    )
    p.add_argument(
        "--format",
        choices=["hf", "gguf", "ollama"],
        default="hf",
        help="hf (a directory), gguf (a file) or ollama (a directory: model.gguf + Modelfile)",
    )
    p.add_argument(
        "--dtype",
        choices=["f32", "f16", "q8_0"],
        default="f16",
        help="GGUF weight type for gguf and ollama (default f16; q8_0 = 8-bit blocks; norms and biases stay f32)",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `scratchlm train`")
    p.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="hf: output directory, new or empty (created if missing); gguf: the .gguf file to write",
    )
    p.add_argument(
        "--force", action="store_true", help="write into a non-empty --out, replacing files of the same names"
    )
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to export")
    p.add_argument(
        "--adapters-only",
        action="store_true",
        help="LoRA runs (hf format): write the base model plus the adapters in peft's format "
        "(adapter_config.json, adapter_model.safetensors) instead of merging them into the weights",
    )
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from scratchlm.api import load
    from scratchlm.model.hf import export_hf

    out = Path(args.out)
    if args.adapters_only and args.format != "hf":
        raise ConfigError(
            f"--adapters-only writes peft's format next to an HF export; with --format {args.format} the "
            "adapters are merged into the weights: drop --adapters-only"
        )
    if args.format == "gguf":
        return _export_gguf(args, out)
    if args.format == "ollama":
        return _export_ollama(args, out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(
            f"--out {out} is not empty; export into a new directory, or pass --force to replace "
            "config.json, model.safetensors and tokenizer.json there"
        )
    if args.adapters_only:
        return _export_adapters(args, out)
    lm = load(args.run_dir, which=args.which, device="cpu")  # a LoRA run comes back merged
    out = export_hf(lm.model, args.out, tokenizer=lm.tokenizer)
    arch = "GPT2LMHeadModel" if lm.config.model.pos == "learned" else "LlamaForCausalLM"
    print(f"exported {lm.checkpoint} as {arch} to {out}")
    return 0


def _export_gguf(args: argparse.Namespace, out: Path) -> int:
    from scratchlm.api import load
    from scratchlm.model.gguf import export_gguf, gguf_architecture

    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the .gguf file to write")
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the directory {out.parent} does not exist")
    lm = load(args.run_dir, which=args.which, device="cpu")
    arch = gguf_architecture(lm.config.model)
    export_gguf(lm.model, lm.tokenizer, out, dtype=args.dtype)
    print(
        f"exported {lm.checkpoint} as GGUF ({arch}, {args.dtype}) to {out} ({out.stat().st_size / 1e6:.1f} MB)"
    )
    return 0


def _export_adapters(args: argparse.Namespace, out: Path) -> int:
    """The base in the HF format and the LoRA adapters in peft's, side by side in ``out``."""
    from scratchlm.config import load_run_config
    from scratchlm.model.hf import export_hf
    from scratchlm.model.peft_format import export_peft_adapters
    from scratchlm.tokenizer import load_tokenizer
    from scratchlm.train.adapters import adapted_model
    from scratchlm.train.checkpoint import find_checkpoint, load_model_state

    cfg = load_run_config(args.run_dir)
    if not cfg.train.lora.rank:
        raise ConfigError(
            f"--adapters-only: {args.run_dir} is not a LoRA run (train.lora.rank=0); export it without the flag"
        )
    ckpt = find_checkpoint(args.run_dir, args.which)
    model = adapted_model(cfg, Path(args.run_dir), load_model_state(ckpt), ckpt / "model.safetensors")
    tokenizer = load_tokenizer(Path(args.run_dir) / "tokenizer.json")
    export_hf(model, out, tokenizer=tokenizer)  # the base: export_hf reads the base weights' names only
    export_peft_adapters(model, out)
    print(f"exported the base of {ckpt} and its LoRA adapters (peft format) to {out}")
    return 0


def _export_ollama(args: argparse.Namespace, out: Path) -> int:
    from scratchlm.api import load
    from scratchlm.model.gguf import gguf_architecture
    from scratchlm.model.ollama import GGUF_NAME, export_ollama

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (it gets {GGUF_NAME} and Modelfile)")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out} is not empty; give a new directory, or pass --force to replace files")
    lm = load(args.run_dir, which=args.which, device="cpu")
    arch = gguf_architecture(lm.config.model)
    path = export_ollama(lm.model, lm.tokenizer, out, dtype=args.dtype)
    print(f"exported {lm.checkpoint} as GGUF ({arch}, {args.dtype}) + Modelfile to {out}")
    print(f"next: ollama create NAME -f {path}")
    return 0
