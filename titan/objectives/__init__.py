"""What the loop optimises, per `training.recipe`: an objective, i.e. a loss over one micro-batch.

  pretrain  next-token loss on packed document windows (token.py; data: titan/data/pretrain.py)
  sft       next-token loss on chat conversations, counted on assistant tokens only (token.py; titan/data/chat.py)
  dpo       preference optimisation on (prompt, chosen, rejected) pairs: DPO, IPO (against a frozen reference
            model), SimPO or ORPO (reference-free), per `dpo.loss` (preference.py)
  grpo      the clipped policy-gradient loss of GRPO / DAPO / Dr. GRPO on completions sampled from the policy and
            scored by reward functions (grpo.py; the rollouts: titan/rollout.py)
  kto       KTO on completions labelled desirable or undesirable (kto.py; data: titan/data/rl.py)

Every objective returns a *summed* loss plus `count(batch)`, the number of items it summed over (valid tokens,
preference pairs, completions). The loop divides by the count over the whole global batch, so the gradient does not
depend on how the batch is split over ranks and micro-steps. Which objective a run gets, and its reference model, is
titan/build.py's choice; this package owns neither the loop, the model nor parallelism.
"""

from __future__ import annotations

from typing import Protocol

import torch

from titan.objectives.grpo import GRPOLoss
from titan.objectives.kto import KTOLoss
from titan.objectives.preference import DPOLoss, preference_loss, sequence_logps
from titan.objectives.token import HeadLoss, TokenLoss, cross_entropy_sum, model_inputs, row_logps
from titan.parallel.process_group import all_reduce_sum

__all__ = ["DPOLoss", "GRPOLoss", "HeadLoss", "KTOLoss", "Objective", "TokenLoss", "cross_entropy_sum",
           "model_inputs", "preference_loss", "row_logps", "sequence_logps", "step_counts"]


class Objective(Protocol):
    """What the loop asks of an objective."""

    rows_per_sample: int  # sequences per sample of the data (DPO: a chosen and a rejected one)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss of one micro-batch."""

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The items that loss summed over."""

    def metrics(self, mesh) -> dict[str, float]:
        """The step's recipe-specific figures for the log line (over `mesh`, the data-parallel ranks), then reset."""


def step_counts(objective: Objective, micro_batches: list[dict[str, torch.Tensor]], mesh
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the items the step's summed losses are divided by: `objective.count` over the global batch; the tokens the
    model routes: every input token of the global batch), in one all-reduce over `mesh`, the ranks the batch is
    split over. The MoE balance loss is a mean over the routed tokens in every recipe (docs/moe.md), so that its
    coefficient means the same in SFT, where only assistant tokens are items, and DPO, where pairs are. An
    objective with a `prepare(micro_batches, mesh)` (KTO's reference point) gets the step's batches first."""
    if hasattr(objective, "prepare"):
        objective.prepare(micro_batches, mesh)
    items = sum(objective.count(b) for b in micro_batches)
    pooled = [sum(objective.pooled_count(b) for b in micro_batches)] if getattr(objective, "pools_tokens", False) \
        else []  # ORPO's NLL over tokens beside its loss over pairs (preference.py): counted in the same all-reduce
    # new_full fills on the device from a kernel argument; new_tensor would copy a Python int from pageable host
    # memory, which makes the host wait for the device (a sync per step on CUDA).
    counts = torch.stack([items, items.new_full((), sum(b["input"].numel() for b in micro_batches)), *pooled])
    counts = all_reduce_sum(counts, mesh)
    if pooled:
        objective.pooled_scale = counts[0] / counts[2]
    return counts[0], counts[1]
