"""The output projection (dim -> vocab), which can also return the summed cross-entropy of its logits without ever
holding them whole, and without computing them twice.

`output(h)` is an `nn.Linear`. `output(h, labels, chunk_tokens)` (titan/objectives/token.py:HeadLoss, where nothing
splits the head: no tensor or pipeline parallelism, no LoRA or float8 on it) returns the sum over labelled tokens of
-log softmax(h W^T)[label]. Forward goes over chunks of `chunk_tokens` tokens: each chunk's logits, its loss, the
gradient of that loss with respect to the logits (softmax - one-hot), and from it at once the gradients with respect
to h and W; then the chunk's logits are gone. Backward only scales the two gradients by the incoming one. So the
matmul work is the whole-logits loss's (one product forward, two backward), where a checkpointed chunk
(HeadLoss's other path) computes its logits a second time in backward. The head is still called as a module, so
FSDP's unshard before it and its gradient reduce-scatter after it run as for any linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # titan/data/pretrain.py's: labels that count in no loss


class OutputHead(nn.Linear):
    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, chunk_tokens: int = 0) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        weight, device = self.weight, h.device.type
        if torch.is_autocast_enabled(device):  # as autocast's F.linear: both in its dtype, the gradients cast back
            dtype = torch.get_autocast_dtype(device)
            weight, h = weight.to(dtype), h.to(dtype)
        with torch.autocast(device, enabled=False):  # the function's matmuls and buffers then share one dtype
            return LinearCrossEntropy.apply(h, weight, labels, chunk_tokens)


def fusable(head: nn.Module | None, split: bool) -> bool:
    """Whether HeadLoss can hand the token loss to `head`: an OutputHead (FSDP's subclass of it too; LoRA and float8
    put modules of their own in its place) with the whole weight on each rank, and one backward through the loss
    (`split`: tensor parallelism shards the weight; a pipeline schedule may split backward into input and weight
    passes)."""
    return not split and isinstance(head, OutputHead)


class LinearCrossEntropy(torch.autograd.Function):
    """(hidden (..., dim), weight (vocab, dim), labels (...), chunk_tokens) -> summed cross-entropy (fp32 scalar),
    both gradients computed in forward. One backward only: it scales the stored gradients in place."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int):
        h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk_tokens):
            chunk = slice(i, i + chunk_tokens)
            loss += _chunk(h[chunk], weight, y[chunk], grad_h[chunk], grad_w)
        ctx.grads = grad_h.view_as(hidden), grad_w
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.grads
        del ctx.grads  # a second backward through the same graph has nothing left to scale: it fails, not doubles
        return grad_h.mul_(grad_loss), None if grad_w is None else grad_w.mul_(grad_loss), None, None


def _chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, grad_h: torch.Tensor,
           grad_w: torch.Tensor | None) -> torch.Tensor:
    """One chunk's summed loss; writes its rows of grad_h and adds its part of grad_w. A function of its own so that
    its logits are freed when it returns, before the next chunk's exist."""
    labelled = (y != IGNORE_INDEX)[:, None]
    target = torch.where(labelled[:, 0], y, 0)[:, None]
    # Every step in place, in the chunk's fp32 logits (as cross_entropy_sum takes them): no second copy.
    logits = F.linear(h, weight).float()
    shifted = logits.sub_(logits.amax(dim=1, keepdim=True))
    picked = shifted.gather(1, target)
    total = shifted.exp_().sum(dim=1, keepdim=True)
    loss = torch.where(labelled, total.log() - picked, 0).sum()
    # d loss / d logits: softmax - one-hot on labelled tokens, 0 on the others
    grad = shifted.div_(total).scatter_add_(1, target, torch.full_like(total, -1.0)).mul_(labelled).to(h.dtype)
    grad_h.copy_(grad @ weight)
    if grad_w is not None:
        grad_w.addmm_(grad.t(), h)
    return loss
