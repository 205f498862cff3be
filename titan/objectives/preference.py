"""Preference objectives (`training.recipe = "dpo"`): DPO, IPO, SimPO and ORPO over (chosen, rejected) pairs.

The preference losses (`dpo.loss`), per pair, from the policy's summed log-probabilities of the chosen and the
rejected reply pi_c, pi_r (over the reply's tokens; n_c, n_r tokens) and, for the first two, the reference model's
ref_c, ref_r. Each is written as the formula of its paper:
  sigmoid  DPO (Rafailov et al., 2023):  -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r)))
  ipo      IPO (Azar et al., 2023):      ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2
  simpo    SimPO (Meng et al., 2024):    -log sigmoid(beta pi_c / n_c - beta pi_r / n_r - gamma)
  orpo     ORPO (Hong et al., 2024):     -pi_c / n_c - lambda log sigmoid(log odds_c - log odds_r),
           odds = p / (1 - p) with p = exp(pi / n), the reply's per-token probability
At the start the policy is the reference: DPO's loss is then log 2 and IPO's 1 / (2 beta)^2. The reference is the base
model with LoRA's adapters switched off when LoRA is on (no extra memory), else a frozen copy of the initial weights,
or its log-probabilities computed once before training (dpo.precompute_reference, titan/objectives/reference.py);
SimPO and ORPO need none.

Conventions, TRL's by default (docs/fine_tuning.md): `dpo.ipo_normalize` divides each IPO log-ratio by its reply's
token count; `dpo.orpo_nll = "prompt_and_reply"` makes ORPO's NLL term the mean over every token (prompt and reply) of
the batch's chosen rows, pooled over the global batch, instead of the reply's per-pair mean; `dpo.label_smoothing` e
is conservative DPO: -(1 - e) log sigmoid(m) - e log sigmoid(-m).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan.config import DPO
from titan.data.pretrain import IGNORE_INDEX
from titan.objectives.token import HeadLoss, row_logps


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(label) over each row's labelled tokens in fp32, number of those tokens):
    (rows, seq, vocab) -> (rows,), (rows,)."""
    return row_logps(logits, labels), (labels != IGNORE_INDEX).sum(dim=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler, 2012): ORPO's log(1 - p) from log p."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_loss(cfg: DPO, policy: torch.Tensor, reference: torch.Tensor | None, n_tokens: torch.Tensor):
    """(per-pair losses, chosen rewards, rejected rewards) of `dpo.loss` from the rows' summed log-probabilities
    (chosen rows first, then rejected; `reference` None for the reference-free losses). The rewards are what each
    loss ranks the replies by; their difference is the logged margin."""
    (pc, pr), (nc, nr) = policy.chunk(2), n_tokens.chunk(2)
    if cfg.loss in ("sigmoid", "ipo"):
        rc, rr = reference.chunk(2)
        chosen, rejected = pc - rc, pr - rr  # log-ratios to the reference
        if cfg.loss == "sigmoid":
            chosen, rejected = cfg.beta * chosen, cfg.beta * rejected
            e = cfg.label_smoothing  # cDPO: a label is wrong with probability e
            loss = -F.logsigmoid(chosen - rejected) if e == 0 else \
                -(1 - e) * F.logsigmoid(chosen - rejected) - e * F.logsigmoid(rejected - chosen)
            return loss, chosen, rejected
        if cfg.ipo_normalize:  # per-token log-ratios (TRL)
            chosen, rejected = chosen / nc, rejected / nr
        loss = (chosen - rejected - 1 / (2 * cfg.beta)) ** 2
        return loss, cfg.beta * chosen, cfg.beta * rejected
    avg_c, avg_r = pc / nc, pr / nr  # per-token log-probabilities: length-normalised
    if cfg.loss == "simpo":
        chosen, rejected = cfg.beta * avg_c, cfg.beta * avg_r
        return -F.logsigmoid(chosen - rejected - cfg.simpo_gamma), chosen, rejected
    chosen, rejected = avg_c - log1mexp(avg_c), avg_r - log1mexp(avg_r)  # ORPO: log odds
    odds_ratio = -cfg.orpo_lambda * F.logsigmoid(chosen - rejected)
    # orpo_nll = prompt_and_reply: the NLL is pooled over the batch's tokens, added by DPOLoss (not a per-pair term)
    return (odds_ratio if cfg.orpo_nll == "prompt_and_reply" else odds_ratio - avg_c), chosen, rejected


class DPOLoss:
    """Summed preference loss (`dpo.loss`) over the pairs of a batch (chosen rows first, then rejected; see
    titan/data/chat.py). `reference(batch)` returns the reference model's log-probabilities of the labels per
    position (rows, seq) (None for simpo and orpo, which need no reference); `head_loss` turns the policy's output
    into its own (chunked if the model leaves its output projection to the loss). Also keeps sums for the logged
    reward statistics."""

    STATS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")
    REFERENCE_FREE = ("simpo", "orpo")
    rows_per_sample = 2  # a chosen and a rejected sequence

    def __init__(self, cfg: DPO, reference=None, autocast=contextlib.nullcontext, head_loss: HeadLoss | None = None):
        needs = cfg.loss not in self.REFERENCE_FREE and not cfg.precompute_reference
        if (reference is not None) != needs:
            raise ValueError(f"dpo.loss={cfg.loss} {'needs' if needs else 'takes no'} reference model")
        self.cfg, self.reference, self.autocast = cfg, reference, autocast
        self.head_loss = head_loss or HeadLoss()
        self.pooled_scale: torch.Tensor | None = None  # pairs / pooled tokens of the global batch (step_counts)
        self._sums = None
        self._pairs = None

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["input"].shape[0] // 2, device=batch["input"].device)

    @property
    def pools_tokens(self) -> bool:
        """ORPO with TRL's NLL: a mean over the global batch's chosen tokens, next to a mean over its pairs."""
        return self.cfg.loss == "orpo" and self.cfg.orpo_nll == "prompt_and_reply"

    def pooled_count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tokens ORPO's pooled NLL averages over: every labelled token (prompt and reply) of the chosen rows."""
        return (batch["sequence_label"].chunk(2)[0] != IGNORE_INDEX).sum()

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels, ref = batch["label"], batch.get("reference_logps")  # precomputed (dpo.precompute_reference), or:
        if self.reference is not None:
            with torch.no_grad(), self.autocast():  # the reference first: its activations are gone before ours exist
                ref = self.reference(batch).sum(dim=1)
        with self.autocast():
            output = model(batch["input"])  # the logits, or the final hidden states under the chunked loss
            policy = self.head_loss.row_logps(output, labels)
        n_tokens = (labels != IGNORE_INDEX).sum(dim=1)
        losses, chosen, rejected = preference_loss(self.cfg, policy, ref, n_tokens)
        if self.pools_tokens:  # the loop divides by the global pair count: scale the token sum to a token mean
            chosen_rows = len(output) // 2
            with self.autocast():  # chunked: the chosen rows' logits again, one chunk at a time
                nll = self.head_loss(output[:chosen_rows], batch["sequence_label"][:chosen_rows])
            scale = self.pooled_scale if self.pooled_scale is not None else \
                self.count(batch) / self.pooled_count(batch)
            losses = torch.cat([losses, (nll * scale).reshape(1)])
        margin = (chosen - rejected).detach()  # (of the pairs: `losses` may end with ORPO's pooled NLL)
        self._accumulate(torch.stack([margin.sum(), (margin > 0).float().sum(), chosen.detach().sum(),
                                      rejected.detach().sum()]), len(margin))
        return losses.sum()

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
