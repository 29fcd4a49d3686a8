"""Stanford CS336 (assignment 1) names for the reference modules: the config and the weight-name mapping.

CS336's ``TransformerLM`` is the Llama flavour: pre-norm RMSNorm (eps 1e-5), RoPE on interleaved pairs
(x_{2i}, x_{2i+1}), SwiGLU ``W2(SiLU(W1 x) * W3 x)``, no biases, an untied output head. :func:`cs336_config`
gives the :class:`~scratchlm.config.ModelConfig` of that model, and :func:`from_cs336` /
:func:`to_cs336` rename the weights between the course's state dict and ScratchLM's (the same tensors;
no transposes: both store a linear layer's weight as (out, in)):

    token_embeddings.weight            <-> wte.weight
    layers.{i}.ln1.weight              <-> blocks.{i}.ln_1.weight
    layers.{i}.attn.q_proj.weight      <-> blocks.{i}.attn.c_q.weight      (k_proj -> c_k, v_proj -> c_v)
    layers.{i}.attn.output_proj.weight <-> blocks.{i}.attn.c_proj.weight
    layers.{i}.ln2.weight              <-> blocks.{i}.ln_2.weight
    layers.{i}.ffn.w1.weight           <-> blocks.{i}.mlp.c_gate.weight    (inside the SiLU)
    layers.{i}.ffn.w3.weight           <-> blocks.{i}.mlp.c_fc.weight      (the linear branch)
    layers.{i}.ffn.w2.weight           <-> blocks.{i}.mlp.c_proj.weight
    ln_final.weight                    <-> ln_f.weight
    lm_head.weight                     <-> lm_head.weight
"""

from __future__ import annotations

import re

import torch

from scratchlm.config import ModelConfig

_LAYER = {
    "ln1": "ln_1",
    "attn.q_proj": "attn.c_q",
    "attn.k_proj": "attn.c_k",
    "attn.v_proj": "attn.c_v",
    "attn.output_proj": "attn.c_proj",
    "ln2": "ln_2",
    "ffn.w1": "mlp.c_gate",
    "ffn.w3": "mlp.c_fc",
    "ffn.w2": "mlp.c_proj",
}
_TOP = {"token_embeddings": "wte", "ln_final": "ln_f", "lm_head": "lm_head"}


def cs336_config(
    vocab_size: int,
    context_length: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    d_ff: int,
    rope_theta: float,
) -> ModelConfig:
    """The ModelConfig of CS336's ``TransformerLM(vocab_size, context_length, d_model, num_layers, num_heads,
    d_ff, rope_theta)`` (the arguments of ``run_transformer_lm``)."""
    return ModelConfig(
        vocab_size=vocab_size,
        context_length=context_length,
        d_model=d_model,
        n_layer=num_layers,
        n_head=num_heads,
        d_ff=d_ff,
        rope_theta=rope_theta,
        norm="rmsnorm",
        norm_eps=1e-5,
        pos="rope",
        rope_style="interleaved",
        mlp="swiglu",
        bias=False,
        tie_embeddings=False,
    )


def _rename(name: str, table: dict[str, str], layer_from: str, layer_to: str) -> str:
    m = re.fullmatch(rf"{layer_from}\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in table:
        return f"{layer_to}.{m.group(1)}.{table[m.group(2)]}.weight"
    top = name.removesuffix(".weight")
    if name.endswith(".weight") and top in table:
        return f"{table[top]}.weight"
    raise KeyError(f"{name!r} is not a weight of the CS336 TransformerLM / its ScratchLM twin")


def from_cs336(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CS336 weight names -> ScratchLM's (for ``TransformerLM(cs336_config(...)).load_state_dict``)."""
    table = {**_LAYER, **_TOP}
    return {_rename(k, table, "layers", "blocks"): v for k, v in state_dict.items()}


def to_cs336(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ScratchLM weight names (a GPT or TransformerLM of :func:`cs336_config`) -> CS336's."""
    table = {v: k for k, v in {**_LAYER, **_TOP}.items()}
    return {_rename(k, table, "blocks", "layers"): v for k, v in state_dict.items()}
