"""The KV cache of generation (titan/generation.py): every attention layer's keys and values, preallocated, and the
dense mask of which cached columns each new token may attend to. The decoder's layers (titan/models/layers.py) write
into it and read from it; nothing here knows about models."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every attention layer while generating, for `batch` rows of up to `max_len` tokens,
    preallocated so that every decoding step has the same shapes (torch.compile traces it once). Each layer's
    tensors (batch, kv_heads, max_len, head_dim) are allocated at its first write with the keys' head count and
    dtype (a tensor-parallel rank would hold its own heads only). Before each forward the caller sets `slots`
    (q_len,) int64, the columns the forward's tokens are written to, and `mask` (batch, q_len, max_len) bool, which
    columns each of them may attend to (its own row's earlier tokens and itself, never a padding column)."""

    def __init__(self, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.layers: dict[str, LayerCache] = {}
        self.slots: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def windowed(self, mask: torch.Tensor, window: int) -> torch.Tensor:
        """`mask` within a sliding `window` (0 = none), counted in columns: a row's tokens sit in consecutive
        columns, so column distance is token distance."""
        if not window:
            return mask
        columns = torch.arange(self.max_len, device=mask.device)
        return mask & (self.slots[:, None] - columns[None, :] < window)

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache(self)
        return self.layers[name]


class LayerCache:
    """One attention layer's part of a `KVCache`."""

    def __init__(self, owner: KVCache):
        self.owner = owner
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys and values (batch, kv_heads, q_len, head_dim) at the owner's `slots`; return
        the whole cache (unwritten columns are zeros, which the mask hides)."""
        if self.k is None:  # v's head size may differ from k's (MLA)
            self.k = k.new_zeros(self.owner.batch, k.shape[1], self.owner.max_len, k.shape[3])
            self.v = v.new_zeros(self.owner.batch, v.shape[1], self.owner.max_len, v.shape[3])
        self.k.index_copy_(2, self.owner.slots, k)
        self.v.index_copy_(2, self.owner.slots, v)
        return self.k, self.v
