"""GRPO's arithmetic (training.recipe = "grpo"): group-normalised advantages and the clipped surrogate loss with
its three aggregations, on per-token log-probabilities. docs/rl.md puts the algorithm on one screen.

For completion i of a group of G = grpo.num_generations completions of one prompt, with reward R_i:

  advantage  A_i = R_i - mean_group(R)                          (grpo.scale_rewards = "none", Dr. GRPO)
             A_i = (R_i - mean_group(R)) / (std_group(R) + 1e-4)  ("group", GRPO; std with Bessel's correction)
  ratio      r_it = exp(logp_it - logp_old_it)  per completion token t (logp_old: the policy that sampled)
  token loss l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL_it,
             KL_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1  (Schulman's k3 estimate, >= 0)

and the loss over the step's completions (m_it = 1 on the tokens that count) by `grpo.loss_type`:

  grpo     (1 / N) sum_i (sum_t m_it l_it) / (sum_t m_it)     DeepSeekMath: a mean per completion, then over them
  dapo     (sum_i sum_t m_it l_it) / (sum_i sum_t m_it)         DAPO: every token of the batch weighs the same
  dr_grpo  (sum_i sum_t m_it l_it) / (N * L_max)               Dr. GRPO: a constant, L_max = max_completion_length

These are TRL's GRPOTrainer formulas under the same names (epsilon, epsilon_high, beta, scale_rewards, loss_type).
Each is returned as a sum over this rank's completions and the count it is divided by, so that the loop divides by
the step's global count (titan's rule for every objective) and the gradient does not depend on the layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from titan.data.pretrain import IGNORE_INDEX
from titan.objectives.token import token_logps
from titan.parallel.process_group import all_reduce_sum

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """(N,) rewards of consecutive groups of `group_size` completions -> (N,) advantages. A NaN reward (no reward
    function applied) is left out of its group's mean and std and gets advantage 0, as in TRL."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.nanmean(dim=1, keepdim=True)
    adv = grouped - mean
    if scale_rewards == "group":
        n = (~grouped.isnan()).sum(dim=1, keepdim=True)
        var = ((grouped - mean) ** 2).nansum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        std = torch.where(n > 1, var.sqrt(), torch.full_like(var, float("nan")))
        adv = adv / (std + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    return adv.nan_to_num(nan=0.0).view(-1)


@dataclass
class LossTerms:
    """A loss over some completions as titan's objectives return it: `loss` summed over them, to be divided by
    the step's global sum of `count`; plus sums for the logged statistics (each over the counted tokens)."""

    loss: torch.Tensor
    count: torch.Tensor
    tokens: torch.Tensor  # completion tokens that count (sum of the mask)
    clipped_low: torch.Tensor  # tokens whose ratio fell below 1 - eps_low with A < 0 (the clip acted)
    clipped_high: torch.Tensor  # tokens whose ratio rose above 1 + eps_high with A > 0
    kl: torch.Tensor  # sum of KL_it (0 without a reference)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str, epsilon: float, epsilon_high: float, max_completion_length: int, beta: float = 0.0,
                ref_logps: torch.Tensor | None = None) -> LossTerms:
    """The clipped surrogate (+ beta KL) of completions: logps, old_logps, ref_logps, mask (N, T) per completion
    token (mask 1 where the token counts), advantages (N,)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    if beta != 0.0:
        delta = ref_logps - logps
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * per_token_kl
        kl = (per_token_kl * mask).sum().detach()
    n_tokens = mask.sum(dim=1)
    summed = (per_token * mask).sum(dim=1)
    if loss_type == "grpo":
        loss, count = (summed / n_tokens.clamp(min=1)).sum(), torch.tensor(float(len(logps)))
    elif loss_type == "dapo":
        loss, count = summed.sum(), n_tokens.sum()
    else:
        loss, count = summed.sum(), torch.tensor(float(len(logps) * max_completion_length))
    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
    return LossTerms(loss, count.to(logps.device, logps.dtype), n_tokens.sum().detach(), (low * mask).sum(),
                     (high * mask).sum(), kl)


class GRPOLoss:
    """The summed policy loss of a micro-batch of rollout rows ({"input", "label", "advantage"} and, with
    num_iterations > 1, "old_logps"; titan/rollout.py), `count` by grpo.loss_type. `reference(batch)` gives the
    frozen reference's log-probabilities of the labels per position when grpo.beta > 0. Also sums the logged clip
    ratios and KL, and passes on the rollout's own figures (`rollouts.metrics()`)."""

    STATS = ("clip_ratio_low", "clip_ratio_high", "kl")
    rows_per_sample = 1

    def __init__(self, cfg, reference=None, autocast=contextlib.nullcontext, rollouts=None):
        if (reference is None) != (cfg.beta == 0.0):
            raise ValueError(f"grpo.beta={cfg.beta} {'needs' if reference is None else 'takes no'} reference model")
        self.cfg, self.reference, self.autocast, self.rollouts = cfg, reference, autocast, rollouts
        self.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
        self._sums = None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        label = batch["label"]
        if self.cfg.loss_type == "dapo":
            return (label != IGNORE_INDEX).sum()
        rows = label.shape[0] * (self.cfg.max_completion_length if self.cfg.loss_type == "dr_grpo" else 1)
        return torch.tensor(rows, device=label.device)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        label, ref = batch["label"], None
        if self.reference is not None:
            with torch.no_grad(), self.autocast():  # the reference first: its activations are gone before ours exist
                ref = self.reference(batch)
        with self.autocast():
            logits = model(batch["input"])
        logps = token_logps(logits, label)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # mu = 1: the ratio is 1
        terms = policy_loss(logps, old, batch["advantage"], label != IGNORE_INDEX, loss_type=self.cfg.loss_type,
                            epsilon=self.cfg.epsilon, epsilon_high=self.epsilon_high,
                            max_completion_length=self.cfg.max_completion_length, beta=self.cfg.beta, ref_logps=ref)
        sums = torch.stack([terms.tokens, terms.clipped_low, terms.clipped_high, terms.kl]).detach()
        self._sums = sums if self._sums is None else self._sums + sums
        return terms.loss

    def metrics(self, mesh) -> dict[str, float]:
        """The step's clip ratios (shares of the completion tokens where either clip acted) and mean KL over every
        data-parallel rank (one all-reduce), then the rollout's figures; the sums are reset."""
        out = {}
        if self._sums is not None:
            tokens, low, high, kl = all_reduce_sum(self._sums, mesh).tolist()
            self._sums = None
            out = {"clip_ratio_low": low / max(tokens, 1.0), "clip_ratio_high": high / max(tokens, 1.0)}
            if self.cfg.beta:
                out["kl"] = kl / max(tokens, 1.0)
        return {**out, **(self.rollouts.metrics() if self.rollouts is not None else {})}
