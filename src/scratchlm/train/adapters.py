"""LoRA adapters for training (``train.lora.rank > 0``): frozen base weights, a trainable low-rank update.

    h = W x + b + (alpha / r) * B A dropout(x)          A (r, in) Kaiming-uniform, B (out, r) zero

(the formula, shapes and the hand-written version: :mod:`scratchlm.reference.lora`). :func:`add_lora` turns
the ``nn.Linear`` layers whose module names match ``train.lora.targets`` (fnmatch: ``*.attn.c_q``,
``*.mlp.*``, ``encoder.*.attn.*``) into :class:`LoRALinear` in place, and freezes every other parameter.
The base weight keeps its name (``blocks.0.attn.c_q.weight``); the adapter adds ``...c_q.lora_A.weight``
and ``...c_q.lora_B.weight`` (peft's names, without its ``base_model.model.`` prefix and adapter name).

What a LoRA run saves: each checkpoint's ``model.safetensors`` holds the adapters only (:func:`lora_state`),
and ``state.json`` names the base (``"lora_base"``): the ``train.init_from`` source (whose sha256 is in the
run's ``init_from.json`` and checked when the run is loaded), or, for a model trained from scratch,
``lora_base.safetensors`` in the run directory (the seeded initial weights, written once at the start).
``scratchlm.load`` / ``generate`` / ``export`` rebuild base + adapters and merge them,
``W' = W + (alpha / r) B A`` (:func:`merge_lora`); ``scratchlm export --adapters-only`` writes the
adapters in peft's format instead (``scratchlm.model.peft_format``).

Why our own layer and not peft's at training time (peft is used for the parity tests and is the format of
``--adapters-only``): peft's ``inject_adapter_in_model`` does wrap our modules and its forward is the same
arithmetic (the tests compare both), but (1) it renames every adapted base weight (``c_q.weight`` ->
``c_q.base_layer.weight``), which every reader of our checkpoints, the HF/GGUF exports, ``init_from`` and
``explain`` would have to special-case, while a class swap keeps the names; (2) ``import peft`` imports
transformers: it adds seconds to every LoRA run's start (measured in docs/finetuning.md) and would make
the transformers stack a dependency of training; (3) the layer is 20 lines. Exact resume needs nothing
special: A's initialisation draws from the seeded torch generator before the checkpoint's RNG state is
restored, and dropout draws from the same generator as the rest of the model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from scratchlm import fileio
from scratchlm.config import Config, LoRAConfig
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.reference import lora as reference_lora
from scratchlm.reference.modules import Linear as ReferenceLinear

BASE_FILE = "lora_base.safetensors"  # the frozen base of a LoRA run trained from scratch


class LoRALinear(nn.Linear):
    """nn.Linear (frozen W, b) + (alpha / r) * lora_B(lora_A(dropout(x))).  x (..., in) -> (..., out)."""

    lora_A: nn.Linear  # (r, in)
    lora_B: nn.Linear  # (out, r)
    lora_dropout: nn.Module
    lora_alpha: float
    lora_dropout_p: float
    scaling: float  # alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            F.linear(x, self.weight, self.bias)
            + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        )


def is_adapter_key(name: str) -> bool:
    """Whether a state-dict key is an adapter weight (``....lora_A.weight`` / ``....lora_B.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a state dict (what a LoRA checkpoint stores)."""
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def adapted_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Module name -> layer, for every layer that carries an adapter."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A")}


def add_lora(model: nn.Module, lc: LoRAConfig) -> list[str]:
    """Give the linear layers matching ``lc.targets`` a LoRA adapter and freeze everything else, in place.

    Returns the adapted module names. ConfigError for a pattern that matches no linear layer (a typo would
    silently adapt nothing), or for the output head when it is tied to the embedding (its update would
    change the input embedding too). A is drawn from the torch generator (as nn.Linear initialises);
    B starts at zero, so the adapted model computes exactly what the base does.
    """
    if lc.rank <= 0:
        raise ConfigError(f"train.lora.rank must be >= 1 to add adapters, got {lc.rank}")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _inside_adapter(n)]
    for pat in lc.targets:
        if not fnmatch.filter(linears, pat):
            raise ConfigError(
                f"train.lora.targets pattern {pat!r} matches no linear layer; names look like "
                f"{', '.join(linears[:4])} (e.g. *.attn.c_q, *.mlp.*)"
            )
    chosen = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in lc.targets)]
    wte = getattr(model, "wte", None) or getattr(model, "tgt_emb", None)
    if "lm_head" in chosen and wte is not None and model.lm_head.weight is wte.weight:
        raise ConfigError(
            "train.lora.targets adapts lm_head, which is tied to the embedding (model.tie_embeddings=true); "
            "leave lm_head out of the patterns"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _attach(model.get_submodule(name), lc)
    return chosen


def _inside_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B")) or name in ("lora_A", "lora_B")


def _attach(layer: nn.Linear, lc: LoRAConfig) -> None:
    """Swap ``layer``'s class to the LoRA one (parameters stay the same objects) and add A, B, dropout."""
    kw = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    reference = isinstance(layer, ReferenceLinear)  # model.impl=reference: the hand-written forward
    layer.__class__ = reference_lora.LoRALinear if reference else LoRALinear
    layer.lora_A = nn.Linear(layer.in_features, lc.rank, bias=False, **kw)  # Kaiming-uniform(a=sqrt(5))
    layer.lora_B = nn.Linear(lc.rank, layer.out_features, bias=False, **kw)
    nn.init.zeros_(layer.lora_B.weight)
    layer.lora_dropout = nn.Dropout(lc.dropout) if lc.dropout else nn.Identity()
    layer.lora_alpha, layer.lora_dropout_p, layer.scaling = lc.alpha, lc.dropout, lc.alpha / lc.rank


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, W <- W + (alpha / r) B A, and make the layers plain again.

    In place; returns ``model``. The merged model has exactly the base model's parameter names.
    """
    for layer in adapted_layers(model).values():
        merged = reference_lora.merge(
            layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.lora_alpha
        )
        layer.weight.copy_(merged)
        reference = isinstance(layer, reference_lora.LoRALinear)
        for attr in ("lora_A", "lora_B", "lora_dropout"):
            delattr(layer, attr)
        for attr in ("lora_alpha", "lora_dropout_p", "scaling"):
            layer.__dict__.pop(attr, None)
        layer.__class__ = ReferenceLinear if reference else nn.Linear
    return model


def load_adapters(model: nn.Module, state: dict[str, torch.Tensor], where: Any) -> None:
    """Copy adapter weights into ``model`` (which has :func:`add_lora` applied). CheckpointError when the
    names or shapes differ from the model's adapters (the run's train.lora config was changed)."""
    expected = lora_state(model.state_dict())
    state = lora_state(state)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{where}: the adapters do not match train.lora in config.yaml (missing {missing[:2]}, unexpected "
            f"{unexpected[:2]}, other shape {bad_shape[:2]}); restore the run's config.yaml"
        )
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------------------------------------
# the base of a LoRA run


def base_record(cfg: Config) -> dict[str, str]:
    """What ``state.json["lora_base"]`` says the adapters were trained on."""
    if cfg.train.init_from:
        return {"kind": "init_from", "path": str(Path(cfg.train.init_from).resolve())}
    return {"kind": "run", "path": BASE_FILE}


def load_base(
    model: nn.Module, cfg: Config, run_dir: Path, write: bool = False, training: bool = False
) -> None:
    """Put the frozen base weights of a LoRA run into ``model`` (before :func:`add_lora`).

    From ``train.init_from`` (its weights are read on every start, a resumed one too: checkpoints hold
    only adapters), else from ``run_dir/lora_base.safetensors``; when that file does not exist and
    ``write`` is true (a new run from scratch, on rank 0), the model's seeded initial weights are written
    there; the other ranks of a distributed run (``training`` without ``write``) keep their seeded weights
    (the same as rank 0's, which DDP broadcasts anyway). Loading a finished run (neither) checks the source's
    sha256 against ``init_from.json``.
    """
    from scratchlm.train.checkpoint import save_weights
    from scratchlm.train.init_from import init_model, resolve_source

    run_dir = Path(run_dir)
    if cfg.train.init_from:
        if not training:
            _check_source_unchanged(run_dir, resolve_source(cfg.train.init_from))
        init_model(model, cfg, resumed=False)  # the source's weights (train.freeze is moot: all are frozen)
        return
    path = run_dir / BASE_FILE
    if path.is_file():
        state = _read_base(path)
        model.load_state_dict(state, strict=True)
    elif write:
        with fileio.atomic_path(path) as tmp:
            save_weights(model.state_dict(), tmp)
    elif not training:
        raise CheckpointError(
            f"{path} is missing: it holds the frozen base weights this LoRA run's adapters were trained on; "
            "restore it (the run cannot be loaded without it)"
        )


def _read_base(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            for dropped, kept in (f.metadata() or {}).items():
                if dropped not in state and kept in state:
                    state[dropped] = state[kept]
    except Exception as e:
        raise CheckpointError(f"{path} cannot be read ({e}); restore it from the run that made it") from None
    return state


def _check_source_unchanged(run_dir: Path, source) -> None:
    record = run_dir / "init_from.json"
    if not record.is_file():
        return
    expected = json.loads(record.read_text()).get("weights_sha256")
    digest = hashlib.sha256()
    with open(source.weights_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if expected and digest.hexdigest() != expected:
        raise CheckpointError(
            f"{source.weights_file} changed since this LoRA run was trained on it (sha256 differs from "
            f"{record}); its adapters only fit the original base: restore those weights"
        )


def setup_lora(model: nn.Module, cfg: Config, run_dir: Path, latest: Path | None, is_main: bool) -> list[str]:
    """The trainer's LoRA set-up, before the optimizer exists: base weights, adapters, and (resuming) the
    checkpoint's adapters. Returns the adapted module names."""
    from scratchlm.train.checkpoint import load_model_state

    load_base(model, cfg, run_dir, write=is_main, training=True)
    names = add_lora(model, cfg.train.lora)
    if latest is not None:
        load_adapters(model, load_model_state(latest), latest / "model.safetensors")
    return names


def adapted_model(cfg: Config, run_dir: Path, adapters: dict[str, torch.Tensor], where: Any) -> nn.Module:
    """A finished LoRA run's model: base + adapters, not merged (fp32, CPU, eval mode)."""
    from scratchlm.model import build_model

    model = build_model(cfg.model)
    load_base(model, cfg, run_dir)
    add_lora(model, cfg.train.lora)
    load_adapters(model, adapters, where)
    return model.eval()


def merged_state(cfg: Config, run_dir: Path, adapters: dict[str, torch.Tensor], where: Any) -> dict:
    """The full weights of a LoRA run (base with the adapters merged in), under the base's names."""
    return merge_lora(adapted_model(cfg, run_dir, adapters, where)).state_dict()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (a tied tensor counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = [
    "BASE_FILE",
    "LoRALinear",
    "add_lora",
    "adapted_model",
    "base_record",
    "is_adapter_key",
    "load_adapters",
    "load_base",
    "lora_state",
    "merge_lora",
    "merged_state",
    "setup_lora",
    "trainable_parameters",
]
