"""Adam / AdamW whose moments can be stored in bfloat16 (`optimizer.state_dtype`), kept unbiased by stochastic
rounding.

Owns the optimizer class the [optimizer] section builds for bf16 states (and the AdamW half of Muon, titan/muon.py,
whatever its state dtype); it does not own which parameters go into which group (titan/optim.py, titan/muon.py).
With float32 states a step is torch.optim.Adam's own (the same `torch.optim.adam.adam` call with the same
arguments). With bfloat16 states each parameter's moments are widened to fp32, updated by that same call, and
rounded back to bf16.

Why stochastic rounding: the second moment moves by (1 - beta2) x g^2 per step, 5 % at beta2 = 0.95 and 0.1 % at
0.999, while bf16 keeps 8 bits of mantissa (a relative step of 2^-8 = 0.4 %). Rounding to nearest then drops the
small updates and the moment stops following the gradient; rounding up or down at random, with the probability
that makes the expected value exact, keeps the average right (docs/optimizers.md has the measured curves). The
random bits come from a generator seeded by (step, parameter index), so a resumed run draws the same bits and
nothing extra is saved.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # the states held in state_dtype
_SEED = 0x5EED  # any constant: only the bits' independence from step to step matters


def stochastic_round_(dst: torch.Tensor, src: torch.Tensor, seed: int) -> None:
    """dst (bf16) <- src (fp32), rounded up or down at random so that E[dst] == src: a random 16-bit number is added
    to the fp32 bit pattern and the low 16 bits, which bf16 does not keep, are cut off. Sign-magnitude bit patterns
    make this right for negative numbers too; finite values at the top of the bf16 range may round to infinity."""
    if isinstance(dst, DTensor):
        dst, src = dst.to_local(), src.to_local()
    generator = torch.Generator(device=src.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    bits = (src.contiguous().view(torch.int32) + noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000
    dst.copy_(bits.view(torch.float32))  # exact: the value is representable in bf16


def store_(dst: torch.Tensor, src: torch.Tensor, seed: int, stochastic: bool) -> None:
    """Write an fp32 working copy back into a (bf16) state tensor."""
    if stochastic and dst.dtype == torch.bfloat16:
        stochastic_round_(dst, src, seed)
    else:
        dst.copy_(src)


def rounding_seed(step: int, index: int) -> int:
    """The generator seed of parameter `index` at optimizer step `step`: different for every pair."""
    return (_SEED * 1_000_003 + step) * 65_537 + index


class Adam(torch.optim.Adam):
    """torch.optim.Adam (AdamW with `decoupled_weight_decay=True`) with its moments in `state_dtype`.
    `stochastic_rounding` applies to bf16 states only."""

    def __init__(self, params, *, state_dtype: torch.dtype = torch.float32, stochastic_rounding: bool = True,
                 **adam_args):
        super().__init__(params, **adam_args)
        self.state_dtype, self.stochastic_rounding = state_dtype, stochastic_rounding
        # Optimizer.load_state_dict casts every floating state to its parameter's dtype: cast the moments back.
        self.register_load_state_dict_post_hook(Adam.narrow_states)

    def narrow_states(self) -> None:
        """Every moment in state_dtype (a no-op for float32 states)."""
        for state in self.state.values():
            for key in MOMENTS:
                if key in state and state[key].dtype != self.state_dtype:
                    state[key] = state[key].to(self.state_dtype)

    @property
    def low_precision(self) -> bool:
        return self.state_dtype != torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._group_step(group, index)
        return loss

    def _group_step(self, group: dict, group_index: int) -> None:
        self._adam_group(group, group_index)

    def _adam_group(self, group: dict, group_index: int) -> None:
        """torch.optim.Adam.step's body for one group, with the moments widened around the update if they are
        narrow."""
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps)
        if self.low_precision:  # new moments come fp32 from Adam's lazy init (step placement and all): narrow them
            self.narrow_states()
            exp_avgs, exp_avg_sqs = ([self.state[p][k] for p in params] for k in ("exp_avg", "exp_avg_sq"))
            max_sqs = [self.state[p]["max_exp_avg_sq"] for p in params] if group["amsgrad"] else []
        beta1, beta2 = group["betas"]
        args = dict(amsgrad=group["amsgrad"], has_complex=has_complex, beta1=beta1, beta2=beta2, lr=group["lr"],
                    weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                    foreach=group["foreach"], capturable=group["capturable"], differentiable=group["differentiable"],
                    fused=group["fused"], decoupled_weight_decay=group["decoupled_weight_decay"])
        if not self.low_precision:
            adam(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, **args)
            return
        position = {id(p): k for k, p in enumerate(group["params"])}
        for i, p in enumerate(params):  # one parameter at a time: the fp32 copies cost one parameter's moments
            narrow = [exp_avgs[i], exp_avg_sqs[i]] + ([max_sqs[i]] if group["amsgrad"] else [])
            wide = [t.float() for t in narrow]
            adam([p], [grads[i]], wide[:1], wide[1:2], wide[2:], [steps[i]], **args)
            seed = rounding_seed(int(steps[i]), group_index * 1_000_000 + position[id(p)])
            for k, (dst, src) in enumerate(zip(narrow, wide)):
                store_(dst, src, seed + k, self.stochastic_rounding)
