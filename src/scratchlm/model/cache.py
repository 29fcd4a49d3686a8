"""Key/value caches for incremental decoding.

A decoder that has already processed tokens [0, L) only needs the new token's query at step L: its keys and
values of earlier tokens do not change (causality). So we keep them, per layer, in preallocated tensors and
append T new entries per forward instead of recomputing the whole prefix (O(T) work per token, not O(T^2)).

    KVCache.k[layer], KVCache.v[layer]: (B, Hkv, max_len, D);  slots [0, length) are filled.

The model calls ``update(layer, k_new, v_new)`` in every layer, which writes slots [length, length + T) and
returns the filled prefix, then ``advance(T)`` once after the last layer.
``reorder(indices)`` selects batch rows (beam search keeps the surviving beams' histories).

Fixed-shape decoding (a compiled decode step, ``Engine(compile=True)``): set ``slot`` to a (1,) long tensor
holding the slot of the next token. ``update`` then writes there (an index_put_: no Python int in
the graph) and returns the first ``keys`` slots, the width of the step's attention mask: the filled ones
and the new one. The caller marks that width dynamic (``torch._dynamo.mark_dynamic``), so torch.compile
traces the step once for every length, and a step reads only the keys it attends to (a full-size read of
every slot cost a third of an int8 decode step); it masks padding, advances ``slot`` and ``length`` itself,
and the model does not call ``advance``.
"""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated self-attention cache: n_layer x (B, Hkv, max_len, D) keys and values."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0  # tokens stored (same for every row; left padding keeps rows aligned)
        self.slot: torch.Tensor | None = None  # (1,) long: fixed-shape decoding (module docstring)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, keys: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots [length, length + T); return slots [0, length + T).
        With ``slot`` set (T == 1): write at slot ``slot`` and return slots [0, keys) (default max_len)."""
        if self.slot is not None:
            self.k[layer][:, :, self.slot] = k  # index_put_: compiled in place
            self.v[layer][:, :, self.slot] = v
            return self.k[layer][:, :, :keys], self.v[layer][:, :, :keys]
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}; make a larger cache")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more tokens as stored (called once per model forward, after every layer wrote them)."""
        self.length += n

    def reset(self) -> None:
        """Forget every stored token (the buffers are reused)."""
        self.length = 0

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` (B',) long, in that order (beam search); B' may differ from B."""
        self.k = [t.index_select(0, indices) for t in self.k]
        self.v = [t.index_select(0, indices) for t in self.v]


class Seq2SeqCache:
    """Decoder cache of the encoder-decoder: self-attention KVCache + cross-attention K/V per layer.

    The cross-attention keys/values depend only on the encoder memory, so they are computed once, on the
    first decode call, and reused afterwards (``cross[layer] = (k, v)``, each (B, Hkv, S_src, D)).
    """

    def __init__(self, self_attn: KVCache, n_layer: int):
        self.self_attn = self_attn
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return self.self_attn.length

    def reset(self) -> None:
        """Forget the target tokens and the encoder memory's keys/values."""
        self.self_attn.reset()
        self.cross = [None] * len(self.cross)

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` (beam search) in both the self- and cross-attention caches."""
        self.self_attn.reorder(indices)
        self.cross = [
            None if kv is None else (kv[0].index_select(0, indices), kv[1].index_select(0, indices))
            for kv in self.cross
        ]
