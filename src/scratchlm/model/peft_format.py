"""LoRA adapters in peft's format, for the Hugging Face export of their base (``export --adapters-only``).

    export_peft_adapters(model, out_dir)   -> out_dir/{adapter_config.json, adapter_model.safetensors}

``model`` is a ScratchLM GPT with adapters (``scratchlm.train.adapters``, not merged); its base is
exported next to them by :func:`scratchlm.model.hf.export_hf`, and
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR)`` then computes what the
adapted ScratchLM model does. No peft import is needed to write the files (plain JSON + safetensors).

Key names are peft's: ``base_model.model.<HF module path>.lora_A.weight`` (r, in) and ``....lora_B.weight``
(out, r), with the HF module paths of :mod:`scratchlm.model.hf`. Layout differences handled here:

- **GPT-2** fuses q, k, v into one ``c_attn`` (a Conv1D of width 3C). Separate adapters on q, k, v become one
  adapter on ``c_attn`` of rank n*r (n = how many of q, k, v are adapted): A = [A_q; A_k; A_v] stacked
  (n*r, C), B = block-diagonal (3C, n*r) with zero rows for an unadapted projection; its alpha is n*alpha, so
  the scaling alpha/r is unchanged (``rank_pattern`` / ``alpha_pattern`` in adapter_config.json). peft keeps
  LoRA weights in nn.Linear's (out, in) layout for Conv1D too (``fan_in_fan_out`` only affects merging).
- **Llama** with ``rope_style="interleaved"``: the rows of W_q / W_k are permuted for HF's rotate_half
  layout (:func:`scratchlm.model.hf._half_from_interleaved`), so the rows of B_q / B_k are permuted the same
  way (the update B A adds to exactly those rows).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratchlm import fileio
from scratchlm.errors import ConfigError
from scratchlm.model.hf import _LLAMA_LAYER, _gpt2_compatible, _half_from_interleaved, _llama_compatible

_GPT2_LAYER = {"attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}


def peft_adapters(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft state dict, adapter_config.json dict) of ``model``'s LoRA adapters (module docstring)."""
    from scratchlm.train.adapters import adapted_layers

    cfg = model.config
    layers = adapted_layers(model)
    if not layers:
        raise ConfigError(
            "the model has no LoRA adapters (train.lora.rank=0); export it without --adapters-only"
        )
    first = next(iter(layers.values()))
    r, alpha = first.lora_A.out_features, first.lora_alpha
    gpt2 = _gpt2_compatible(cfg)
    if not (gpt2 or _llama_compatible(cfg)):
        raise ConfigError("--adapters-only needs a model the HF export handles (GPT-2 or Llama style)")
    out: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    D = cfg.d_model // cfg.n_head

    def put(hf_module: str, A: torch.Tensor, B: torch.Tensor) -> None:
        out[f"base_model.model.{hf_module}.lora_A.weight"] = A.detach().float().contiguous()
        out[f"base_model.model.{hf_module}.lora_B.weight"] = B.detach().float().contiguous()

    for name, layer in layers.items():
        A, B = layer.lora_A.weight, layer.lora_B.weight
        if name == "lm_head":
            put("lm_head", A, B)
            continue
        parts = name.split(".")  # blocks.{i}.attn.c_q
        if parts[0] != "blocks" or len(parts) != 4:
            raise ConfigError(f"--adapters-only cannot place the adapter of {name} in the HF model")
        i, ours = parts[1], ".".join(parts[2:])
        if gpt2:
            if ours in ("attn.c_q", "attn.c_k", "attn.c_v"):
                continue  # fused below
            put(f"transformer.h.{i}.{_GPT2_LAYER[ours]}", A, B)
        else:
            if cfg.rope_style == "interleaved" and ours in ("attn.c_q", "attn.c_k"):
                B = _half_from_interleaved(B, D)
            put(f"model.layers.{i}.{_LLAMA_LAYER[ours]}", A, B)
    if gpt2:
        C = cfg.d_model
        for i in range(cfg.n_layer):
            qkv = [layers.get(f"blocks.{i}.attn.c_{x}") for x in "qkv"]
            n = sum(layer is not None for layer in qkv)
            if not n:
                continue
            A = torch.cat([layer.lora_A.weight for layer in qkv if layer is not None])  # (n*r, C)
            B = torch.zeros(3 * C, n * r, dtype=A.dtype)
            col = 0
            for j, layer in enumerate(qkv):
                if layer is not None:
                    B[j * C : (j + 1) * C, col : col + r] = layer.lora_B.weight
                    col += r
            module = f"transformer.h.{i}.attn.c_attn"
            put(module, A, B)
            if n > 1:
                ranks[module], alphas[module] = n * r, n * alpha
    targets = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in out})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.lora_dropout_p,
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "fan_in_fan_out": gpt2,  # GPT-2's Conv1D stores W as (in, out)
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    return out, config


def export_peft_adapters(model: torch.nn.Module, out_dir: str | os.PathLike) -> Path:
    """Write adapter_config.json and adapter_model.safetensors into ``out_dir`` (atomically, per file)."""
    tensors, config = peft_adapters(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    fileio.write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out
