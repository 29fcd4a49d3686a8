"""The Transformer a course writes: block, decoder-only LM, and the encoder-decoder of Vaswani et al. 2017.

Built only from :mod:`scratchlm.reference.layers` (so only from :mod:`scratchlm.reference.functional`), with
the fast model's parameter names: ``TransformerLM(cfg).load_state_dict(GPT(cfg).state_dict())`` and
``EncoderDecoderTransformer(cfg).load_state_dict(Seq2Seq(cfg).state_dict())`` work as they are, and
tests/reference prove the outputs, losses and gradients equal.

    TransformerBlock (pre-norm, GPT-2 and Llama):  x = x + attn(norm_1(x));  x = x + mlp(norm_2(x))
    TransformerBlock (post-norm, the original):    x = norm_1(x + attn(x));  x = norm_2(x + mlp(x))
    TransformerLM:  ids (B, T) -> wte (+ wpe | + PE) -> blocks -> [ln_f] -> lm_head -> logits (B, T, V)
    EncoderDecoderTransformer:
        memory = encoder(src_emb(src) * sqrt(C) + PE)                       (B, S, C)
        logits = lm_head(decoder(tgt_emb(tgt_in) * sqrt(C) + PE, memory))  (B, T, V)
    DecoderBlock:  y += self_attn(y, causal);  y += cross_attn(y, memory);  y += mlp(y)   (norms as above)

GPT-2 flavour: layernorm, learned positions, gelu_tanh, biases, tied head. Llama flavour: rmsnorm, RoPE,
SwiGLU, no biases, GQA (n_kv_head < n_head). Both come from one :class:`~scratchlm.config.ModelConfig`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.reference import functional as ops
from scratchlm.reference.layers import (
    CrossAttention,
    Embedding,
    FeedForward,
    Linear,
    MultiHeadSelfAttention,
    make_norm,
    sinusoidal_positions,
)


def mlp_width(cfg: ModelConfig) -> int:
    """d_ff, or 4 C, or for SwiGLU 8C/3 rounded up to a multiple of ``multiple_of`` (Llama)."""
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.mlp == "swiglu":
        return cfg.multiple_of * math.ceil(int(8 * cfg.d_model / 3) / cfg.multiple_of)
    return 4 * cfg.d_model


def _norm(cfg: ModelConfig) -> nn.Module:
    return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)


def _attention_kwargs(cfg: ModelConfig) -> dict:
    return dict(bias=cfg.bias, qk_norm=cfg.qk_norm, eps=cfg.norm_eps, dropout=cfg.dropout)


class TransformerBlock(nn.Module):
    """One layer: self-attention then MLP, each with a residual.   x (B, T, C) -> (B, T, C).

    Parameters: ln_1, attn (c_q, c_k, c_v, c_proj), ln_2, mlp (c_fc, [c_gate], c_proj): the fast Block's.
    causal: decoder (True) or encoder (False); key_mask (B, T): True = real token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = _norm(cfg)
        self.attn = MultiHeadSelfAttention(
            cfg.d_model,
            cfg.n_head,
            cfg.n_kv_head,
            rope_theta=cfg.rope_theta if cfg.pos == "rope" else None,
            rope_style=cfg.rope_style,
            **_attention_kwargs(cfg),
        )
        self.ln_2 = _norm(cfg)
        self.mlp = FeedForward(cfg.d_model, mlp_width(cfg), cfg.mlp, cfg.bias, cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        *,
        causal: bool = True,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        def attn(h):
            return self.attn(h, token_positions, causal=causal, key_mask=key_mask)

        if self.post_norm:
            x = self.ln_1(x + attn(x))
            return self.ln_2(x + self.mlp(x))
        x = x + attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def _loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the targets != -100: logits (B, T, V), targets (B, T) -> scalar."""
    return ops.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), -100, label_smoothing)


class TransformerLM(nn.Module):
    """Decoder-only language model (GPT-2 or Llama flavour by ``cfg``), the fast GPT's parameter names.

    forward(ids (B, T), targets (B, T) | None) -> (logits (B, T, V), loss | None):
        x = wte[ids] (+ wpe[0..T-1] | + PE[0..T-1]) -> dropout -> blocks (causal; RoPE inside when
        pos=rope) -> ln_f (pre-norm only) -> logits = x W_head^T;  loss = CE(logits, targets).
    tie_embeddings: W_head is wte's table (Press & Wolf 2017).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        self.wte = Embedding(cfg.vocab_size, C)
        self.wpe = Embedding(cfg.context_length, C) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg) if cfg.norm_position == "pre" else None
        self.lm_head = Linear(C, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(
        self, ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        T = ids.shape[1]
        if cfg.context_length < T and cfg.pos == "learned":
            raise ValueError(f"sequence of {T} tokens exceeds context_length {cfg.context_length}")
        positions = torch.arange(T, device=ids.device)  # (T,)
        x = self.wte(ids)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_positions(T, cfg.d_model).to(x)
        x = ops.dropout(x, cfg.dropout if self.training else 0.0)
        for block in self.blocks:
            x = block(x, positions, causal=True)
        if self.ln_f is not None:
            x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None if targets is None else _loss(logits, targets, cfg.label_smoothing)
        return logits, loss


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the memory, MLP.   y (B, T, C) -> (B, T, C).

    Parameters: ln_1, attn, ln_2, cross_attn, ln_3, mlp (the fast seq2seq DecoderBlock's).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = _norm(cfg)
        self.attn = MultiHeadSelfAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, **_attention_kwargs(cfg))
        self.ln_2 = _norm(cfg)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, **_attention_kwargs(cfg))
        self.ln_3 = _norm(cfg)
        self.mlp = FeedForward(cfg.d_model, mlp_width(cfg), cfg.mlp, cfg.bias, cfg.dropout)

    def forward(
        self, y: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y (B, T, C), memory (B, S, C), memory_mask (B, S) bool (True = real source token)."""
        if self.post_norm:
            y = self.ln_1(y + self.attn(y, causal=True))
            y = self.ln_2(y + self.cross_attn(y, memory, memory_mask))
            return self.ln_3(y + self.mlp(y))
        y = y + self.attn(self.ln_1(y), causal=True)
        y = y + self.cross_attn(self.ln_2(y), memory, memory_mask)
        return y + self.mlp(self.ln_3(y))


class EncoderDecoderTransformer(nn.Module):
    """The translation Transformer (Vaswani et al. 2017), the fast Seq2Seq's parameter names.

    encode(src (B, S), src_mask (B, S) bool) -> memory (B, S, C):
        x = src_emb[src] * sqrt(C) + PE -> dropout -> encoder blocks (not causal, padding masked) -> [enc_ln_f]
    decode(tgt_in (B, T), memory, src_mask) -> logits (B, T, V):
        y = tgt_emb[tgt_in] * sqrt(C) + PE -> dropout -> decoder blocks -> [dec_ln_f] -> lm_head
    forward(src, tgt_in, targets, src_mask=...) -> (logits, label-smoothed CE over targets != -100).
    PE: the sinusoid table (pos=sinusoidal), learned src_pos / tgt_pos tables, or none. The sqrt(C) scale
    (section 3.4) lifts embeddings of std ~0.02 to the magnitude of PE. share_embeddings: one table for
    source and target; tie_embeddings: lm_head reuses the target table. [..]_ln_f: pre-norm only.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pos not in ("sinusoidal", "learned", "none"):
            raise ValueError(f"pos={cfg.pos!r}: the encoder-decoder takes sinusoidal, learned or none")
        self.config = cfg
        C, V = cfg.d_model, cfg.vocab_size
        self.src_emb = Embedding(V, C)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else Embedding(V, C)
        if cfg.pos == "learned":
            self.src_pos = Embedding(cfg.context_length, C)
            self.tgt_pos = Embedding(cfg.context_length, C)
        self.encoder = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_encoder_layer or cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        pre = cfg.norm_position == "pre"
        self.enc_ln_f = _norm(cfg) if pre else None
        self.dec_ln_f = _norm(cfg) if pre else None
        self.lm_head = Linear(C, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def _embed(self, ids: torch.Tensor, table: Embedding, pos_table: str) -> torch.Tensor:
        """ids (B, L) -> E[ids] * sqrt(C) + PE[0..L-1] -> dropout -> (B, L, C)."""
        cfg = self.config
        L = ids.shape[1]
        x = table(ids) * math.sqrt(cfg.d_model)
        if cfg.pos == "sinusoidal":
            x = x + sinusoidal_positions(L, cfg.d_model).to(x)
        elif cfg.pos == "learned":
            x = x + getattr(self, pos_table)(torch.arange(L, device=ids.device))
        return ops.dropout(x, cfg.dropout if self.training else 0.0)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._embed(src, self.src_emb, "src_pos")
        for block in self.encoder:
            x = block(x, causal=False, key_mask=src_mask)
        return x if self.enc_ln_f is None else self.enc_ln_f(x)

    def decode(
        self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = self._embed(tgt_in, self.tgt_emb, "tgt_pos")
        for block in self.decoder:
            y = block(y, memory, src_mask)
        return self.lm_head(y if self.dec_ln_f is None else self.dec_ln_f(y))

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        src_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.decode(tgt_in, self.encode(src, src_mask), src_mask)
        loss = None if targets is None else _loss(logits, targets, self.config.label_smoothing)
        return logits, loss
