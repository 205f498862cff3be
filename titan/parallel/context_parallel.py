"""Context parallelism: shard each sequence over the `cp` mesh dim and compute exact causal attention across shards.

What it shards: the sequence. With causal attention the late positions do more work than the early ones, so the
sequence is cut into 2 x cp chunks and rank r holds chunk r and its mirror 2cp-1-r ("load balancing"): every rank
then has the same amount of causal work. Token ids, labels and RoPE rows are sharded the same way; everything in a
block except attention is per token and needs nothing else.

Attention needs every earlier key, so each rank sees all K/V blocks, one of two ways (`context_parallel_rotate_method`):
  allgather: gather K and V from every rank once (autograd-aware functional collectives: backward reduce-scatters
             their gradients) and attend with a causal mask built from the true positions.
  ring:      pass K/V blocks around the ring with send/recv, one per step, and merge the partial results with the
             online-softmax recurrence (below); backward passes the blocks around again together with their gradient
             accumulators, which end up back on the rank that owns the block. Never more than two K/V blocks in memory.

The online-softmax recurrence, for one query row and key blocks j = 1, 2, ...:
    S_j = q K_j^T / sqrt(d)                      scores against block j (masked: -inf where key pos > query pos)
    m'  = max(m, rowmax(S_j))                    running max
    l   = l * exp(m - m') + rowsum(exp(S_j - m')) running denominator, rescaled when the max grows
    O   = O * exp(m - m') + exp(S_j - m') V_j     running (unnormalised) output, rescaled the same way
    m   = m'
and at the end O / l is exactly softmax(q K^T / sqrt(d)) V, without ever holding the full score matrix.
PyTorch's own `context_parallel` has no CPU sharding strategy for SDPA (torch 2.13), so titan carries this one.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from titan.errors import ConfigError
from titan.models.layers import Transformer
from titan.models.sinks import sink_attention, window_mask
from titan.parallel.activation_checkpoint import recompute_all

# torch 2.13 renamed it (the old name warns on every call); torch 2.11 has the old name only.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd


def positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions held by `rank`: chunk `rank` and its mirror chunk 2cp-1-rank."""
    chunk = seq_len // (2 * cp)
    head = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    tail = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([head, tail])


def check_seq_len(seq_len: int, cp: int, tp: int) -> None:
    if cp > 1 and seq_len % (2 * cp * tp):
        raise ConfigError(f"training.seq_len={seq_len} must be divisible by 2 x context_parallel_degree"
                          + (f" x tensor_parallel_degree (sequence parallel) = {2 * cp * tp}" if tp > 1 else
                             f" = {2 * cp}") + " for load-balanced context parallelism")
    if tp > 1 and seq_len % tp:
        raise ConfigError(f"training.seq_len={seq_len} must be divisible by tensor_parallel_degree={tp} "
                          "(sequence parallel splits it)")


