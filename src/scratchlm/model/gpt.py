"""Decoder-only Transformer language model: GPT-2 style and Llama style from one ModelConfig.

    idx (B, T) -> wte (+ wpe | sinusoid) -> dropout -> n_layer x Block -> ln_f -> lm_head -> logits (B, T, V)
    pos=sinusoidal: wte(idx) * sqrt(C) + PE, as "Attention Is All You Need" section 3.4 (and seq2seq.py)
    Block (pre-LN):  x = x + attn(norm_1(x));  x = x + mlp(norm_2(x))
    Block (post-LN): x = norm_1(x + attn(x));  x = norm_2(x + mlp(x))

GPT-2 (Radford et al. 2019): layernorm, learned positions, gelu_tanh MLP, biases, tied embeddings.
Llama-2 (Touvron et al. 2023): rmsnorm, RoPE on q/k, SwiGLU MLP, no biases, untied output head, GQA
(the llama-* presets tie the head, as llama2.c's TinyStories models do).
Parameter names follow GPT-2 (wte, wpe, ln_1, attn.c_q, mlp.c_fc, c_proj, ln_f, lm_head); scratchlm.model.hf
maps them to and from the Hugging Face checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.model import functional
from scratchlm.model.cache import KVCache
from scratchlm.model.layers import (
    MLP,
    Attention,
    RotaryEmbedding,
    SinusoidalPositions,
    make_dropout,
    make_norm,
)
from scratchlm.model.loss import chunked_cross_entropy


class Block(nn.Module):
    """One Transformer layer: self-attention then MLP, each with a residual connection.  (B, T, C) -> (B, T, C)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.post_norm:
            x = self.ln_1(x + self.attn(x, **attn_kwargs))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), **attn_kwargs)
        return x + self.mlp(self.ln_2(x))


def attention_mask_for(
    T: int, S: int, key_mask: torch.Tensor | None, device: torch.device, ops=functional
) -> torch.Tensor:
    """Causal mask of T new queries over S keys, combined with a key padding mask.

    key_mask (B, S) bool, True = real token -> (B or 1, 1, T, S) bool, True = may attend.
    A query that may see no key at all (a left-padding position) would get softmax over nothing (NaN);
    such rows are opened to every key instead: their outputs are finite and nobody reads them.
    ops: the module whose ``causal_mask`` builds the mask (the model's ``ops``: fast or reference).
    """
    mask = ops.causal_mask(T, S, device)[None, None]  # (1, 1, T, S)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :S].to(device=device, dtype=torch.bool)
    return mask | ~mask.any(dim=-1, keepdim=True)


