"""Attention with a sliding window and attention sinks (gpt-oss), for a single device: the kernel module and its
masked path. The window is the layer's `window` of the attention seam (titan/models/attention.py): the model builds
each batch's masks once (its `mask_builder`, dense additive masks here since sinks need the scores) and this kernel
reads its window's; without documents it builds the window from the shape, and while generating from cache columns.

Sliding window: the query at position i sees the keys i - window + 1 ... i (Hugging Face's rule), and only those of
its own document when sequences are packed. Sinks: one learned logit per head that joins every query's softmax and
takes part of the probability mass without contributing a value,

    out_i = sum_j p_ij v_j,   p_ij = exp(s_ij) / (sum_j' exp(s_ij') + exp(sink_h)),

so a head may attend to (almost) nothing. The path here materialises the fp32 scores [batch, heads, seq, seq]
(exact: the tests' reference; at the debug shapes it is cheap, at 128k tokens it is not). On CPU that is the only
choice (FlexAttention has no CPU backward in torch 2.13); on a GPU the efficient form is a kernel that returns the
log-sum-exp, since out = attention(q, k, v) * sigmoid(lse - sink): the FlexAttention seam is where it belongs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.attention import AttentionMasks


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [len(q_pos), len(k_pos)]: causal, and within `window` tokens when one is given (None or 0 = none;
    True = may attend)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                   sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention over (batch, heads, seq, head_dim) with `allowed` (broadcastable to [batch, heads, q, k];
    boolean, True = may attend, or additive: 0 or -inf) and an optional sink logit per head [heads]; k and v may have
    fewer heads than q (grouped-query attention). Scores in fp32, result in q's dtype."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else scores + allowed.float()
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]  # the sink's share is dropped
    else:
        probs = scores.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)


class WindowSinkSDPA(nn.Module):
    """The attention kernel of a gpt-oss layer: causal, within the layer's `window` (0 = full attention, passed by
    the attention module like the shared `SDPA`'s), with the layer's sinks (passed by the attention module, which
    owns them as `attention.sinks`). `mask`: the batch's `AttentionMasks` (packed documents; additive, window
    included), or a generation cache's dense boolean (batch, q_len, max_len). Context parallelism replaces this
    module (titan/parallel/context_parallel.py)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: AttentionMasks | torch.Tensor | None = None, window: int = 0, sinks: torch.Tensor | None = None,
                q_columns: torch.Tensor | None = None) -> torch.Tensor:
        """`q_columns`: the key columns the queries were written to (a KV cache's slots; a row's tokens sit in
        consecutive columns, so column distance is token distance); default: queries and keys are the same tokens."""
        if isinstance(mask, AttentionMasks):
            allowed = mask.get(window)
        else:
            k_pos = torch.arange(k.shape[2], device=q.device)
            allowed = window_mask(k_pos if q_columns is None else q_columns, k_pos, window)
            if mask is not None:
                allowed = allowed & mask
            allowed = allowed.unsqueeze(1) if allowed.dim() == 3 else allowed
        if sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return sink_attention(q, k, v, allowed, sinks)
