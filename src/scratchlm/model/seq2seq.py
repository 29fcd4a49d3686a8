"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017), for translation.

    src (B, S) -> emb * sqrt(C) + PE -> dropout -> n_encoder_layer x EncoderBlock -> [norm] -> memory (B, S, C)
    tgt_in (B, T) -> emb * sqrt(C) + PE -> dropout -> n_layer x DecoderBlock(memory) -> [norm] -> head -> (B, T, V)

    EncoderBlock (post-LN, the paper): x = LN(x + SelfAttn(x, src_mask)); x = LN(x + FFN(x))
    DecoderBlock (post-LN): y = LN(y + CausalSelfAttn(y)); y = LN(y + CrossAttn(y, memory, src_mask));
                            y = LN(y + FFN(y))
    pre-LN (cfg.norm_position="pre", Xiong et al. 2020): y = y + f(LN(y)) for each sublayer, plus a final LN
    after each stack ([norm] above). Post-LN has no final LN (as in the paper; torch.nn.Transformer adds one).

Source and target share one embedding table when cfg.share_embeddings (a joint BPE vocabulary, section 3.4),
and the output head reuses the target embedding when cfg.tie_embeddings. Loss: label-smoothed cross-entropy
(cfg.label_smoothing, 0.1 in the paper) over targets != -100.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from scratchlm.config import ModelConfig
from scratchlm.errors import ConfigError
from scratchlm.model import functional
from scratchlm.model.cache import KVCache, Seq2SeqCache
from scratchlm.model.gpt import Block as EncoderBlock
from scratchlm.model.layers import MLP, Attention, SinusoidalPositions, make_dropout, make_norm


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention over the encoder memory, MLP.  (B, T, C) -> (B, T, C)"""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.ln_1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.cross_attn = Attention(cfg)
        self.ln_3 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, y, memory_kv, *, mask, causal, src_mask, cache, layer) -> torch.Tensor:
        """y (B, T, C); memory_kv: memory (B, S, C) or its cached cross (k, v); src_mask (B, 1, 1, S)."""
        self_kw = dict(mask=mask, causal=causal, cache=cache, layer=layer)
        if self.post_norm:
            y = self.ln_1(y + self.attn(y, **self_kw))
            y = self.ln_2(y + self.cross_attn(y, memory_kv, mask=src_mask))
            return self.ln_3(y + self.mlp(y))
        y = y + self.attn(self.ln_1(y), **self_kw)
        y = y + self.cross_attn(self.ln_2(y), memory_kv, mask=src_mask)
        return y + self.mlp(self.ln_3(y))


class Seq2Seq(nn.Module):
    """Encoder-decoder Transformer configured by a ModelConfig (arch == "seq2seq")."""

    ops = functional  # the loss's math (see scratchlm.model.layers)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.pos not in ("sinusoidal", "learned", "none"):
            raise ConfigError(
                f"model.pos={cfg.pos!r} is not supported by arch=seq2seq; use sinusoidal or learned"
            )
        self.config = cfg
        C, V = cfg.d_model, cfg.vocab_size
        self.src_emb = nn.Embedding(V, C)
        self.tgt_emb = self.src_emb if cfg.share_embeddings else nn.Embedding(V, C)
        self.emb_scale = math.sqrt(C)  # section 3.4: "we multiply those weights by sqrt(d_model)"
        if cfg.pos == "sinusoidal":
            self.pos = SinusoidalPositions(cfg.context_length, C)
        elif cfg.pos == "learned":
            self.src_pos, self.tgt_pos = (
                nn.Embedding(cfg.context_length, C),
                nn.Embedding(cfg.context_length, C),
            )
        self.drop = make_dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_encoder_layer or cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layer))
        pre = cfg.norm_position == "pre"
        self.enc_ln_f = make_norm(cfg) if pre else nn.Identity()
        self.dec_ln_f = make_norm(cfg) if pre else nn.Identity()
        self.lm_head = nn.Linear(C, V, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def _init_weights(self) -> None:
        # Xavier-uniform matrices (as the tensor2tensor/fairseq Transformers), zero biases, and embeddings
        # N(0, init_std) as the GPT: the tied head then starts near-uniform (loss ~ ln V).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def _embed(self, ids: torch.Tensor, emb: nn.Embedding, pos_table: str, start: int = 0) -> torch.Tensor:
        """ids (B, T) -> emb(ids) * sqrt(C) + PE(start + arange(T)) -> dropout -> (B, T, C)."""
        x = emb(ids) * self.emb_scale
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]  # (1, T)
        if self.config.pos == "sinusoidal":
            x = x + self.pos(positions).to(x.dtype)
        elif self.config.pos == "learned":
            x = x + getattr(self, pos_table)(positions)
        return self.drop(x)

    @staticmethod
    def _key_mask(src_mask: torch.Tensor | None) -> torch.Tensor | None:
        """src_mask (B, S) True = real -> (B, 1, 1, S); an all-padding row is opened (finite, unused)."""
        if src_mask is None:
            return None
        mask = src_mask[:, None, None, :].bool()
        return mask | ~mask.any(dim=-1, keepdim=True)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) long, src_mask (B, S) bool (True = real token) -> memory (B, S, C)."""
        x = self._embed(src, self.src_emb, "src_pos")
        mask = self._key_mask(src_mask)
        for block in self.encoder:
            x = block(x, mask=mask)
        return self.enc_ln_f(x)

    def decode(
        self,
        tgt_in: torch.Tensor,
        memory: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
    ) -> torch.Tensor:
        """tgt_in (B, T) long, memory (B, S, C), src_mask (B, S) -> logits (B, T, V).

        With a cache (make_cache), tgt_in holds the next T target tokens after cache.length stored ones;
        the cross-attention keys/values are computed from ``memory`` on the first call only (later calls
        may pass the same memory; after cache.reorder, the cached K/V are already reordered).
        """
        B, T = tgt_in.shape
        start = cache.length if cache is not None else 0
        y = self._embed(tgt_in, self.tgt_emb, "tgt_pos", start)
        mask, causal = None, False
        if start == 0:
            causal = True
        elif T > 1:
            mask = self.ops.causal_mask(T, start + T, tgt_in.device)[None, None]
        key_mask = self._key_mask(src_mask)
        for i, block in enumerate(self.decoder):
            memory_kv = memory
            if cache is not None:
                if cache.cross[i] is None:
                    cache.cross[i] = block.cross_attn.project_kv(memory)
                memory_kv = cache.cross[i]
            y = block(
                y,
                memory_kv,
                mask=mask,
                causal=causal,
                src_mask=key_mask,
                cache=None if cache is None else cache.self_attn,
                layer=i,
            )
        if cache is not None:
            cache.self_attn.advance(T)
        return self.lm_head(self.dec_ln_f(y))

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        src_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing: src (B, S), tgt_in (B, T) -> (logits (B, T, V), label-smoothed loss or None)."""
        logits = self.decode(tgt_in, self.encode(src, src_mask), src_mask)
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
    ) -> Seq2SeqCache:
        """An empty decoder cache for ``batch_size`` rows of up to ``max_len`` target tokens."""
        cfg, p = self.config, self.lm_head.weight
        kv = KVCache(
            cfg.n_layer,
            batch_size,
            cfg.n_kv_head or cfg.n_head,
            max_len or cfg.context_length,
            cfg.d_model // cfg.n_head,
            device=device or p.device,
            dtype=dtype or p.dtype,
        )
        return Seq2SeqCache(kv, cfg.n_layer)

    @torch.no_grad()
    def greedy_decode(
        self, src: torch.Tensor, src_mask: torch.Tensor | None, bos_id: int, eos_id: int, max_len: int
    ) -> torch.Tensor:
        """Greedy translation with the KV cache -> (B, L) long, L <= max_len, the tokens after BOS.

        Each row stops at its first EOS (included); rows that finished early are filled with eos_id.
        """
        B = src.shape[0]
        memory = self.encode(src, src_mask)
        cache = self.make_cache(B, max_len=max_len + 1)
        token = torch.full((B, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        out = []
        for _ in range(max_len):
            logits = self.decode(token, memory, src_mask, cache=cache)
            token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            token = token.masked_fill(done[:, None], eos_id)
            out.append(token)
            done |= token[:, 0] == eos_id
            if done.all():
                break
        return torch.cat(out, dim=1)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (shared tables counted once); non_embedding drops lookup-only tables (as GPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.pos == "learned":
                n -= self.src_pos.weight.numel() + self.tgt_pos.weight.numel()
            tables = {
                id(self.src_emb.weight): self.src_emb.weight,
                id(self.tgt_emb.weight): self.tgt_emb.weight,
            }
            tables.pop(id(self.lm_head.weight), None)  # the tied one is the head's matmul
            n -= sum(t.numel() for t in tables.values())
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per target token, approximately 6N + 12 * (n_enc + 2 * n_dec) * T * C.

        Same convention as GPT.flops_per_token (source length taken equal to target length T); the
        decoder counts twice for its self- and cross-attention.
        """
        cfg = self.config
        T = seq_len or cfg.context_length
        n_enc = cfg.n_encoder_layer or cfg.n_layer
        return 6 * self.num_params(non_embedding=True) + 12 * (n_enc + 2 * cfg.n_layer) * T * cfg.d_model
