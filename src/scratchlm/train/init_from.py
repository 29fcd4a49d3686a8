"""Start a run from pretrained weights (``train.init_from=PATH``) and freeze parameters (``train.freeze``).

A source is one of

- a Hugging Face model directory: ``config.json`` of a GPT2LMHeadModel or LlamaForCausalLM, its weights
  (``model.safetensors``, sharded safetensors, or a ``pytorch_model.bin`` that ``torch.load(weights_only=True)``
  reads) and its tokenizer files (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``);
- a ScratchLM run directory (its ``best/`` checkpoint, else the latest) or one checkpoint directory of a run
  (``runs/x/checkpoints/step_00001000``, ``runs/x/best``).

What comes from the source: the whole model config and the tokenizer (:func:`apply_init_from`). A
``model.*`` or ``tokenizer.*`` value that the user set (one that differs from the default) and that differs
from the source's is refused by name; only ``model.dropout``, ``model.attention`` and
``model.label_smoothing`` may be chosen freely, since they do not change the weights. What starts fresh: the
optimizer, the learning-rate schedule, the step counter and the data order (it is a new run).
What is recorded: ``train.init_from`` in the run's config.yaml, and ``init_from.json`` (the resolved source,
its kind and the sha256 of the weights file read).

Resuming a fine-tuning run is like resuming any run: the checkpoint's weights replace the source's, so the
source is only read for its config and tokenizer (it must still exist).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from scratchlm.config import Config, ModelConfig, TokenizerConfig, load_run_config, parse_overrides
from scratchlm.errors import CheckpointError, ConfigError

# model fields that do not change the weights: a fine-tuning run may choose them
FREE_MODEL_FIELDS = ("dropout", "attention", "label_smoothing")
# tokenizer fields that describe how to obtain the tokenizer (they come from the source)
_TOKENIZER_FIELDS = ("kind", "path", "vocab_size", "special_tokens", "pattern")


@dataclass
class InitSource:
    """A resolved ``train.init_from``: where the weights, model config and tokenizer are."""

    path: Path  # as given
    kind: str  # "hf" | "scratchlm"
    model: ModelConfig  # the source's architecture (vocab_size resolved)
    tokenizer_path: Path  # file or directory for load_tokenizer
    weights: Path  # HF directory, or a ScratchLM checkpoint directory

    @property
    def weights_file(self) -> Path:
        """The file the weights are read from (for the record)."""
        if self.kind == "scratchlm":
            return self.weights / "model.safetensors"
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if (self.weights / name).is_file():
                return self.weights / name
        raise CheckpointError(f"'{self.weights}' has no model.safetensors or pytorch_model.bin")


def resolve_source(path: str | os.PathLike) -> InitSource:
    """Find what ``path`` is (HF model dir, ScratchLM run dir, checkpoint dir); CheckpointError if none."""
    from scratchlm.train.checkpoint import find_checkpoint

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(
            f"train.init_from={path}: no such directory; give a Hugging Face model directory (config.json + "
            "weights + tokenizer files) or a ScratchLM run or checkpoint directory"
        )
    if (p / "config.json").is_file():
        from scratchlm.model.hf import hf_model_config

        return InitSource(p, "hf", hf_model_config(p), p, p)
    if (p / "config.yaml").is_file():  # a run directory
        run_dir, ckpt = p, find_checkpoint(p, "best")
    elif (p / "model.safetensors").is_file() and (p / "state.json").is_file():  # a checkpoint directory
        run_dir = next((d for d in (p.parent, p.parent.parent) if (d / "config.yaml").is_file()), None)
        if run_dir is None:
            raise CheckpointError(
                f"train.init_from={path}: a checkpoint outside a run directory (no config.yaml)"
            )
        ckpt = p
    else:
        raise CheckpointError(
            f"train.init_from={path} is neither a Hugging Face model directory (config.json) nor a ScratchLM "
            "run (config.yaml) or checkpoint (model.safetensors + state.json)"
        )
    cfg = load_run_config(run_dir)
    if cfg.model.arch != "gpt":
        raise ConfigError(
            f"train.init_from={path} is a {cfg.model.arch} run; fine-tuning takes decoder models"
        )
    return InitSource(p, "scratchlm", cfg.model, run_dir / "tokenizer.json", ckpt)


def explicit_keys(config_path: str | os.PathLike | None, overrides: list[str]) -> set[str]:
    """The dotted keys a user wrote (in the YAML file or as overrides), so that an override equal to the
    default (``model.n_layer=4``) is still checked against the source; the CLI passes them."""
    keys = {f"{sec}.{k}" for sec, kv in parse_overrides(overrides).items() if sec != "preset" for k in kv}
    if config_path is not None:
        values = yaml.safe_load(Path(config_path).read_text()) or {}
        keys |= {f"{sec}.{k}" for sec, kv in values.items() if isinstance(kv, dict) for k in kv}
    return keys


def apply_init_from(
    cfg: Config, explicit: set[str] | frozenset[str] = frozenset()
) -> tuple[Config, InitSource]:
    """``cfg`` with the model config and tokenizer of ``cfg.train.init_from``. ConfigError naming the key of
    a conflicting value: one that differs from the source's and was either written by the user (``explicit``
    dotted keys) or differs from the default. Idempotent (a resumed run's saved config passes unchanged)."""
    from scratchlm.tokenizer import CharTokenizer, load_tokenizer

    source = resolve_source(cfg.train.init_from)
    tok = load_tokenizer(source.tokenizer_path)
    if tok.vocab_size > source.model.vocab_size:
        raise CheckpointError(
            f"train.init_from={source.path}: the tokenizer has {tok.vocab_size} tokens but the model only "
            f"{source.model.vocab_size} embeddings; it is not this model's tokenizer"
        )
    model = _merge("model", cfg.model, ModelConfig(), source.model, FREE_MODEL_FIELDS, source.path, explicit)
    pattern = getattr(tok, "pattern_name", TokenizerConfig().pattern)
    derived = dataclasses.replace(
        TokenizerConfig(),
        kind="char" if isinstance(tok, CharTokenizer) else "bpe",
        path=str(source.tokenizer_path),
        vocab_size=tok.vocab_size,
        special_tokens=sorted(tok.special_tokens, key=tok.special_tokens.get),
        pattern=pattern if pattern in ("gpt2", "gpt4") else TokenizerConfig().pattern,
    )
    free = tuple(f.name for f in dataclasses.fields(TokenizerConfig) if f.name not in _TOKENIZER_FIELDS)
    tokenizer = _merge("tokenizer", cfg.tokenizer, TokenizerConfig(), derived, free, source.path, explicit)
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer), source


