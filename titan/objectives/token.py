"""The next-token objective (pre-training and SFT): the summed cross-entropy over the labelled tokens of a
micro-batch, and the model inputs a batch carries besides its token ids."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

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
        with self.autocast():
            logits = model(batch["input"], **model_inputs(batch), **labels)
        return self.loss_fn(logits, batch["label"])

    def metrics(self, mesh) -> dict[str, float]:
        return {}
