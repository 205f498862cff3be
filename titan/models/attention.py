"""The attention seam of the shared decoder: which keys each query may see, and the kernel that computes it.

A query sees the keys at or before its position, only within `window` tokens back when its layer has a sliding
window (`TransformerArgs.layer_windows`), and only in its own document when the batch packs several documents per
row (`document_ids`, pre-training with document masking and packed SFT). `attend` picks the kernel from what the
batch needs:

  nothing beyond causality            SDPA `is_causal` (flash or cuDNN on a GPU, flash on CPU): no mask at all
  documents and/or a window, CUDA     FlexAttention with a `BlockMask`: per 128 x 128 tile of the score matrix, whether
                                      it is empty (skipped), full (no mask work) or partial; (seq/128)^2 entries per
                                      row, computed from the documents' boundaries, never a seq x seq tensor
  documents and/or a window, CPU      SDPA with a (batch, 1, seq, seq) additive mask in the compute dtype, built
                                      once and saved once for every layer (torch 2.13's FlexAttention has no
                                      backward on CPU; SDPA's CPU flash kernel takes the mask without materialising
                                      the scores)

`MaskBuilder` (called once per batch by `Transformer.forward`) builds the masks of one batch, one per distinct window
of the model's layers, and every layer reads them from the `AttentionMasks` it is handed: built once per batch, not
per layer. Context parallelism replaces the model's `mask_builder` from outside with its own
(titan/parallel/context_parallel.py), as it replaces each layer's `sdpa`. Window-only masks (no documents) depend on
the shape alone and are built where the layer runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention's tile: one BlockMask entry per BLOCK x BLOCK tile of the score matrix


@dataclass
class Visibility:
    """Who sees whom, for queries at `q_pos` and keys at `k_pos` (1-D positions in the sequence, the same for every
    row) with optional per-row document ids (batch, len): key k is visible to query q iff k_pos <= q_pos, q_pos -
    k_pos < window (window > 0), and the two share a document."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    window: int = 0

    @staticmethod
    def self_attention(seq_len: int, document_ids: torch.Tensor | None, window: int, device) -> Visibility:
        pos = torch.arange(seq_len, device=device)
        return Visibility(pos, pos, document_ids, document_ids, window)

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as SDPA adds it to the scores, in the scores' dtype (0 or -inf): handed over ready, so that no
        layer converts (and saves) a copy of its own."""
        mask = self.dense()
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def dense(self) -> torch.Tensor:
        """The boolean mask (batch or 1, 1, q_len, k_len), True = may attend."""
        q, k = self.q_pos[:, None], self.k_pos[None, :]
        mask = k <= q
        if self.window:
            mask = mask & (q - k < self.window)
        mask = mask[None]
        if self.q_doc is not None:
            mask = mask & (self.q_doc[:, :, None] == self.k_doc[:, None, :])
        return mask[:, None]

    def mask_mod(self):
        """The same predicate, elementwise on indices, as FlexAttention evaluates it inside partial tiles."""
        q_pos, k_pos, q_doc, k_doc, window = self.q_pos, self.k_pos, self.q_doc, self.k_doc, self.window

        def mask_mod(b, h, q_idx, kv_idx):
            qp, kp = q_pos[q_idx], k_pos[kv_idx]
            ok = kp <= qp
            if window:
                ok = ok & (qp - kp < window)
            if q_doc is not None:
                ok = ok & (q_doc[b, q_idx] == k_doc[b, kv_idx])
            return ok

        return mask_mod

    def block_mask(self) -> BlockMask:
        """The FlexAttention BlockMask, from per-tile minima and maxima of positions and document ids: a tile is
        empty when no key can be visible, full when every key is, partial (the mask_mod decides) otherwise. A tile
        called partial that is in fact empty only costs work; full tiles are exact. Nothing larger than
        batch x (q_len/128) x (k_len/128) is allocated."""
        qp_lo, qp_hi, q_pad = _tiles(self.q_pos)
        kp_lo, kp_hi, k_pad = _tiles(self.k_pos)
        qp_lo, qp_hi, kp_lo, kp_hi = qp_lo[:, None], qp_hi[:, None], kp_lo[None, :], kp_hi[None, :]
        some = kp_lo <= qp_hi
        every = (kp_hi <= qp_lo) & ~q_pad[:, None] & ~k_pad[None, :]  # tiles holding padding are never full
        if self.window:
            some = some & (qp_lo - kp_hi < self.window)
            every = every & (qp_hi - kp_lo < self.window)
        some, every = some[None], every[None]
        if self.q_doc is not None:
            qd_lo, qd_hi, _ = _tiles(self.q_doc)
            kd_lo, kd_hi, _ = _tiles(self.k_doc)
            qd_lo, qd_hi, kd_lo, kd_hi = qd_lo[:, :, None], qd_hi[:, :, None], kd_lo[:, None, :], kd_hi[:, None, :]
            some = some & (kd_lo <= qd_hi) & (kd_hi >= qd_lo)
            every = every & (qd_lo == qd_hi) & (kd_lo == kd_hi) & (qd_lo == kd_lo)
        partial = some & ~every
        return BlockMask.from_kv_blocks(*_indices(partial), *_indices(every), BLOCK_SIZE=BLOCK,
                                        mask_mod=self.mask_mod(), seq_lengths=(len(self.q_pos), len(self.k_pos)))


def _tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(min, max, holds-padding) of each BLOCK-long tile of the last dimension (the last tile padded with its last
    value, which changes neither extreme)."""
    n = x.shape[-1]
    pad = -n % BLOCK
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    tiles = x.unflatten(-1, (-1, BLOCK))
    padded = torch.zeros(tiles.shape[-2], dtype=torch.bool, device=x.device)
    padded[-1] = pad > 0
    return tiles.amin(-1), tiles.amax(-1), padded


