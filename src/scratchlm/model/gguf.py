"""Export a trained GPT to GGUF, the file format of llama.cpp and Ollama (through the ``gguf`` package).

    export_gguf(model, tokenizer, "model.gguf", dtype="f16")     # scratchlm export RUN --format gguf

What is written:

- **Architecture.** A Llama-style model (rmsnorm, RoPE, SwiGLU, pre-LN) as ``llama``; a GPT-2-style model
  (layernorm, learned positions, tanh-GELU, pre-LN) as ``gpt2``; one trained without biases (``bias=false``)
  gets zero biases, which llama.cpp's gpt2 graph requires (the HF export does the same; logits unchanged). Anything else (the encoder-decoder,
  post-LN, qk-norm, sinusoidal positions...) is a :class:`ConfigError` naming what GGUF cannot express.
- **Tensors**, as llama.cpp names them (``token_embd``, ``blk.N.attn_q``, ``blk.N.ffn_gate``, ``output``...),
  each in nn.Linear's (out, in) layout. GPT-2 fuses q, k, v into ``attn_qkv``. A tied output head
  (``tie_embeddings``) is not written a second time: with no ``output.weight`` llama.cpp (llama and gpt2)
  uses ``token_embd.weight`` for the output, as transformers' GGUF reader does.
- **RoPE layout.** llama.cpp's ``llama`` architecture rotates adjacent feature pairs (2i, 2i+1) (its
  "normal" mode, the RoPE paper's). A ``rope_style="half"`` model rotates (i, i + D/2) (HF's rotate_half),
  so the rows of W_q and W_k are permuted within each head, as llama.cpp's own convert_hf_to_gguf.py does:
  ``row (i) of the half layout -> row (2i)`` and ``row (i + D/2) -> row (2i + 1)``.
- **Tokenizer**: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) with every token in the byte-to-unicode
  spelling of GPT-2, the merges in rank order, the pre-tokenizer type (``gpt-2`` for the GPT-2 regex,
  ``llama-bpe`` for the GPT-4/cl100k one; another regex cannot be named in GGUF and is refused), special
  tokens as control tokens, and the end-of-text id as bos, eos and eot (no bos is added to prompts).
- **Chat template**: ``tokenizer.chat_template``, the Jinja text of the template ``scratchlm chat`` uses
  (the one stored with the tokenizer, ``plain`` if none), so llama.cpp and Ollama format turns as ScratchLM
  does (llama.cpp recognises ChatML by its ``<|im_start|>``). Its end-of-turn marker is text, not a token:
  llama.cpp's callers stop at it as a stop string (the Ollama Modelfile's ``PARAMETER stop``).
- **dtype**: ``f32``; ``f16`` (matrices in float16, norms and biases stay f32, as llama.cpp requires);
  ``q8_0`` (matrices in blocks of 32 int8 with one f16 scale: about 8.5 bits per weight; a matrix whose rows
  are not a multiple of 32 stays f16).

The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError
from scratchlm.model.hf import _gpt2_compatible, _llama_compatible
from scratchlm.model.layers import mlp_hidden_dim
from scratchlm.tokenizer.chat_template import chat_template_of
from scratchlm.tokenizer.hf_format import bytes_to_str
from scratchlm.tokenizer.pretokenize import GPT2_PATTERN, GPT4_PATTERN

DTYPES = ("f32", "f16", "q8_0")
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", GPT4_PATTERN: "llama-bpe"}  # llama.cpp's names for the regexes
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp token types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'scratchlm[gguf]'") from None
    return gguf


def gguf_architecture(cfg: ModelConfig) -> str:
    """``llama`` or ``gpt2`` for a model GGUF can express; else a ConfigError naming why not."""
    if getattr(cfg, "arch", "gpt") != "gpt":
        raise ConfigError(
            f"GGUF export supports decoder-only models; this run is arch={cfg.arch!r} (an encoder-decoder has "
            "no llama.cpp architecture to map to)"
        )
    if _llama_compatible(cfg) and not cfg.bias:
        return "llama"
    if _gpt2_compatible(cfg) and cfg.mlp == "gelu_tanh":  # llama.cpp's gpt2: tanh GELU (biases: zero if none)
        return "gpt2"
    raise ConfigError(
        "GGUF export needs a Llama-style model (rmsnorm, rope, swiglu, pre-LN, no biases, no qk_norm) or a "
        "GPT-2-style one (layernorm, learned positions, gelu_tanh, pre-LN); this one is "
        f"norm={cfg.norm}, pos={cfg.pos}, mlp={cfg.mlp}, bias={cfg.bias}, norm_position={cfg.norm_position}, "
        f"qk_norm={cfg.qk_norm}"
    )


def interleaved_from_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of W_q / W_k (H*D, C): rotate_half pairs (i, i + D/2) -> adjacent pairs (2i, 2i + 1), per head."""
    perm = torch.stack(
        (torch.arange(head_dim // 2), torch.arange(head_dim // 2) + head_dim // 2), 1
    ).flatten()
    return w.unflatten(0, (-1, head_dim))[:, perm].flatten(0, 1)


def gguf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> float32 tensor (out, in), in llama.cpp's layout (module docstring)."""
    cfg = model.config
    arch = gguf_architecture(cfg)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["wte.weight"], "output_norm.weight": sd["ln_f.weight"]}
    if not cfg.tie_embeddings:  # tied: llama.cpp reads token_embd for the output (no second copy)
        out["output.weight"] = sd["lm_head.weight"]

    def bias(name: str) -> torch.Tensor:  # bias=false: zero biases for llama.cpp's gpt2 graph
        return sd.get(name + ".bias", torch.zeros(sd[name + ".weight"].shape[0]))

    if arch == "gpt2":
        out["position_embd.weight"] = sd["wpe.weight"]
        out["output_norm.bias"] = bias("ln_f")
    D = cfg.d_model // cfg.n_head
    for i in range(cfg.n_layer):
        a, g = f"blocks.{i}.", f"blk.{i}."
        if arch == "llama":
            q, k = sd[a + "attn.c_q.weight"], sd[a + "attn.c_k.weight"]
            if cfg.rope_style == "half":
                q, k = interleaved_from_half(q, D), interleaved_from_half(k, D)
            names = {
                "attn_norm.weight": sd[a + "ln_1.weight"],
                "attn_q.weight": q,
                "attn_k.weight": k,
                "attn_v.weight": sd[a + "attn.c_v.weight"],
                "attn_output.weight": sd[a + "attn.c_proj.weight"],
                "ffn_norm.weight": sd[a + "ln_2.weight"],
                "ffn_gate.weight": sd[a + "mlp.c_gate.weight"],
                "ffn_up.weight": sd[a + "mlp.c_fc.weight"],
                "ffn_down.weight": sd[a + "mlp.c_proj.weight"],
            }
        else:
            names = {"attn_qkv.weight": torch.cat([sd[f"{a}attn.c_{x}.weight"] for x in "qkv"])}
            names["attn_qkv.bias"] = torch.cat([bias(f"{a}attn.c_{x}") for x in "qkv"])
            for ours, theirs in (
                ("ln_1", "attn_norm"),
                ("attn.c_proj", "attn_output"),
                ("ln_2", "ffn_norm"),
                ("mlp.c_fc", "ffn_up"),
                ("mlp.c_proj", "ffn_down"),
            ):
                names[theirs + ".weight"] = sd[a + ours + ".weight"]
                names[theirs + ".bias"] = bias(a + ours)
        out.update({g + n: t for n, t in names.items()})
    return out


def export_gguf(model: torch.nn.Module, tokenizer, path: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``path`` (module docstring); returns the path."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf = _gguf()
    cfg = model.config
    arch = gguf_architecture(cfg)
    tensors = gguf_tensors(model)  # checks the model before anything is written
    tokens, types, merges, pre = _tokenizer_tables(tokenizer, cfg.vocab_size)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(path.stem)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(mlp_hidden_dim(cfg))
    writer.add_head_count(cfg.n_head)
    if arch == "llama":
        writer.add_head_count_kv(cfg.n_kv_head or cfg.n_head)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_rope_dimension_count(cfg.d_model // cfg.n_head)
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
    else:
        writer.add_layer_norm_eps(float(cfg.norm_eps))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        dtype, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template_of(tokenizer).jinja)
    for name, t in tensors.items():
        array = t.numpy()
        if dtype == "f32" or array.ndim == 1:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif dtype == "q8_0" and array.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def _tokenizer_tables(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges "a b", pre-tokenizer name) of a byte-level BPE tokenizer for GGUF."""
    if not hasattr(tokenizer, "merges") or not hasattr(tokenizer, "pattern"):
        raise ConfigError(
            f"GGUF export needs the byte-level BPE tokenizer; this run has a {type(tokenizer).__name__}, which "
            "llama.cpp cannot express"
        )
    pre = PRE_TOKENIZERS.get(tokenizer.pattern)
    if pre is None:
        raise ConfigError(
            "GGUF names only known pre-tokenizers; this tokenizer's regex is neither the gpt2 nor the gpt4 "
            "pattern, so llama.cpp would split text differently. Retrain it with --pattern gpt2 or gpt4"
        )
    specials = {i: s for s, i in tokenizer.special_tokens.items()}
    n = tokenizer.vocab_size
    if n != vocab_size:
        raise ConfigError(f"the tokenizer has {n} ids but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(n):
        if i in specials:
            tokens.append(specials[i])
            types.append(TOKEN_CONTROL)
        else:
            tokens.append(bytes_to_str(tokenizer.decode_bytes([i])))
            types.append(TOKEN_NORMAL)
    merges = [f"{tokens[a]} {tokens[b]}" for a, b in tokenizer.merges]
    return tokens, types, merges, pre
