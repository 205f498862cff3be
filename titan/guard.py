"""Which steps update the weights. A step whose loss or gradient norm is not finite, or (with
`training.loss_spike_factor`) whose loss exceeds that factor times the mean of the recent updated steps, is skipped:
its gradients are dropped and the optimizer does not step (the lr schedule does: the lr stays a function of the step,
and the skipped step's data is consumed). After `training.max_consecutive_skips` skipped steps in a row the run stops
with exit code 3 and saves nothing from that state, as does a run whose last step is skipped (titan/checkpoint/
save.py does not save a skipped step either, and moves aside the saves no later step confirmed).

It owns the decision and its counts; the loop (titan/train.py) applies it. Every rank decides alike because the loop
passes the loss summed over the loss mesh (all pipeline stages and data ranks) and the global gradient norm.
"""

from __future__ import annotations

import collections
import logging
import math

import torch

from titan.config import Training
from titan.lifecycle import EXIT_DIVERGED, RunFailed

logger = logging.getLogger("titan")


class StepGuard:
    def __init__(self, cfg: Training, skipped_before: int = 0):
        self.limit, self.factor = cfg.max_consecutive_skips, cfg.loss_spike_factor
        self.recent: collections.deque[float] = collections.deque(maxlen=cfg.loss_spike_window)
        self.total = skipped_before  # skipped steps of the whole run, resumes included (kept in train_state)
        self.in_a_row: list[int] = []  # the current streak's steps

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> tuple[float, float, bool]:
        """(loss, grad norm, skip this step's update?). The step's one host read: whether the optimizer steps
        depends on it. On CUDA the host waits here for backward to finish before queuing the optimizer's kernels;
        the GPU idles for their launch time (tens of microseconds per kernel with foreach/fused), which is small next
        to a real step, and the logged loss needed the same read anyway."""
        loss_value, norm_value = torch.stack([loss.float(), grad_norm.float()]).tolist()
        reason = None
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            reason = "non-finite loss or gradient norm"
        elif self.factor and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss_value > self.factor * mean:
                reason = f"loss spike (above {self.factor:g} x {mean:.4f}, the mean of the last {len(self.recent)})"
        if reason is None:
            self.recent.append(loss_value)
            self.in_a_row = []
            return loss_value, norm_value, False
        self.in_a_row.append(step)
        self.total += 1
        logger.warning(f"step {step}: {reason}: loss {loss_value:.4f}, grad_norm {norm_value:.4f}; update skipped "
                       f"({len(self.in_a_row)} in a row of at most {self.limit}, {self.total} in this run)")
        return loss_value, norm_value, True

    @property
    def stuck(self) -> bool:
        return len(self.in_a_row) >= self.limit

    def failure(self, checkpoints: str) -> RunFailed:
        """Why the run stops: max_consecutive_skips in a row, or a skipped last step (its state is not saved
        either: a run must not end with exit code 0 on weights the guard refused to train on)."""
        steps = self.in_a_row
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        why = (f"training.max_consecutive_skips={self.limit}: {span} had to be skipped" if self.stuck else
               f"training.steps={steps[-1]}: the last {span} had to be skipped")
        return RunFailed(f"{why} (non-finite or spiking loss); stopping without saving this state ({checkpoints}); "
                         f"lower optimizer.lr or check the data, then resume", EXIT_DIVERGED)

    def metrics(self) -> dict[str, int]:
        return {"skipped_steps": self.total} if self.total else {}