def shard_batch(batch: dict[str, torch.Tensor], cp_mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """This rank's load-balanced slice of every (batch, seq) tensor."""
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    if cp == 1:
        return batch
    idx = positions(batch["input"].shape[1], cp, rank)
    return {k: v[:, idx] for k, v in batch.items()}


def apply_cp(model: Transformer, cp_mesh: DeviceMesh, rotate_method: str) -> None:
    """Swap each block's attention kernel for the context-parallel one (before AC/compile/FSDP wrap the block),
    keeping its sliding window (gpt-oss); windows and sinks take the allgather method."""
    for i, block in model.layers.items():
        window = getattr(block.attention.sdpa, "window", None)
        if rotate_method == "ring" and (window is not None or getattr(block.attention, "sinks", None) is not None):
            raise ConfigError(f"parallelism.context_parallel_rotate_method = ring does not do the sliding window or "
                              f"the sinks of layers.{i}.attention; use allgather")
        block.attention.sdpa = ContextParallelAttention(cp_mesh, rotate_method, window)


def shard_rope(model: Transformer, cp_mesh: DeviceMesh) -> None:
    """Keep only this rank's RoPE rows, in its token order: attention slices `freqs_cis[:local_len]`, which then are
    exactly the rotations of the positions this rank holds. Call after the buffers are initialised."""
    cp, rank = cp_mesh.size(), cp_mesh.get_local_rank()
    model.freqs_cis = model.freqs_cis[positions(model.args.max_seq_len, cp, rank, model.freqs_cis.device)]


class ContextParallelAttention(nn.Module):
    """Causal attention for load-balanced sequence shards (batch, heads, seq/cp, head_dim); k and v may have fewer
    heads than q (grouped-query attention, as titan's `SDPA`): allgather gathers them as they are, the ring repeats
    them first (its recurrence pairs every query head with one K/V head); v may have another head size (MLA).
    allgather also takes a sliding `window` and sinks (gpt-oss, titan/models/sinks.py), by the true positions."""

    def __init__(self, cp_mesh: DeviceMesh, rotate_method: str, window: int | None = None):
        super().__init__()
        if rotate_method not in ("allgather", "ring"):
            raise ConfigError(f"parallelism.context_parallel_rotate_method={rotate_method!r} is not one of "
                              "allgather, ring")
        self.group, self.method, self.window = cp_mesh.get_group(), rotate_method, window
        self.cp, self.rank = cp_mesh.size(), cp_mesh.get_local_rank()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:  # config validation refuses packed sequences with CP before it gets here
            raise NotImplementedError("context parallelism does not support packed-sequence masks")
        seq_len = q.shape[2] * self.cp
        pos = [positions(seq_len, self.cp, r, q.device) for r in range(self.cp)]
        if self.method == "allgather":
            k_all = _all_gather_autograd(k.contiguous(), gather_dim=2, group=self.group)
            v_all = _all_gather_autograd(v.contiguous(), gather_dim=2, group=self.group)
            mask = window_mask(pos[self.rank], torch.cat(pos), self.window)  # keys gathered in rank order
            if sinks is not None:
                return sink_attention(q, k_all, v_all, mask, sinks)
            return nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _RingAttention.apply(q, k, v, pos, self.group, self.rank)


def _rotate(tensor: torch.Tensor, group, rank: int) -> torch.Tensor:
    """Send `tensor` to the next rank of the ring and return the one received from the previous rank."""
    size = dist.get_world_size(group)
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % size), group),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos, group, rank):
        with recompute_all():
            cp, scale = len(pos), 1.0 / math.sqrt(q.shape[-1])
            qf = q.float()
            m = torch.full(q.shape[:-1], float("-inf"), device=q.device)  # running max
            l = torch.zeros(q.shape[:-1], device=q.device)  # running denominator
            acc = torch.zeros(*q.shape[:-1], v.shape[-1], device=q.device)  # running unnormalised output
            dk = k.shape[-1]
            kv = torch.cat([k, v], dim=-1)  # one message per hop (v may be narrower than k: MLA)
            for step in range(cp):
                # Start with our own block: its diagonal makes every row's max finite, so no -inf - -inf = nan later.
                src = (rank - step) % cp
                if step < cp - 1:
                    next_kv = _rotate(kv, group, rank)  # (a real overlap would post this before the maths below)
                s = (qf @ kv[..., :dk].float().transpose(-1, -2)) * scale
                s = s.masked_fill(pos[src][None, :] > pos[rank][:, None], float("-inf"))
                m_new = torch.maximum(m, s.amax(-1))
                rescale = torch.exp(m - m_new)
                p = torch.exp(s - m_new[..., None])
                l = l * rescale + p.sum(-1)
                acc = acc * rescale[..., None] + p @ kv[..., dk:].float()
                m = m_new
                if step < cp - 1:
                    kv = next_kv
            out = acc / l[..., None]
            lse = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pos, ctx.group, ctx.rank = pos, group, rank
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        pos, group, rank = ctx.pos, ctx.group, ctx.rank
        cp, scale = len(pos), 1.0 / math.sqrt(q.shape[-1])
        qf, do = q.float(), grad_out.float()
        delta = (do * out).sum(-1)  # rowsum(dO * O), the softmax-backward correction term
        dq = torch.zeros_like(qf)
        # K, V and their gradient accumulators travel together; after cp hops the accumulators are home.
        widths = [k.shape[-1], v.shape[-1]] * 2
        block = torch.cat([k.float(), v.float(), torch.zeros_like(k, dtype=torch.float32),
                           torch.zeros_like(v, dtype=torch.float32)], dim=-1)
        for step in range(cp):
            src = (rank - step) % cp
            kb, vb, dkb, dvb = block.split(widths, dim=-1)
            s = (qf @ kb.transpose(-1, -2)) * scale
            s = s.masked_fill(pos[src][None, :] > pos[rank][:, None], float("-inf"))
            p = torch.exp(s - lse[..., None])  # the forward's probabilities, recomputed
            dp = do @ vb.transpose(-1, -2)
            ds = p * (dp - delta[..., None])
            dq += (ds @ kb) * scale
            block = torch.cat([kb, vb, dkb + (ds.transpose(-1, -2) @ qf) * scale, dvb + p.transpose(-1, -2) @ do],
                              dim=-1)
            block = _rotate(block.contiguous(), group, rank)
        _, _, dk, dv = block.split(widths, dim=-1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
