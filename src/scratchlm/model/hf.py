"""Convert between ScratchLM GPTs and Hugging Face checkpoints (GPT2LMHeadModel, LlamaForCausalLM).

    export_hf(model, out_dir, tokenizer=None)   -> out_dir/{config.json, model.safetensors[, tokenizer.json]}
    model, cfg = import_hf(path)                 <- a directory saved by export_hf or by transformers

Neither function needs transformers: config.json is written and read as plain JSON, weights go through
safetensors (or, for old GPT-2 directories, ``pytorch_model.bin`` with ``torch.load(weights_only=True)``).

Layout differences handled here:
  - GPT-2 stores its linear layers as ``Conv1D`` with weight (in, out): the transpose of nn.Linear's (out, in),
    and fuses q, k, v into one ``c_attn`` of width 3C (split/concatenated here).
  - HF Llama applies RoPE with ``rotate_half`` (pairs (i, i + D/2)), which is our rope_style="half"; a model
    trained with rope_style="interleaved" is exported by permuting the rows of W_q and W_k within each head.
  - Tied output heads are written once (the embedding), as transformers expects.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scratchlm.config import ModelConfig
from scratchlm.errors import CheckpointError, ConfigError
from scratchlm.model.gpt import GPT
from scratchlm.model.layers import mlp_hidden_dim

# model.mlp <-> GPT2Config.activation_function (transformers' ACT2FN: "gelu_new" and "gelu_pytorch_tanh"
# are the tanh approximation, "gelu" the exact erf form)
_GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_FROM_GPT2_ACTIVATION = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_compatible(cfg: ModelConfig) -> bool:
    return (
        cfg.norm == "layernorm"
        and cfg.pos == "learned"
        and cfg.mlp in _GPT2_ACTIVATION
        and (cfg.n_kv_head or cfg.n_head) == cfg.n_head
        and not cfg.qk_norm
        and cfg.norm_position == "pre"
    )


def _llama_compatible(cfg: ModelConfig) -> bool:
    return (
        cfg.norm == "rmsnorm"
        and cfg.pos == "rope"
        and cfg.mlp == "swiglu"
        and not cfg.qk_norm
        and cfg.norm_position == "pre"
    )


# ----------------------------------------------------------------------------------------------------------
# export


def export_hf(model: GPT, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``model`` as a transformers checkpoint directory; returns out_dir.

    GPT-2 style (layernorm, learned positions, gelu_tanh or gelu) -> GPT2LMHeadModel; a model trained without
    biases (``bias=false``) is written with zero biases, which GPT-2 always has, so its logits are unchanged.
    Llama style (rmsnorm, rope, swiglu) -> LlamaForCausalLM. Anything else raises ConfigError.
    With a tokenizer, its ``save`` writes tokenizer.json and its eot id becomes bos/eos_token_id; a chat
    template stored with it goes to tokenizer_config.json (``chat_template``, the Jinja that transformers'
    ``apply_chat_template`` renders). ``generation_config.json`` says where generation stops
    (:func:`generation_config`).
    Files are written under temporary names and renamed, so a crash leaves no half-written file.
    """
    cfg = model.config
    if not isinstance(model, GPT):
        raise ConfigError("export to the HF format supports decoder-only GPT models (arch=gpt), not seq2seq")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    eot = getattr(tokenizer, "eot_id", None)
    if _gpt2_compatible(cfg):
        config, tensors = _gpt2_config(cfg, eot), _to_gpt2(sd, cfg)
    elif _llama_compatible(cfg):
        config, tensors = _llama_config(cfg, eot), _to_llama(sd, cfg)
    else:
        raise ConfigError(
            "export needs a GPT-2 style (layernorm, learned pos, gelu_tanh or gelu) or Llama style "
            "(rmsnorm, rope, swiglu) model with pre-LN and no qk_norm"
        )
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    if tokenizer is not None:
        from scratchlm.tokenizer.chat_template import save_chat_template

        tokenizer.save(out / "tokenizer.json")
        save_chat_template(tokenizer, out)
    tmp = out / "generation_config.json.tmp"
    tmp.write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
    os.replace(tmp, out / "generation_config.json")
    return out


