"""The ring of context parallelism (titan/parallel/context_parallel.py): K/V blocks passed around the `cp` ranks,
each hop posted before the current block is computed, every block attended with a fused kernel that also returns its
log-sum-exp, and the blocks merged exactly (lse' = log(e^lse + e^l), O' = O e^(lse - lse') + o e^(l - lse')).
Backward runs each kernel's backward with the merged output and log-sum-exp, which gives that block's share of the
gradient, and passes dK/dV accumulators around the ring behind the blocks; after cp hops they are home.

Kernels: CPU, SDPA's flash kernel for CPU (grouped K/V heads read directly; masks as additive floats); CUDA, the
flash kernel (bf16/fp16) or the memory-efficient one (fp32), unmasked only, K/V heads expanded locally (never on the
wire). `check_block_kernels` compares them with autograd through SDPA on any device, for scripts/gpu_check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan.parallel.activation_checkpoint import recompute_all

aten = torch.ops.aten


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


class RingAttention(torch.autograd.Function):
    """(q, k, v, per-step masks or None, group, rank) -> attention over every rank's keys, passed around the ring."""

    @staticmethod
    def forward(ctx, q, k, v, step_masks, group, rank):
        with recompute_all():  # selective op AC would keep every hop's kernel output; the ring keeps its own state
            out, lse, rests = _ring_forward(q, k, v, step_masks, group, rank)
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


def _ring_forward(q, k, v, step_masks, group, rank):
    """(output in q's dtype, log-sum-exp, each step's kernel state for backward): every block in turn, merged."""
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
    return out.to(q.dtype), lse, rests


# ---------------------------------------------------------------------------------------------------------------
# One block: a fused kernel that returns the log-sum-exp, and its backward


def _block_forward(q, k, v, causal: bool, mask: torch.Tensor | None):
    """(output in q's dtype, log-sum-exp in fp32 (batch, heads, q_len), what the backward needs) of one block;
    `mask` additive in q's dtype (CPU only)."""
    if q.device.type == "cpu":  # the CPU flash kernel reads grouped K/V heads itself
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask)
        return out, lse.float(), None
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.contiguous(), k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # slices: contiguous
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
    grad_out, q, out = grad_out.contiguous(), q.contiguous(), out.contiguous()
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
    output and of the q/k/v gradients. For scripts/gpu_check: CPU tests cover the CPU kernels."""
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
