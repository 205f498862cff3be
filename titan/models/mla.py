"""Multi-head latent attention (MLA; DeepSeek-V2/V3), for a single device.

Keys and values come from one low-rank latent per token: x -> wkv_a -> [c (kv_lora_rank) | k_rope (rope dims)],
c -> RMSNorm -> wkv_b -> per head [k_nope (qk_nope_head_dim) | v (v_head_dim)]. Queries likewise through their own
latent (wq_a -> RMSNorm -> wq_b, q_lora_rank; or one projection wq when q_lora_rank = 0), per head
[q_nope | q_rope]. Position enters only through the "decoupled" RoPE part: q_rope per head and one k_rope shared
by all heads, so the latent itself carries no position (what lets inference cache c instead of K and V; in
training nothing is cached, and K and V are expanded per head). A head's score is q_nope.k_nope + q_rope.k_rope
over qk_nope + qk_rope channels; its value has v_head_dim channels. The softmax scale is 1/sqrt(qk head dim),
times YaRN's mscale_all_dim temperature squared under YaRN scaling (DeepSeek's reference does the same).

RoPE layout: DeepSeek's checkpoints (rope_interleave = true, the default of transformers' DeepseekV3Config) rotate
consecutive channel pairs of the rope part, as titan does, so no permutation is needed on import or export.

The module keeps titan's attention interface (x, freqs_cis, mask) and its kernel as `.sdpa` (the shared `SDPA`,
which takes a value head size apart from the query's), so context parallelism swaps it as for any attention; tensor
parallelism splits the heads (wq / wq_b, wkv_b, wo) and computes the latents whole on every rank. The
scale is applied to q before the kernel (every kernel then uses its default 1/sqrt(head dim)). The latent norms'
epsilon is 1e-6 whatever the model's `norm_eps` (as in DeepSeek's code and transformers').
"""

from __future__ import annotations

import math

import torch
from torch import nn

from titan.models.layers import (
    SDPA,
    LayerCache,
    RMSNorm,
    TransformerArgs,
    YarnScaling,
    apply_rotary_emb,
    yarn_mscale,
)


def softmax_scale(args: TransformerArgs) -> float:
    """1/sqrt(qk head dim), with YaRN's mscale_all_dim temperature applied twice (q and k) under YaRN."""
    scale = args.head_dim ** -0.5
    s = args.rope_scaling
    if isinstance(s, YarnScaling) and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    """MLA over `args` with q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, n_heads
    (every head has its own K and V: no grouping) and latent_norm_eps (module docstring)."""

    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank, qk = args.kv_lora_rank, args.qk_nope_head_dim + args.qk_rope_head_dim
        if args.q_lora_rank:
            self.wq = None
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(args.q_lora_rank, args.latent_norm_eps)
            self.wq_b = nn.Linear(args.q_lora_rank, args.n_heads * qk, bias=False)
        else:
            self.wq = nn.Linear(args.dim, args.n_heads * qk, bias=False)
            self.wq_a = self.q_a_norm = self.wq_b = None
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(args.kv_lora_rank, args.latent_norm_eps)
        self.wkv_b = nn.Linear(args.kv_lora_rank, args.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(args.n_heads * self.v_dim, args.dim, bias=False)
        # Hook point, the identity here: the one key RoPE part shared by every head. Under tensor parallelism each
        # rank holds some heads, so its gradient is a partial sum that the tp axis completes (a hook on this module).
        self.rope_key = nn.Identity()
        self.sdpa = SDPA()
        # q is multiplied by this, so that the kernel's own 1/sqrt(qk) makes the scale `softmax_scale(args)`.
        self.q_scale = softmax_scale(args) * math.sqrt(qk)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1 instead of the head count: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q_nope, q_rope = q.view(bs, seqlen, -1, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        q_rope, k_rope = apply_rotary_emb(q_rope, self.rope_key(k_rope).unsqueeze(2), freqs_cis)  # for all heads
        kv = self.wkv_b(self.kv_a_norm(latent)).view(bs, seqlen, -1, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        k = torch.cat([k_nope, k_rope.expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:  # generation: the expanded K and V are cached (caching the latent would be smaller)
            k, v = cache.update(k, v)
        out = self.sdpa(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

    def init_weights(self, init_std: float):
        for w in (self.wq, self.wq_a, self.wq_b, self.wkv_a, self.wkv_b):
            if w is not None:
                nn.init.trunc_normal_(w.weight, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, mean=0.0, std=init_std)
        for norm in (self.q_a_norm, self.kv_a_norm):
            if norm is not None:
                norm.init_weights()
