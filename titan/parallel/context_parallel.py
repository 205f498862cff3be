"""Context parallelism: shard each sequence over the `cp` mesh dim and compute exact attention across shards.

What it shards: the sequence. With causal attention the late positions do more work than the early ones, so the
sequence is cut into 2 x cp chunks and rank r holds chunk r and its mirror 2cp-1-r ("load balancing"): every rank
then has the same amount of causal work. Token ids, labels and positions (RoPE rows) are sharded the same way; the
document ids stay whole (a query must know every key's document), and `ContextParallelMaskBuilder`, which replaces
the model's mask builder, turns them into this rank's masks once per batch. Everything in a block except attention
is per token and needs nothing else.

Attention needs every earlier key, so each rank sees all K/V blocks, one of two ways (`context_parallel_rotate_method`),
with K/V at their own (grouped-query) head count, in the training dtype:
  allgather: gather K and V from every rank once (autograd-aware functional collectives: backward reduce-scatters
             their gradients) and attend with the rank's mask over the gathered keys (SDPA with a dense mask on CPU,
             FlexAttention with a BlockMask on CUDA).
  ring:      pass K/V around the ring, each hop posted before the current block is computed, every block through a
             fused kernel that returns its log-sum-exp, merged exactly (titan/parallel/ring_attention.py). Without
             documents or windows a step is one of three unmasked shapes, as in PyTorch's own ring; with them every
             step takes this rank's dense mask for that block (CPU only: on CUDA masked attention runs `allgather`).
             A v narrower than k (MLA) travels zero-padded to k's head size (the padding's output is dropped).
Attention sinks (gpt-oss, titan/models/sinks.py) need the scores: allgather only, with dense additive masks.

PyTorch's `context_parallel` (torch 2.13) dispatches SDPA through DTensor: it has no CPU strategy, so no layout of
it can be checked against the single process here, and it takes no attention mask, so document masking needs these
kernels anyway; titan's ring follows the same algorithm and calls the same fused kernels per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.flex_attention import BlockMask

from titan.errors import ConfigError
from titan.models.attention import Visibility, flex, uses_flex
from titan.models.layers import Transformer
from titan.models.sinks import sink_attention
from titan.parallel.ring_attention import RingAttention

# torch 2.13 renamed it (the old name warns on every call); torch 2.11 has the old name only.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions held by `rank`: chunk `rank` and its mirror chunk 2cp-1-rank."""
    chunk = seq_len // (2 * cp)
    head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([head, tail])


def check_seq_len(seq_len: int, cp: int, tp: int, key: str = "training.seq_len") -> None:
    if cp > 1 and seq_len % (2 * cp * tp):
        raise ConfigError(f"{key}={seq_len} must be divisible by 2 x context_parallel_degree"
                          + (f" x tensor_parallel_degree (sequence parallel) = {2 * cp * tp}" if tp > 1 else
                             f" = {2 * cp}") + " for load-balanced context parallelism")
    if tp > 1 and seq_len % tp:
        raise ConfigError(f"{key}={seq_len} must be divisible by tensor_parallel_degree={tp} "
                          "(sequence parallel splits it)")


def check_masking(cp: int, rotate_method: str, masked: bool, device_type: str) -> None:
    """Masked attention (documents or sliding windows) under the ring needs dense per-block masks: CPU only."""
    if cp > 1 and masked and rotate_method == "ring" and device_type == "cuda":
        raise ConfigError("parallelism.context_parallel_rotate_method=ring with document masking, packing or sliding "
                          "windows runs on CPU only (dense per-block masks); on CUDA use allgather (FlexAttention)")