def _indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, column indices with the selected ones first, in order) per tile row: BlockMask's kv layout, with a
    head dimension of 1 (every head has the same mask)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], order[:, None]


# ---------------------------------------------------------------------------------------------------------------
# The masks of one batch


def uses_flex(device: torch.device) -> bool:
    """FlexAttention where it can train (CUDA); SDPA with a boolean mask elsewhere."""
    return torch.device(device).type == "cuda"


@dataclass
class AttentionMasks:
    """The masks of one batch, by window (0 = full causal attention): additive float tensors (CPU), or BlockMasks
    (flex)."""

    by_window: dict[int, torch.Tensor | BlockMask] = field(default_factory=dict)

    def get(self, window: int) -> torch.Tensor | BlockMask:
        return self.by_window[window]


class MaskBuilder:
    """Builds a batch's `AttentionMasks` once, for every window the layers use; None when the batch has no documents
    (then a layer attends causally, or builds its window-only mask from the shape). `flex` None = by device."""

    def __init__(self, windows: set[int], flex: bool | None = None):
        self.windows, self.flex = sorted(windows), flex

    def __call__(self, document_ids: torch.Tensor | None, positions: torch.Tensor | None,
                 dtype: torch.dtype = torch.float32) -> AttentionMasks | None:
        """`dtype`: the attention scores' (the compute dtype)."""
        if document_ids is None:
            return None
        flex = uses_flex(document_ids.device) if self.flex is None else self.flex
        masks = AttentionMasks()
        for window in self.windows:
            vis = Visibility.self_attention(document_ids.shape[1], document_ids, window, document_ids.device)
            masks.by_window[window] = vis.block_mask() if flex else vis.additive(dtype)
        return masks


def window_mask(seq_len: int, window: int, device, flex: bool) -> torch.Tensor | BlockMask:
    """A sliding window over one sequence without documents (the same for every row and every batch)."""
    vis = Visibility.self_attention(seq_len, None, window, device)
    return vis.block_mask() if flex else vis.dense()


# ---------------------------------------------------------------------------------------------------------------
# Kernels

