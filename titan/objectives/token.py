"""The next-token objective (pre-training and SFT): the summed cross-entropy over the labelled tokens of a
micro-batch, and the model inputs a batch carries besides its token ids.

The output projection can run here rather than in the model (`HeadLoss` with `chunk_tokens`): the model returns its
final hidden states (`Transformer.output_hidden`) and the projection and the loss go over chunks of the sequence, so
that forward holds one chunk's logits at a time (not batch x seq x vocab, plus an fp32 copy). Two ways, exact both:
- `fused` (the token loss, on a plain head that nothing splits): the head computes each chunk's gradients in forward
  (titan/models/output_head.py), so no matmul runs twice;
- recomputed (training.loss_chunk_recompute: the preference objectives' per-row log-probabilities; a head with
  LoRA, NF4 or float8, or split by tensor or pipeline parallelism): each chunk under activation checkpointing, its
  logits computed again in backward, one more output-projection forward per step. The head is called as a module,
  so whatever it is works unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint

from titan.data.pretrain import IGNORE_INDEX

MODEL_INPUTS = ("document_ids", "positions")  # besides the token ids; packed rows carry them


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword inputs of the model besides the token ids: document ids and positions of packed rows, if present."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed (not averaged) token loss: the caller divides by the global number of valid tokens."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    # Under loss parallel the result is a replicated DTensor; the loop works with plain tensors.
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) of every position in fp32, 0 where the label is IGNORE_INDEX: (rows, seq, vocab) -> (rows,
    seq). Under loss parallel (vocab-sharded logits) the cross-entropy reduces over the shards."""
    out = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    # Under loss parallel (vocab-sharded logits) this is a DTensor; the RL and preference losses have no rules.
    out = out.full_tensor() if isinstance(out, DTensor) else out
    return out.view(labels.shape)


def row_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens, in fp32: (rows, seq, vocab) -> (rows,)."""
    return token_logps(logits, labels).sum(dim=1)


@dataclass
class HeadLoss:
    """(the model's output, labels) -> summed token loss (`__call__`) or per-row log-probabilities (`row_logps`).
    Without a `head` the output is the logits. With one, it is the final hidden states and the head runs here over
    chunks of at most `chunk_tokens` tokens (whole rows' slices of the sequence), each checkpointed; a micro-batch
    that fits in one chunk runs unchunked, as without a head."""

    head: nn.Module | None = None
    chunk_tokens: int = 0
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy_sum
    reentrant: bool = True  # False where backward runs through autograd.grad (pipeline stages): see _over_chunks
    fused: bool = False  # the head is an OutputHead that computes the token loss's gradients in forward (above)

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.fused and torch.is_grad_enabled():
            return self.head(output, labels, self.chunk_tokens)
        return self._over_chunks(self.loss, output, labels)

    def row_logps(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Summed over the whole row's positions, not chunk by chunk: the same additions as a reference's
        # `token_logps(...).sum(dim=1)`, so that a policy equal to its reference has log-ratios of exactly 0.
        return self.token_logps(output, labels).sum(dim=1)

    def token_logps(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(label) per position (rows, seq); chunked, each chunk's (rows, chunk) part is all it keeps."""
        return self._over_chunks(token_logps, output, labels, combine=lambda parts: torch.cat(list(parts), dim=1))

    def _over_chunks(self, fn, output: torch.Tensor, labels: torch.Tensor, combine=sum) -> torch.Tensor:
        if self.head is None:
            return fn(output, labels)
        if isinstance(output, DTensor):  # sequence parallel: gather the hidden states once (not the logits)
            output = output.redistribute(output.device_mesh, [Replicate()])
        rows, seq = labels.shape
        step = max(1, self.chunk_tokens // rows)
        if step >= seq or not torch.is_grad_enabled():  # nothing to recompute: one chunk, or no backward
            return combine(fn(self.head(output[:, i:i + step]), labels[:, i:i + step]) for i in range(0, seq, step))

        def chunk_loss(hidden, chunk_labels):
            return fn(self.head(hidden), chunk_labels)

        # Checkpointed: forward keeps only each chunk's loss; backward recomputes that chunk's logits alone. The
        # reentrant form runs each chunk's backward on its own, so the head's weight gradient goes into .grad chunk
        # by chunk; the other form sums the chunks' weight gradients in one more buffer of the weight's size first.
        # It cannot serve autograd.grad (pipeline stages' backward, torch 2.13), or a hidden state that needs no
        # gradient (only the head trains).
        reentrant = self.reentrant and output.requires_grad
        return combine(checkpoint(chunk_loss, output[:, i:i + step], labels[:, i:i + step], use_reentrant=reentrant,
                                  preserve_rng_state=False) for i in range(0, seq, step))


class TokenLoss:
    """Summed next-token cross-entropy over the labelled tokens (pretrain and SFT)."""

    rows_per_sample = 1

    def __init__(self, loss_fn, autocast=contextlib.nullcontext, labels_to_model: bool = False):
        """`labels_to_model`: the model takes the labels too (multi-token prediction's loss, titan/models/mtp.py)."""
        self.loss_fn, self.autocast, self.labels_to_model = loss_fn, autocast, labels_to_model

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["label"] != IGNORE_INDEX).sum()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = {"labels": batch["label"]} if self.labels_to_model else {}
        with self.autocast():  # the loss too: a chunked loss runs the output projection
            return self.loss_fn(model(batch["input"], **model_inputs(batch), **labels), batch["label"])

    def metrics(self, mesh) -> dict[str, float]:
        return {}
