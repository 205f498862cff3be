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
             their gradients) and attend with the rank's mask over the gathered keys (SDPA + boolean mask on CPU,
             FlexAttention + BlockMask on CUDA).
  ring:      pass K/V around the ring, cp - 1 hops, each hop posted before the current block is computed. Each step
             runs a fused kernel that returns its output and log-sum-exp (SDPA's flash kernels), and the steps are
             merged exactly: with lse the running log-sum-exp and O the running output, a block (o, l) gives
                 lse' = log(e^lse + e^l),   O' = O e^(lse - lse') + o e^(l - lse').
             Backward re-runs the kernels' backward per block with the merged O and lse (which yields that block's
             share of the gradient), passing dK/dV accumulators around the ring behind the K/V; after cp hops they
             are back on the rank that owns the block. Never more than two K/V blocks in memory.
Without documents or windows a ring step is one of three unmasked shapes (the local block causally; an earlier
rank's first chunk seen by all queries; a later rank's whole block seen by the second chunk's queries), as in
PyTorch's own ring; with them, every step takes this rank's mask for that block (CPU only: on CUDA masked context
parallelism runs `allgather`, whose FlexAttention needs no dense mask).

PyTorch's `context_parallel` (torch 2.13) dispatches SDPA through DTensor: it has no CPU strategy, so no layout of
it can be checked against the single process here, and it takes no attention mask, so document masking needs these
kernels anyway; titan's ring follows the same algorithm and calls the same fused kernels per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention.flex_attention import BlockMask

from titan.errors import ConfigError
from titan.models.attention import Visibility, flex, uses_flex
from titan.models.layers import Transformer
from titan.parallel.activation_checkpoint import recompute_all

# torch 2.13 renamed it (the old name warns on every call); torch 2.11 has the old name only.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
aten = torch.ops.aten


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
    for block in model.layers.values():
        block.attention.sdpa = ContextParallelAttention(cp_mesh, rotate_method)
    model.mask_builder = ContextParallelMaskBuilder(cp_mesh.size(), cp_mesh.get_local_rank(), rotate_method,
                                                    set(model.mask_builder.windows))


# ---------------------------------------------------------------------------------------------------------------
# Masks: once per batch


@dataclass
class ContextParallelMasks:
    """One batch's masks on this rank, by window: for allgather, over (local queries, keys gathered in rank order);
    for the ring, one per step (the block from rank - step), None where the step needs no mask."""

    gathered: dict[int, torch.Tensor | BlockMask] = field(default_factory=dict)
    steps: dict[int, list[torch.Tensor] | None] = field(default_factory=dict)
    _additive: dict = field(default_factory=dict)

    def get(self, window: int) -> torch.Tensor | BlockMask:
        return self.gathered[window]

    def ring(self, window: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(additive mask in `dtype`, which query rows see any key) per step, converted once per batch and dtype."""
        if self.steps.get(window) is None:
            return None
        key = (window, dtype)
        if key not in self._additive:
            self._additive[key] = [(torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf")),
                                    m.any(-1)) for m in self.steps[window]]
        return self._additive[key]


class ContextParallelMaskBuilder:
    """Stands in for the model's `MaskBuilder` under context parallelism: from the whole document ids and the
    rank's positions, the masks of every window the layers use."""

    def __init__(self, cp: int, rank: int, method: str, windows: set[int], flex_masks: bool | None = None):
        self.cp, self.rank, self.method, self.windows, self.flex = cp, rank, method, sorted(windows), flex_masks

    def __call__(self, document_ids: torch.Tensor | None, local_positions: torch.Tensor | None) -> ContextParallelMasks:
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
                masks.gathered[window] = v.block_mask() if flex_masks else v.dense()
            elif document_ids is None and not 0 < window < seq_len:
                masks.steps[window] = None  # plain causal: the three unmasked step shapes
            else:
                masks.steps[window] = [vis(pos[(self.rank - s) % self.cp], window).dense() for s in range(self.cp)]
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
                window: int = 0) -> torch.Tensor:
        if self.method == "allgather":
            k_all = _all_gather_autograd(k.contiguous(), gather_dim=2, group=self.group)
            v_all = _all_gather_autograd(v.contiguous(), gather_dim=2, group=self.group)
            mask = masks.get(window)
            if isinstance(mask, BlockMask):
                return flex(q, k_all, v_all, mask)
            return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        return _RingAttention.apply(q, k, v, masks.ring(window, q.dtype), self.group, self.rank)


# ---------------------------------------------------------------------------------------------------------------
# The ring


class _Exchange:
    """Send `tensor` to the next rank of the ring and receive the previous rank's, posted now, waited for later."""

    def __init__(self, tensor: torch.Tensor, group, rank: int):
        size = dist.get_world_size(group)
        self.received = torch.empty_like(tensor)
        self.works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % size), group),
            dist.P2POp(dist.irecv, self.received, dist.get_global_rank(group, (rank - 1) % size), group)])

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


