"""What the loop optimises, per `training.recipe`: the objective (a loss over one micro-batch) and its data.

  pretrain  next-token loss on packed document windows (titan/data/pretrain.py)
  sft       next-token loss on chat conversations, counted on assistant tokens only (titan/data/chat.py)
  dpo       direct preference optimisation on (prompt, chosen, rejected) pairs against a frozen reference model

Every objective returns a *summed* loss plus `count(batch)`, the number of items it summed over (valid tokens, or
preference pairs). The loop divides by the count over the whole global batch, so the gradient does not depend on how
the batch is split over ranks and micro-steps. This module does not own the loop, the model or parallelism.

DPO (Rafailov et al., 2023), for a pair with policy log-probabilities (summed over the reply's tokens) pi_c, pi_r
and reference ones ref_c, ref_r:
    reward_c = beta (pi_c - ref_c),  reward_r = beta (pi_r - ref_r),  loss = -log sigmoid(reward_c - reward_r)
At the start the policy is the reference, every reward is 0 and the loss is log 2. The reference is the base model
with LoRA's adapters switched off when LoRA is on (no extra memory), else a frozen copy of the initial weights.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from titan.config import SFT, Training, Validation
from titan.data.chat import build_preference_dataloader, build_sft_dataloader, build_sft_validation_dataloader
from titan.data.pretrain import IGNORE_INDEX, build_pretrain_dataloader, build_validation_dataloader


MODEL_INPUTS = ("document_ids", "positions")  # besides the token ids; packed rows carry them


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keyword inputs of the model besides the token ids: document ids and positions of packed rows, if present."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


class TokenLoss:
    """Summed next-token cross-entropy over the labelled tokens (pretrain and SFT)."""

    rows_per_sample = 1

    def __init__(self, loss_fn, autocast=contextlib.nullcontext):
        self.loss_fn, self.autocast = loss_fn, autocast

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["label"] != IGNORE_INDEX).sum()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast():
            logits = model(batch["input"], **model_inputs(batch))
        return self.loss_fn(logits, batch["label"])

    def metrics(self, mesh) -> dict[str, float]:
        return {}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens, in fp32: (rows, seq, vocab) -> (rows,)."""
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")
    logps = token_logps.view(labels.shape).sum(dim=1)
    # Under loss parallel (vocab-sharded logits) this is a DTensor; the DPO loss after it has no sharding rules.
    return logps.full_tensor() if isinstance(logps, DTensor) else logps


class DPOLoss:
    """Summed DPO loss over the pairs of a batch (chosen rows first, then rejected; see titan/data/chat.py).
    `reference(batch)` returns the reference model's logits. Also keeps sums for the logged reward statistics."""

    STATS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")
    rows_per_sample = 2  # a chosen and a rejected sequence

    def __init__(self, beta: float, reference, autocast=contextlib.nullcontext):
        self.beta, self.reference, self.autocast = beta, reference, autocast
        self._sums = None
        self._pairs = None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input"].shape[0] // 2, device=batch["input"].device)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["label"]
        with torch.no_grad(), self.autocast():  # the reference first: its activations are gone before ours exist
            ref = sequence_logps(self.reference(batch), labels)
        with self.autocast():
            logits = model(batch["input"])
        policy = sequence_logps(logits, labels)
        chosen, rejected = (self.beta * (policy - ref)).chunk(2)
        margin = chosen - rejected
        loss = -F.logsigmoid(margin).sum()
        self._accumulate(torch.stack([margin.sum(), (margin > 0).float().sum(), chosen.sum(), rejected.sum()]),
                         len(margin))
        return loss

    def _accumulate(self, sums: torch.Tensor, pairs: int) -> None:
        sums = sums.detach()
        self._sums = sums if self._sums is None else self._sums + sums
        self._pairs = pairs + (self._pairs or 0)

    def metrics(self, mesh) -> dict[str, float]:
        """Means over the step's pairs on every data-parallel rank (one all-reduce), then reset."""
        if self._sums is None:
            return {}
        totals = torch.cat([self._sums, self._sums.new_tensor([self._pairs])])
        dist.all_reduce(totals, group=mesh.get_group())
        self._sums = self._pairs = None
        means = (totals[:-1] / totals[-1]).tolist()
        return dict(zip(self.STATS, means))


def build_dataloaders(training: Training, sft: SFT, validation: Validation, tokenizer, dp_rank: int, dp_size: int):
    """(train loader, validation loader or None) for the recipe."""
    if training.recipe == "pretrain":
        train = build_pretrain_dataloader(training, tokenizer, dp_rank, dp_size)
        val = build_validation_dataloader(validation, training, tokenizer, dp_rank, dp_size) \
            if validation.enable else None
    elif training.recipe == "sft":
        train = build_sft_dataloader(training, sft, tokenizer, dp_rank, dp_size)
        val = build_sft_validation_dataloader(validation, sft, tokenizer, training.seq_len, dp_rank, dp_size) \
            if validation.enable else None
    else:
        train, val = build_preference_dataloader(training, sft, tokenizer, dp_rank, dp_size), None
    return train, val
