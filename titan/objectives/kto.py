"""KTO (training.recipe = "kto"): Kahneman-Tversky optimisation on completions labelled desirable or undesirable,
with no pairs (Ethayarajh et al., 2024), as TRL's KTOTrainer computes it.

Per completion y of prompt x, with r = log pi(y|x) - log ref(y|x) (summed over the completion's tokens) and the
reference point z = max(0, mean over the step's KL rows of log pi(y'|x) - log ref(y'|x)), y' another record's
completion (titan/data/rl.py), detached:

  desirable    loss = desirable_weight   * (1 - sigmoid(beta (r - z)))
  undesirable  loss = undesirable_weight * (1 - sigmoid(beta (z - r)))

and the loss is their mean over the step's completions. z is estimated once per optimizer step over the whole global
batch (every micro-batch, every data-parallel rank) before its first forward, so it does not depend on the layout;
TRL takes it per micro-batch, over the processes. The reference is DPO's (titan/build.py): the base with LoRA's
adapters off, or a frozen copy of the initial weights.
"""

from __future__ import annotations

import contextlib

import torch

from titan.config import KTO
from titan.objectives.preference import sequence_logps
from titan.parallel.process_group import all_reduce_sum


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-completion losses, rewards beta r) from summed log-probabilities (N,), labels (N,) bool and the
    reference point `kl` (0-d, detached)."""
    logratio = policy - reference
    chosen = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    rejected = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, chosen, rejected), beta * logratio.detach()


class KTOLoss:
    """Summed KTO loss over a batch's completions ({"input", "label", "kl_input", "kl_label", "desirable"}).
    `reference(batch)` gives the reference model's log-probabilities of the labels per position; `prepare` (called
    by titan/objectives:step_counts before the step's first forward) estimates the reference point z from the
    step's KL rows."""

    STATS = ("kl", "desirable_reward", "undesirable_reward", "reward_margin")
    rows_per_sample = 2  # the completion, and its KL row

    def __init__(self, cfg: KTO, policy: torch.nn.Module, reference, autocast=contextlib.nullcontext,
                 loss_context=contextlib.nullcontext):
        self.cfg, self.policy, self.reference = cfg, policy, reference
        self.autocast, self.loss_context = autocast, loss_context
        self.kl = torch.zeros(())
        self._sums = None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input"].shape[0], device=batch["input"].device)

    @torch.no_grad()
    def prepare(self, micro_batches: list[dict[str, torch.Tensor]], mesh) -> None:
        """z = max(0, mean of the KL rows' log-ratios) over the global batch: one no-grad forward of the policy and
        of the reference per micro-batch, one all-reduce over `mesh` (the ranks the batch is split over)."""
        total = None
        for batch in micro_batches:
            with self.loss_context(), self.autocast():
                policy, _ = sequence_logps(self.policy(batch["kl_input"]), batch["kl_label"])
                ref = self.reference({"input": batch["kl_input"], "label": batch["kl_label"]}).sum(dim=1)
            part = torch.stack([(policy - ref).sum(), torch.tensor(float(len(policy)), device=policy.device)])
            total = part if total is None else total + part
        total = all_reduce_sum(total, mesh)
        self.kl = (total[0] / total[1]).clamp(min=0)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), self.autocast():  # the reference first: its activations are gone before ours exist
            ref = self.reference(batch).sum(dim=1)
        with self.autocast():
            logits = model(batch["input"])
        policy, _ = sequence_logps(logits, batch["label"])
        desirable = batch["desirable"].to(torch.bool)
        losses, rewards = kto_loss(policy, ref, desirable, self.kl.to(policy.device), self.cfg.beta,
                                   self.cfg.desirable_weight, self.cfg.undesirable_weight)
        d = desirable.to(rewards.dtype)
        sums = torch.stack([(rewards * d).sum(), d.sum(), (rewards * (1 - d)).sum(), (1 - d).sum()])
        self._sums = sums if self._sums is None else self._sums + sums
        return losses.sum()

    def metrics(self, mesh) -> dict[str, float]:
        """The reference point and the mean rewards of either label over the step (one all-reduce), then reset."""
        if self._sums is None:
            return {}
        s = all_reduce_sum(self._sums, mesh).tolist()
        self._sums = None
        out = {"kl": float(self.kl)}
        if s[1]:
            out["desirable_reward"] = s[0] / s[1]
        if s[3]:
            out["undesirable_reward"] = s[2] / s[3]
        if s[1] and s[3]:
            out["reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
        return out