def _merge(
    section: str, given, default, source_value, free: tuple[str, ...], where: Path, explicit=frozenset()
):
    """The source's values, except the ``free`` fields (the user's); a set field that differs is an error."""
    values = {}
    for f in dataclasses.fields(type(given)):
        mine, theirs = getattr(given, f.name), getattr(source_value, f.name)
        if f.name in free:
            values[f.name] = mine
            continue
        written = f"{section}.{f.name}" in explicit or mine != getattr(default, f.name)
        if written and mine != theirs:
            raise ConfigError(
                f"{section}.{f.name}={mine!r} conflicts with train.init_from={where}, whose {section}.{f.name} "
                f"is {theirs!r}; drop the override (the {section} comes from the pretrained source)"
            )
        values[f.name] = theirs
    return type(given)(**values)


def source_state_dict(source: InitSource) -> dict[str, torch.Tensor]:
    """The source's weights under ScratchLM names (fp32, CPU)."""
    if source.kind == "hf":
        from scratchlm.model.hf import import_hf

        return import_hf(source.weights)[0].state_dict()
    from scratchlm.train.checkpoint import load_model_state

    state = load_model_state(source.weights)
    run_dir = Path(source.tokenizer_path).parent
    cfg = load_run_config(run_dir)
    if cfg.train.lora.rank:  # a LoRA run's checkpoint holds adapters: merged into their base
        from scratchlm.train.adapters import merged_state

        state = merged_state(cfg, run_dir, state, source.weights / "model.safetensors")
    return state


def init_model(model: torch.nn.Module, cfg: Config, resumed: bool) -> None:
    """Before the optimizer exists: load ``train.init_from``'s weights into a new run's ``model`` (a resumed
    run has its checkpoint's weights already), then freeze the ``train.freeze`` parameters (every time)."""
    tc = cfg.train
    if tc.init_from and not resumed:
        source = resolve_source(tc.init_from)
        state = source_state_dict(source)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
        if unexpected or set(missing) - tied:
            raise CheckpointError(
                f"train.init_from={source.path}: weights do not match its config "
                f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
    freeze_parameters(model, tc.freeze)


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name matches a pattern (fnmatch: ``wte.*``,
    ``blocks.[01].*``, ``*.ln_*``); returns the frozen names. ConfigError for a pattern that matches
    nothing (a typo would silently train everything) or one that freezes every parameter."""
    if not patterns:
        return []
    names = [n for n, _ in model.named_parameters()]
    for pat in patterns:
        if not fnmatch.filter(names, pat):
            raise ConfigError(
                f"train.freeze pattern {pat!r} matches no parameter; names look like {', '.join(names[:4])}"
            )
    frozen = []
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(name)
    if all(not p.requires_grad for p in model.parameters()):
        raise ConfigError(f"train.freeze={patterns} freezes every parameter; nothing would be trained")
    return frozen


def record_init_source(run_dir: Path, source: InitSource) -> Path:
    """Write ``run_dir/init_from.json``: where the run started (path, kind, weights file and its sha256)."""
    weights = source.weights_file
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = {
        "init_from": str(source.path),
        "resolved": str(source.path.resolve()),
        "kind": source.kind,
        "weights": str(weights.resolve()),
        "weights_sha256": digest.hexdigest(),
        "tokenizer": str(Path(source.tokenizer_path).resolve()),
    }
    path = Path(run_dir) / "init_from.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path