def generation_config(tokenizer) -> dict:
    """transformers' ``generation_config.json``: where ``generate`` stops.

    ``eos_token_id`` is the end-of-text id. A chat-tuned run (a chat template stored with its tokenizer)
    ends each turn with the template's end-of-turn marker (``<|im_end|>``), which ScratchLM writes as
    text, not as one special token (tokenizer/chat_template.py): the model emits it as several ordinary
    tokens, so it goes into ``stop_strings``, which ``generate`` honours when given the tokenizer
    (``model.generate(ids, tokenizer=tok)``; the text-generation pipeline passes it itself).
    """
    eot = getattr(tokenizer, "eot_id", None)
    config: dict = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
    if getattr(tokenizer, "chat_template", None):
        from scratchlm.tokenizer.chat_template import chat_template_of

        config["stop_strings"] = list(chat_template_of(tokenizer).stop)
    return config


def _gpt2_config(cfg: ModelConfig, eot: int | None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": mlp_hidden_dim(cfg),
        "activation_function": _GPT2_ACTIVATION[cfg.mlp],
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def _llama_config(cfg: ModelConfig, eot: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": mlp_hidden_dim(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": cfg.d_model // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def _to_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    def bias(name: str) -> torch.Tensor:  # bias=false: GPT-2's bias is zero, i.e. no bias at all
        weight = sd[name + ".weight"]
        return sd.get(name + ".bias", torch.zeros(weight.shape[0], dtype=weight.dtype))

    out = {
        "transformer.wte.weight": sd["wte.weight"],
        "transformer.wpe.weight": sd["wpe.weight"],
        "transformer.ln_f.weight": sd["ln_f.weight"],
        "transformer.ln_f.bias": bias("ln_f"),
    }
    for i in range(cfg.n_layer):
        a, h = f"blocks.{i}.", f"transformer.h.{i}."
        for n in ("ln_1", "ln_2"):
            out[h + n + ".weight"], out[h + n + ".bias"] = sd[a + n + ".weight"], bias(a + n)
        qkv = [sd[f"{a}attn.c_{x}.weight"] for x in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # Conv1D: (in, out)
        out[h + "attn.c_attn.bias"] = torch.cat([bias(f"{a}attn.c_{x}") for x in "qkv"])
        for ours, theirs in (
            ("attn.c_proj", "attn.c_proj"),
            ("mlp.c_fc", "mlp.c_fc"),
            ("mlp.c_proj", "mlp.c_proj"),
        ):
            out[h + theirs + ".weight"] = sd[a + ours + ".weight"].t()
            out[h + theirs + ".bias"] = bias(a + ours)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _half_from_interleaved(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the rows of W_q / W_k (H*D, C) so features (2i, 2i+1) become (i, i + D/2) in every head."""
    perm = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return w.unflatten(0, (-1, head_dim))[:, perm].flatten(0, 1)


_LLAMA_LAYER = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_gate": "mlp.gate_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
}


def _to_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    D = cfg.d_model // cfg.n_head
    for i in range(cfg.n_layer):
        for ours, theirs in _LLAMA_LAYER.items():
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{ours}.{kind}"
                if key not in sd:
                    continue
                t = sd[key]
                if cfg.rope_style == "interleaved" and ours in ("attn.c_q", "attn.c_k"):
                    t = _half_from_interleaved(t, D)
                out[f"model.layers.{i}.{theirs}.{kind}"] = t
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ----------------------------------------------------------------------------------------------------------
# import


def import_hf(path: str | os.PathLike) -> tuple[GPT, ModelConfig]:
    """Load a local GPT2LMHeadModel or LlamaForCausalLM directory (config.json + weights) as a ScratchLM GPT.

    Weights: model.safetensors, sharded model.safetensors.index.json, or pytorch_model.bin (loaded with
    weights_only=True). The model comes back in fp32 on the CPU, in eval mode, with dropout 0.
    """
    path = Path(path)
    cfg = hf_model_config(path)
    kind = "gpt2" if cfg.pos == "learned" else "llama"
    sd = _load_weights(path)
    model = GPT(cfg)
    try:
        ours = _from_gpt2(sd, cfg) if kind == "gpt2" else _from_llama(sd, cfg)
    except KeyError as e:
        raise CheckpointError(
            f"{path}: weight {e} is missing; the checkpoint does not match config.json"
        ) from None
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["wte.weight"]
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in ours.items()}, strict=False)
    except RuntimeError as e:  # shape mismatch between config.json and the weights
        raise CheckpointError(
            f"{path}: weights do not match config.json ({str(e).splitlines()[-1].strip()})"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.eval(), cfg


def hf_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GPT2LMHeadModel / LlamaForCausalLM directory, read from its config.json alone."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"'{path}' is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}); re-download or re-export it") from None
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _config_from_gpt2(hf)
    if kind == "llama":
        return _config_from_llama(hf, config_file)
    raise CheckpointError(f"{config_file}: model_type {kind!r} is not supported (gpt2 or llama)")


def _config_from_gpt2(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _FROM_GPT2_ACTIVATION:
        raise CheckpointError(
            f"GPT-2 activation {act!r} is not supported ({', '.join(_FROM_GPT2_ACTIVATION)})"
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise CheckpointError(
            "GPT-2 options scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are unsupported"
        )
    d_model = hf.get("n_embd", 768)
    return ModelConfig(
        arch="gpt",
        vocab_size=hf.get("vocab_size", 50257),
        context_length=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        d_model=d_model,
        d_ff=hf.get("n_inner") or 4 * d_model,
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pos="learned",
        mlp=_FROM_GPT2_ACTIVATION[act],
        bias=True,
        dropout=0.0,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def _config_from_llama(hf: dict, where: Path) -> ModelConfig:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(
            f"{where}: RoPE scaling {rope.get('rope_type')!r} is not supported (default only)"
        )
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise CheckpointError(f"{where}: needs hidden_act=silu and attention_bias == mlp_bias")
    d_model, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d_model // n_head):
        raise CheckpointError(f"{where}: head_dim {hf['head_dim']} != hidden_size/num_attention_heads")
    return ModelConfig(
        arch="gpt",
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        d_model=d_model,
        d_ff=hf["intermediate_size"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        pos="rope",
        rope_style="half",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
        mlp="swiglu",
        bias=bool(hf.get("attention_bias", False)),
        dropout=0.0,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
    )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(str(path / shard)))
        return sd
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"{path}/pytorch_model.bin holds pickled objects, not only tensors; it was not loaded "
                "(never unpickle an untrusted file): convert it to model.safetensors"
            ) from None
    raise CheckpointError(f"'{path}' has no model.safetensors or pytorch_model.bin")


def _from_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # old checkpoints have no prefix
    C = cfg.d_model
    out = {
        "wte.weight": sd["wte.weight"],
        "wpe.weight": sd["wpe.weight"],
        "ln_f.weight": sd["ln_f.weight"],
        "ln_f.bias": sd["ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        h, a = f"h.{i}.", f"blocks.{i}."
        for n in ("ln_1", "ln_2"):
            out[a + n + ".weight"], out[a + n + ".bias"] = sd[h + n + ".weight"], sd[h + n + ".bias"]
        w, b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]  # (3C, C), (3C,)
        for j, x in enumerate("qkv"):
            out[f"{a}attn.c_{x}.weight"], out[f"{a}attn.c_{x}.bias"] = (
                w[j * C : (j + 1) * C],
                b[j * C : (j + 1) * C],
            )
        for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[a + n + ".weight"], out[a + n + ".bias"] = sd[h + n + ".weight"].t(), sd[h + n + ".bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _from_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"wte.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layer):
        for ours, theirs in _LLAMA_LAYER.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{theirs}.{kind}"
                if key in sd:
                    out[f"blocks.{i}.{ours}.{kind}"] = sd[key]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out
