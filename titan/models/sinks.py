"""Attention with a sliding window and attention sinks (gpt-oss), for a single device: the kernel module and its
masked path. Kept apart from titan/models/layers.py so that the attention seam of issue 26 (FlexAttention, its
block masks) can take the window over without touching this family: `WindowSinkSDPA` is the one place to change.

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


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [len(q_pos), len(k_pos)]: causal, and within `window` tokens when one is given (True = may attend)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                   sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention over (batch, heads, seq, head_dim) with `allowed` (broadcastable to [batch, heads, q, k])
    and an optional sink logit per head [heads]; k and v may have fewer heads than q (grouped-query attention).
    Scores in fp32, result in q's dtype."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]  # the sink's share is dropped
    else:
        probs = scores.softmax(dim=-1)
    return (probs @ v.float()).to(q.dtype)


class WindowSinkSDPA(nn.Module):
    """The attention kernel of a gpt-oss layer: causal, within `window` tokens on sliding layers (None = full
    attention), with the layer's sinks (passed by the attention module, which owns them as `attention.sinks`).
    `mask` (batch, seq, seq), True = may attend, restricts it further to each packed document. Context
    parallelism replaces this module and reads `window` from it (titan/parallel/context_parallel.py)."""

    def __init__(self, window: int | None):
        super().__init__()
        self.window = window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                sinks: torch.Tensor | None = None, q_columns: torch.Tensor | None = None) -> torch.Tensor:
        """`q_columns`: the key columns the queries were written to (a KV cache's slots; a row's tokens sit in
        consecutive columns, so column distance is token distance); default: queries and keys are the same tokens."""
        k_pos = torch.arange(k.shape[2], device=q.device)
        allowed = window_mask(k_pos if q_columns is None else q_columns, k_pos, self.window)
        if mask is not None:
            allowed = allowed & mask
        allowed = allowed.unsqueeze(1) if allowed.dim() == 3 else allowed
        if sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        return sink_attention(q, k, v, allowed, sinks)

    def extra_repr(self) -> str:
        return f"window={self.window}"