def _step_shape(step: int, src: int, rank: int, seq: int, masked: bool):
    """(query rows, key rows, causal) of one ring step: with masks all of them; without, the load-balanced causal
    structure (the own block causally; an earlier rank's first chunk for every query; a later rank's whole block
    for the second chunk's queries, which come after it)."""
    every, half = slice(0, seq), seq // 2
    if masked:
        return every, every, False
    if step == 0:
        return every, every, True
    return (every, slice(0, half), False) if src < rank else (slice(half, seq), every, False)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, step_masks, group, rank):
        cp, seq = dist.get_world_size(group), q.shape[2]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        kv, n_k, rests = torch.cat([k.flatten(), v.flatten()]), k.numel(), []
        for step in range(cp):
            pending = _Exchange(kv, group, rank) if step < cp - 1 else None  # in flight while this block computes
            kb, vb = kv[:n_k].view(k.shape), kv[n_k:].view(v.shape)
            src = (rank - step) % cp
            rows, cols, causal = _step_shape(step, src, rank, seq, step_masks is not None)
            mask, visible = step_masks[step] if step_masks is not None else (None, None)
            o, l, rest = _block_forward(q[:, :, rows], kb[:, :, cols], vb[:, :, cols], causal, mask)
            if visible is not None:  # a row that sees no key of this block adds nothing (the kernel says lse 0)
                l = l.masked_fill(~visible, float("-inf"))
            new = torch.logaddexp(lse[:, :, rows], l)
            out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - new)[..., None]
                               + o.float() * torch.exp(l - new)[..., None])
            lse[:, :, rows] = new
            rests.append(rest)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.step_masks, ctx.group, ctx.rank, ctx.rests = step_masks, group, rank, rests
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        step_masks, group, rank = ctx.step_masks, ctx.group, ctx.rank
        cp, seq = dist.get_world_size(group), q.shape[2]
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, n_k = torch.cat([k.flatten(), v.flatten()]), k.numel()
        dkv = None
        for step in range(cp):
            pending = _Exchange(kv, group, rank) if step < cp - 1 else None
            kb, vb = kv[:n_k].view(k.shape), kv[n_k:].view(v.shape)
            src = (rank - step) % cp
            rows, cols, causal = _step_shape(step, src, rank, seq, step_masks is not None)
            mask = step_masks[step][0] if step_masks is not None else None
            dq_s, dk_s, dv_s = _block_backward(grad_out[:, :, rows], q[:, :, rows], kb[:, :, cols], vb[:, :, cols],
                                               out[:, :, rows], lse[:, :, rows].contiguous(), causal, mask,
                                               ctx.rests[step])
            dq[:, :, rows] += dq_s.float()
            mine = torch.zeros((2, *k.shape), dtype=torch.float32, device=k.device)
            mine[0][:, :, cols], mine[1][:, :, cols] = dk_s.float(), dv_s.float()
            # The accumulator of this block came from the previous rank (zero at step 0); add ours, pass it on.
            dkv = mine if dkv is None else dkv + mine
            dkv = _Exchange(dkv, group, rank).wait()
            if pending is not None:
                kv = pending.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


# ---------------------------------------------------------------------------------------------------------------
# One block: a fused kernel that returns the log-sum-exp, and its backward


def _block_forward(q, k, v, causal: bool, mask: torch.Tensor | None):
    """(output in q's dtype, log-sum-exp in fp32 (batch, heads, q_len), what the backward needs) of one block;
    `mask` additive in q's dtype (CPU only)."""
    if q.device.type == "cpu":  # the CPU flash kernel reads grouped K/V heads itself
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)
        return out, lse.float(), None
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if q.dtype in (torch.float16, torch.bfloat16):
        out, lse, *rest = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        return out, lse.float(), ("flash", rest[:6])
    out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
    return out, lse[..., : q.shape[2]].float(), ("efficient", (seed, offset, lse.shape[-1]))


def _block_backward(grad_out, q, k, v, out, lse, causal: bool, mask: torch.Tensor | None, rest):
    """This block's share of dq, dk, dv (dk, dv at k's head count), given the merged output and log-sum-exp."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=mask)
    groups, rep = k.shape[1], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kind, saved = rest
    if kind == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = saved
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse.to(torch.float32), cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset)
    else:
        seed, offset, lse_len = saved
        lse = F.pad(lse, (0, lse_len - lse.shape[-1]))  # the kernel's own (padded) layout
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, None, out, lse, seed, offset, 0.0, [True, True, True, False], causal)
    fold = lambda g: g.unflatten(1, (groups, rep)).sum(2)  # noqa: E731 - back to the grouped K/V heads
    return dq, fold(dk), fold(dv)


def check_block_kernels(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seq: int = 256,
                        heads: int = 8, kv_heads: int = 2, head_dim: int = 64, seed: int = 0) -> dict[str, float]:
    """The per-block kernels of the ring against autograd through SDPA, on one device without a process group: for
    each step shape (causal, unmasked, half the queries, half the keys), the largest relative difference of the
    output, the lse-derived output and q/k/v gradients. For scripts/gpu_check: CPU tests cover the CPU kernels."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(1, kv_heads, seq, head_dim, generator=g).to(device, dtype) for _ in range(2))
    grad = torch.randn(q.shape, generator=g).to(device, dtype)
    worst = {}
    everything, first, second = slice(None), slice(0, seq // 2), slice(seq // 2, None)
    for rows, cols, causal in ((everything, everything, True), (everything, everything, False),
                               (everything, first, False), (second, everything, False)):
        qs, ks, vs = (t[:, :, s].contiguous().requires_grad_() for t, s in ((q, rows), (k, cols), (v, cols)))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True)
        ref.backward(grad[:, :, rows])
        out, lse, rest = _block_forward(qs.detach(), ks.detach(), vs.detach(), causal, None)
        grads = _block_backward(grad[:, :, rows].contiguous(), qs.detach(), ks.detach(), vs.detach(), out, lse,
                                causal, None, rest)
        for label, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, qs.grad, ks.grad, vs.grad)):
            diff = ((got.float() - want.float()).norm() / want.float().norm()).item()
            worst[label] = max(worst.get(label, 0.0), diff)
    return worst