class GPT(nn.Module):
    """Decoder-only language model configured by a ModelConfig (arch == "gpt")."""

    ops = functional  # the loss's math (see scratchlm.model.layers)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.context_length, C) if cfg.pos == "learned" else None
        self.sinusoid = SinusoidalPositions(cfg.context_length, C) if cfg.pos == "sinusoidal" else None
        # the fixed table has entries of magnitude ~1 while wte starts at std init_std (0.02): unscaled, the
        # positions drown the tokens. The paper multiplies the embeddings by sqrt(d_model) (section 3.4).
        self.emb_scale = math.sqrt(C) if cfg.pos == "sinusoidal" else 1.0
        self.rope = (
            RotaryEmbedding(C // cfg.n_head, cfg.rope_theta, cfg.rope_style, cfg.context_length)
            if cfg.pos == "rope"
            else None
        )
        self.drop = make_dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # pre-LN leaves the residual stream unnormalised, so a final norm precedes the head (GPT-2 ln_f)
        self.ln_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # Press & Wolf 2017
        self.loss_chunk_rows = 0  # > 0: training loss in row chunks (model/loss.py; train.loss_chunk_rows)
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections that write into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) long -> (logits (B, T, V), loss or None).

        targets (B, T) long: loss = mean cross-entropy over targets != -100; in training with
            ``loss_chunk_rows`` set, logits is None (the loss is computed in row chunks, model/loss.py).
        cache: KVCache from make_cache; the T tokens are appended after cache.length tokens already stored.
        positions (B, T) long: position ids (default cache.length + arange(T)); left-padded batches pass
            their own so that each row's first real token is position 0.
        attention_mask (B, S) bool, S = cache.length + T: True = real token (keys to attend to).
        A cache with ``slot`` set (fixed-shape decoding, model/cache.py) needs positions and an attention_mask
        (B, S) over its first S <= max_len slots (the filled ones and the new one: the step attends over
        those), and is not advanced here.
        """
        B, T = idx.shape
        if cache is not None and cache.slot is not None:  # fixed-shape decode step (model/cache.py)
            if positions is None or attention_mask is None:
                raise ValueError(
                    "a KVCache with slot set needs positions and attention_mask (B, S <= max_len)"
                )
            start, S = -1, attention_mask.shape[1]  # keys: the first S slots, padding masked
        else:
            start = cache.length if cache is not None else 0
            S = start + T
        if positions is None:
            if self.wpe is not None and self.config.context_length < S:
                raise ValueError(
                    f"sequence of {S} tokens exceeds context_length {self.config.context_length}"
                )
            positions = torch.arange(start, S, device=idx.device)[None]  # (1, T)

        x = self.wte(idx)  # (B, T, C)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        if self.wpe is not None:
            x = x + self.wpe(positions)
        elif self.sinusoid is not None:
            x = x + self.sinusoid(positions).to(x.dtype)
        x = self.drop(x)
        rope = self.rope(positions, max_len=S) if self.rope is not None else None  # positions < S

        # the cheapest exact mask: is_causal when queries and keys align, none for one query, else explicit
        mask, causal = None, False
        if attention_mask is not None or (start > 0 and T > 1):
            mask = attention_mask_for(T, S, attention_mask, idx.device, self.ops)
        elif start == 0:
            causal = True
        for i, block in enumerate(self.blocks):
            x = block(x, rope=rope, mask=mask, causal=causal, cache=cache, layer=i)
        if cache is not None and cache.slot is None:
            cache.advance(T)
        x = self.ln_f(x)
        if targets is not None and self.loss_chunk_rows and self.training:  # no (B, T, V) logits at all
            return None, chunked_cross_entropy(
                x, self.lm_head.weight, targets, self.loss_chunk_rows, -100, self.config.label_smoothing
            )
        logits = self.lm_head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            loss = self.ops.cross_entropy(
                logits.float().flatten(0, 1),
                targets.flatten(),
                ignore_index=-100,
                label_smoothing=self.config.label_smoothing,
            )
        return logits, loss

    def make_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KVCache for ``batch_size`` rows of up to ``max_len`` tokens (default context_length);
        device and dtype default to the model's parameters."""
        cfg, p = self.config, self.wte.weight
        return KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_kv_head or cfg.n_head,
            max_len or cfg.context_length,
            cfg.d_model // cfg.n_head,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (a tied matrix counted once).

        non_embedding=True drops the lookup tables that do no matmul: position embeddings, and the token
        embedding unless it is tied to the output head (then it is the head's matmul). This is the N of
        the 6N FLOPs rule (nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward) = 6N + 12 * n_layer * T * d_model.

        6N: every matmul parameter does a multiply-add (2 FLOPs) forward and twice that backward
        (Kaplan et al. 2020). 12 L T C: the attention scores QK^T and the weighted sum AV, 2 * 2 * T * C
        forward per layer and token, times 3 with the backward (PaLM, Chowdhery et al. 2022, appendix B),
        counted without the causal half-saving. T = seq_len (default context_length).
        """
        cfg = self.config
        T = seq_len or cfg.context_length
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * T * cfg.d_model


def estimate_mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOPs utilisation = achieved FLOP/s / peak FLOP/s (PaLM), e.g. peak 989e12 for an H100 bf16."""
    return flops_per_token * tokens_per_second / peak_flops