def shard_batch(batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """This rank's load-balanced slice of every (batch, seq) tensor, with each token's RoPE position (its global
    position unless the batch brings its own); "document_ids" stay whole for the mask builder."""
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    if cp == 1:
        return batch
    rows, seq_len = batch["input"].shape
    idx = positions(seq_len, cp, rank, batch["input"].device)
    out = {k: v if k == "document_ids" else v[:, idx] for k, v in batch.items()}
    out.setdefault("positions", idx.expand(rows, -1))
    return out


def apply_cp(model: Transformer, cp_mesh: DeviceMesh, rotate_method: str) -> None:
    """Swap each block's attention kernel and the model's mask builder for the context-parallel ones (before
    AC/compile/FSDP wrap the blocks)."""
    if rotate_method not in ("allgather", "ring"):
        raise ConfigError(f"parallelism.context_parallel_rotate_method={rotate_method!r} is not one of "
                          "allgather, ring")
    sinks = False
    for i, block in model.layers.items():
        if getattr(block.attention, "sinks", None) is not None:
            if rotate_method == "ring":
                raise ConfigError(f"parallelism.context_parallel_rotate_method = ring does not do the sinks of "
                                  f"layers.{i}.attention; use allgather")
            sinks = True
        block.attention.sdpa = ContextParallelAttention(cp_mesh, rotate_method)
    model.mask_builder = ContextParallelMaskBuilder(cp_mesh.size(), cp_mesh.get_local_rank(), rotate_method,
                                                    set(model.mask_builder.windows), False if sinks else None)


# ---------------------------------------------------------------------------------------------------------------
# Masks: once per batch


@dataclass
class ContextParallelMasks:
    """One batch's masks on this rank, by window: for allgather, over (local queries, keys gathered in rank order);
    for the ring, per step (the block from rank - step) an additive mask and which query rows see any of its keys,
    or None where no step needs a mask."""

    gathered: dict[int, torch.Tensor | BlockMask] = field(default_factory=dict)
    steps: dict[int, list[tuple[torch.Tensor, torch.Tensor]] | None] = field(default_factory=dict)

    def get(self, window: int) -> torch.Tensor | BlockMask:
        return self.gathered[window]

    def ring(self, window: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        return self.steps.get(window)


class ContextParallelMaskBuilder:
    """Stands in for the model's `MaskBuilder` under context parallelism: from the whole document ids and the
    rank's positions, the masks of every window the layers use."""

    def __init__(self, cp: int, rank: int, method: str, windows: set[int], flex_masks: bool | None = None):
        self.cp, self.rank, self.method, self.windows, self.flex = cp, rank, method, sorted(windows), flex_masks

    def __call__(self, document_ids: torch.Tensor | None, local_positions: torch.Tensor | None,
                 dtype: torch.dtype = torch.float32) -> ContextParallelMasks:
        if local_positions is None:
            raise ValueError("context parallelism needs the batch's positions (titan.parallel.context_parallel."
                             "shard_batch adds them)")
        device, seq_len = local_positions.device, local_positions.shape[1] * self.cp
        pos = [positions(seq_len, self.cp, r, device) for r in range(self.cp)]
        flex_masks = uses_flex(device) if self.flex is None else self.flex

        def vis(keys: torch.Tensor, window: int) -> Visibility:
            docs = document_ids
            return Visibility(pos[self.rank], keys, None if docs is None else docs[:, pos[self.rank]],
                              None if docs is None else docs[:, keys], window)

        masks = ContextParallelMasks()
        for window in self.windows:
            if self.method == "allgather":
                v = vis(torch.cat(pos), window)
                masks.gathered[window] = v.block_mask() if flex_masks else v.additive(dtype)
            elif document_ids is None and not 0 < window < seq_len:
                masks.steps[window] = None  # plain causal: the three unmasked step shapes
            else:
                steps = [vis(pos[(self.rank - s) % self.cp], window) for s in range(self.cp)]
                masks.steps[window] = [(v.additive(dtype), v.dense().any(-1)) for v in steps]
        return masks


# ---------------------------------------------------------------------------------------------------------------
# The attention module


class ContextParallelAttention(nn.Module):
    """Attention for load-balanced sequence shards (batch, heads, seq/cp, head_dim); k and v may have fewer heads
    than q (grouped-query attention), and travel that way."""

    def __init__(self, cp_mesh: DeviceMesh, rotate_method: str):
        super().__init__()
        self.group, self.method = cp_mesh.get_group(), rotate_method
        self.cp, self.rank = cp_mesh.size(), cp_mesh.get_local_rank()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: ContextParallelMasks,
                window: int = 0, sinks: torch.Tensor | None = None, q_columns: None = None) -> torch.Tensor:
        """`sinks`: gpt-oss's per-head sink logits (allgather only, `apply_cp` checks); `q_columns` is a KV cache's
        (generation never runs under context parallelism)."""
        if self.method == "allgather":
            k_all = _all_gather_autograd(k.contiguous(), gather_dim=2, group=self.group)
            v_all = _all_gather_autograd(v.contiguous(), gather_dim=2, group=self.group)
            mask = masks.get(window)
            if sinks is not None:
                return sink_attention(q, k_all, v_all, mask, sinks)
            if isinstance(mask, BlockMask):
                return flex(q, k_all, v_all, mask)
            return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        narrow = k.shape[-1] - v.shape[-1]
        if narrow < 0:
            raise NotImplementedError("the ring needs v's head size <= k's")
        if narrow:  # MLA: the fused kernels want one head size; zero columns of v give zero output columns
            v = F.pad(v, (0, narrow))
        out = RingAttention.apply(q, k, v, masks.ring(window), self.group, self.rank)
        return out[..., : out.shape[-1] - narrow] if narrow else out
