"""Multi-token prediction (MTP; DeepSeek-V3, section 2.2 of its report), for a single device, and the loop's side.

Depth k (1 ... D) predicts, at position t, token t+k+1: it joins the previous depth's normalised hidden state h_t
(the main model's for depth 1) with the embedding of token t+k,

    h'_t = norm(block(eh_proj([enorm(embed(token t+k)), hnorm(h_t)])))

through a transformer block of its own, and shares the embedding and the output head with the main model. Its loss
is the cross-entropy of output(h') against the labels shifted by k (positions whose target lies past the window, or
in another packed document, count in nothing), summed over the depths; the model attaches it to its logits with a
gradient scale (as the MoE balance loss is attached: titan/models/moe.py), so that the loop's LM loss and the
pipeline of losses stay as they are. The loop's side is two calls: `set_loss_scale(parts, n_items)` before the
step's forwards (weight / (D x the step's items): the mean over depths and tokens, times `mtp_loss_weight`) and
`step_metrics(parts, reduce, n_items)` after its optimizer step (the logged `mtp_loss`: that mean, unweighted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from titan.models.layers import RMSNorm
from titan.models.output_head import IGNORE_INDEX


class MultiTokenPrediction(nn.Module):
    """One MTP depth (module docstring): `forward(h, embedded, freqs_cis, mask) -> h'` (both normalised)."""

    def __init__(self, layer_id: int, args, block_class: type[nn.Module]):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = block_class(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: torch.Tensor, embedded: torch.Tensor, freqs_cis: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, freqs_cis, mask))

    def init_weights(self):
        for norm in (self.enorm, self.hnorm, self.norm):
            norm.init_weights()
        nn.init.trunc_normal_(self.eh_proj.weight, mean=0.0, std=0.02)
        self.block.init_weights()


def mtp_loss(depths: Iterable[MultiTokenPrediction], embed: nn.Module, output: nn.Module, tokens: torch.Tensor,
             labels: torch.Tensor, h: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None,
             document_ids: torch.Tensor | None) -> torch.Tensor:
    """The summed cross-entropy of every depth (module docstring); `h` the main model's normalised hidden state."""
    seq, total = tokens.shape[1], 0.0
    for k, depth in enumerate(depths, start=1):
        # Token t+k at position t. The last k positions wrap around to the window's start: causal attention keeps
        # them out of the earlier positions, and their targets are ignored.
        h = depth(h, embed(tokens.roll(-k, dims=1)), freqs_cis, mask)
        outside = torch.arange(seq, device=tokens.device) >= seq - k
        if document_ids is not None:
            outside = outside | (document_ids.roll(-k, dims=1) != document_ids)
        targets = labels.roll(-k, dims=1).masked_fill(outside, IGNORE_INDEX)
        total = total + F.cross_entropy(output(h).flatten(0, 1).float(), targets.flatten(),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
    return total


# ---------------------------------------------------------------------------------------------------------------
# The loop's side


def _with_mtp(model_parts: Iterable[nn.Module]) -> list[nn.Module]:
    return [p for p in model_parts if getattr(p, "mtp", None) is not None]


def set_loss_scale(model_parts: Iterable[nn.Module], n_items: torch.Tensor) -> None:
    """Before the step's first forward: MTP's gradient scale, mtp_loss_weight / (depths x the step's items)."""
    for part in _with_mtp(model_parts):
        part.mtp_loss_scale.copy_(part.args.mtp_loss_weight / (len(part.mtp) * n_items))


def step_metrics(model_parts: Iterable[nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor],
                 n_items: torch.Tensor) -> dict[str, torch.Tensor]:
    """After the step: `mtp_loss`, the MTP cross-entropy per depth and item (unweighted, comparable with `loss`),
    summed over the ranks by `reduce` (one all-reduce); the sums are reset. Empty without MTP."""
    parts = _with_mtp(model_parts)
    if not parts:
        return {}
    total = reduce(sum(p.mtp_loss_sum for p in parts))
    for p in parts:
        p.mtp_loss_sum.zero_()
    return {"mtp_loss": total / (len(parts[0].mtp) * n_items)}