_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention, compiled on CUDA: its eager form is a reference implementation that materialises the scores.
    On CPU (tests) it runs eagerly, forward only (torch 2.13 has no CPU backward)."""
    global _compiled_flex
    if q.device.type != "cuda":
        with warnings.catch_warnings():  # "called without torch.compile()": intended, the tests' reference path
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: AttentionMasks | torch.Tensor | None,
           window: int = 0) -> torch.Tensor:
    """Attention over (batch, heads, seq, head_dim); k and v may have fewer heads than q (grouped-query attention:
    the kernels read each K/V head for its query heads, no repeated copies). `masks` a tensor: generation's dense
    boolean (batch, q_len, cache length) from a KV cache (titan/models/kv_cache.py:KVCache), window included."""
    if isinstance(masks, torch.Tensor):
        mask = masks[:, None] if masks.dim() == 3 else masks
    elif masks is not None:
        mask = masks.get(window)
    elif window and window < q.shape[2]:
        mask = window_mask(q.shape[2], window, q.device, uses_flex(q.device))
    else:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if isinstance(mask, BlockMask):
        return flex(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """The dense reference: block-diagonal causal mask (batch, seq, seq), True where a token may attend (the earlier
    tokens of its own document)."""
    return Visibility.self_attention(document_ids.shape[1], document_ids, 0, document_ids.device).dense()[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# The check a GPU run makes (scripts/gpu_check): what CPU tests cannot show


def random_documents(batch: int, seq_len: int, mean_len: float, generator: torch.Generator) -> torch.Tensor:
    """Document ids (batch, seq_len) of documents with lognormal lengths (sigma 1) around `mean_len`, packed end to
    end: the mix packed pre-training and SFT rows hold."""
    rows = []
    for _ in range(batch):
        lengths = torch.distributions.LogNormal(torch.log(torch.tensor(mean_len)) - 0.5, 1.0).sample((seq_len,))
        lengths = lengths.clamp(min=1).long()
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:seq_len]
        rows.append(ids)
    return torch.stack(rows)


def compare_kernels(device: str = "cuda", seq_len: int = 8192, batch: int = 1, n_heads: int = 32,
                    n_kv_heads: int = 8, head_dim: int = 128, window: int = 0, mean_doc_len: float = 1024.0,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """FlexAttention with this module's BlockMask against SDPA with the same dense boolean mask, on random q/k/v and
    lognormal documents: the largest relative difference of the outputs and (where flex has a backward, i.e. not on
    CPU) of the q/k/v gradients, the block mask's sparsity, and each path's peak memory above the inputs (CUDA)."""
    g = torch.Generator().manual_seed(seed)
    docs = random_documents(batch, seq_len, mean_doc_len, g).to(device)
    shape_q, shape_kv = (batch, n_heads, seq_len, head_dim), (batch, n_kv_heads, seq_len, head_dim)
    q, k, v = (torch.randn(s, generator=g).to(device, dtype) for s in (shape_q, shape_kv, shape_kv))
    grad = torch.randn(shape_q, generator=g).to(device, dtype)
    train = torch.device(device).type == "cuda"
    vis = Visibility.self_attention(seq_len, docs, window, device)
    result = {}
    for name, mask in (("flex", vis.block_mask()), ("dense", vis.dense())):
        inputs = [t.detach().clone().requires_grad_(train) for t in (q, k, v)]
        if train:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if name == "flex":
            out = flex(*inputs, mask)
        else:
            out = F.scaled_dot_product_attention(*inputs, attn_mask=mask, enable_gqa=True)
        if train:
            out.backward(grad)
            torch.cuda.synchronize()
            result[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
        result[name] = [out.detach().float()] + ([t.grad.float() for t in inputs] if train else [])
        if name == "flex":
            result["sparsity"] = mask.sparsity()
    flex_out, dense_out = result.pop("flex"), result.pop("dense")
    for name, a, b in zip(("out", "dq", "dk", "dv"), flex_out, dense_out):
        result[f"{name}_rel_diff"] = ((a - b).norm() / b.norm()).item()
    return result
