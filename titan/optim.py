"""Optimizer and learning-rate schedule, each built from its own config section.

Owns `build_optimizer` ([optimizer]), the warm-up / stable / decay schedule ([lr_scheduler]), gradient clipping
over every shard and stage (`clip_grad_norm`) and what a resumed run takes from its own config
(`honour_new_settings`); it does not own when `step()` is called (that is the training loop's).

The schedule is torchtitan v0.2's `linear_warmup_stable_decay`, so the same settings give the same curve.
`lr_lambda(step)` is the multiplier of the peak lr after `step` scheduler steps, i.e. the lr used by training step
`step + 1` (LambdaLR applies lr_lambda(0) at construction and the loop calls `scheduler.step()` after each
optimizer step). With W = warmup_steps, T = total_steps and D = decay_steps:

    W = min(warmup_steps, T); D = round(T * decay_ratio) if decay_ratio is set, else T - W; D = min(D, T - W)
    step < W:              (step + 1) / W                    linear warm-up; the last warm-up step is at the peak
    step <= T - D:         1.0                               stable phase
    otherwise:             p = (step - (T - D)) / D          decay progress, in (0, 1]
                           min_lr_factor + (1 - min_lr_factor) * shape(p)
                           shape: linear 1 - p, sqrt 1 - sqrt(p), cosine (1 + cos(pi p)) / 2

torchtitan writes the decay as `p = (step + 1 - warmup - stable) / D` with a "virtual" extra stable step
(stable = T + 1 - W - D); that is the same p as above. Consequence of both: the last training step (step T - 1)
still has p = (D - 1) / D, so the lr never reaches the floor while training; lr_lambda(T) == min_lr_factor.
torchtitan before pytorch/torchtitan#1261 (mid 2025) warmed up with (step + 1) / (W + 1) and divided by D + 1.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from titan import optim_states
from titan.config import AUTO, DTYPES, LRScheduler, Optimizer
from titan.errors import ConfigError
from titan.muon import NS_EPS, Muon, param_groups
from titan.parallel.process_group import all_reduce_sum

logger = logging.getLogger("titan")

_IMPLEMENTATION = {  # config value -> torch.optim kwargs
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False, "fused": False},
}


def build_optimizer(named_params, cfg: Optimizer) -> torch.optim.Optimizer:
    """The [optimizer] section over `named_params`, (name, parameter) pairs: the names decide which parameters take
    Muon (titan/muon.py). AdamW and Adam with fp32 states are torch's own classes; bf16 states and Muon's AdamW half
    are titan/optim_states.py's Adam (the same update)."""
    params = [p for _, p in named_params]
    if cfg.name == "SGD":
        return torch.optim.SGD(params, **group_settings(cfg, matrices=False), **_IMPLEMENTATION[cfg.implementation])
    adam_args = {**group_settings(cfg, matrices=False), **_IMPLEMENTATION[cfg.implementation]}
    states = {"state_dtype": DTYPES[cfg.state_dtype], "stochastic_rounding": cfg.state_rounding == "stochastic"}
    if cfg.name == "muon":
        groups = param_groups(named_params, group_settings(cfg, matrices=True), group_settings(cfg, matrices=False))
        return Muon(groups, decoupled_weight_decay=True, **states, **adam_args)
    if cfg.state_dtype == "float32":
        return {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.name](params, **adam_args)
    return optim_states.Adam(params, decoupled_weight_decay=cfg.name == "AdamW", **states, **adam_args)


def group_settings(cfg: Optimizer, matrices: bool) -> dict:
    """The hyper-parameters of a param group as this config sets them: Muon's for its group of hidden `matrices`,
    else those of AdamW / Adam (under muon: adamw_lr and adamw_weight_decay) or SGD."""
    if matrices:
        return dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                    ns_steps=cfg.muon_ns_steps, ns_coefficients=tuple(cfg.muon_ns_coefficients), ns_eps=NS_EPS,
                    ns_dtype=cfg.muon_ns_dtype, adjust_lr=cfg.muon_adjust_lr)
    under_muon = cfg.name == "muon"
    settings = dict(lr=cfg.adamw_lr if under_muon and cfg.adamw_lr != AUTO else cfg.lr,
                    weight_decay=cfg.adamw_weight_decay if under_muon and cfg.adamw_weight_decay != AUTO
                    else cfg.weight_decay)
    if cfg.name != "SGD":
        settings.update(betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)
    return settings


def schedule_lengths(cfg: LRScheduler, total_steps: int) -> tuple[int, int]:
    """(warm-up steps, decay steps), shortened to fit the run: a smoke test with `--training.steps 5` should not
    need its warm-up edited too (the loop logs the lr, so the clamping is visible). Warm-up wins over decay."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay = total_steps - warmup if cfg.decay_ratio is None else round(total_steps * cfg.decay_ratio)
    return warmup, min(decay, total_steps - warmup)


def lr_lambda(step: int, cfg: LRScheduler, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` scheduler steps (see the module docstring for the formula)."""
    warmup, decay = schedule_lengths(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    decay_start = total_steps - decay
    # At step == decay_start p == 0, i.e. 1.0 for every shape. Without a decay phase the lr stays at the peak, also
    # past the end (a resume with fewer training.steps than its checkpoint evaluates the schedule there).
    if step <= decay_start or decay == 0:
        return 1.0
    # Clamped so that a scheduler stepped past the end stays at the floor instead of going negative (linear) or
    # back up (cosine); steps <= total_steps are unaffected.
    p = min((step - decay_start) / decay, 1.0)
    if cfg.decay_type == "linear":
        shape = 1.0 - p
    elif cfg.decay_type == "sqrt":
        shape = 1.0 - math.sqrt(p)
    elif cfg.decay_type == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    else:
        raise ConfigError(f"lr_scheduler.decay_type must be one of linear, sqrt, cosine (got {cfg.decay_type!r})")
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape


def build_lr_scheduler(optimizer, cfg: LRScheduler, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following `lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(step, cfg, total_steps))


def reapply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler, cfg: Optimizer) -> None:
    """After a resume: this run's hyper-parameters (lr, weight decay, betas, eps; Muon's too), not the ones the
    optimizer state (param groups) and the scheduler (base lrs) brought back, and the lr of the next step from this
    run's schedule (training.steps or the warm-up may have changed too)."""
    for group in optimizer.param_groups:
        settings = group_settings(cfg, matrices=group.get("muon", False))
        group.update(initial_lr=settings.pop("lr"), **settings)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended, nothing is skipped
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def clip_grad_norm(params, max_norm: float, pp_mesh) -> torch.Tensor:
    """Total gradient norm over every rank's shards and every pipeline stage, clipped when max_norm > 0.

    Per mesh the gradients' local shards give one sum of squares (`local_sum_of_squares`) and one reduction over the
    mesh (`_over_mesh`), instead of one DTensor op per parameter (~900 at 8B, each a Python dispatch). On CPU each
    square-sum uses `sum`'s cascade summation, not torch's norm kernels, which accumulate fp32 sequentially there
    (3.6e-5 relative error on a 262k-element gradient, torch 2.13); on CUDA one `_foreach_norm` per mesh does it.
    """
    groups: dict = {}  # by mesh: expert parallelism puts the experts' grads on a mesh of their own
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    if not groups:
        return torch.zeros(())
    parts = [_over_mesh(mesh, grads) if mesh is not None else local_sum_of_squares(grads)
             for mesh, grads in groups.items()]
    squares = parts[0] if len(parts) == 1 else torch.stack([s.to(parts[0].device) for s in parts]).sum()
    if pp_mesh.size() > 1:  # each stage holds different parameters: add their squares
        squares = all_reduce_sum(squares, pp_mesh)
    norm = squares.sqrt()
    if max_norm > 0:
        for grads in groups.values():
            torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)
    return norm


def local_sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum over `tensors` of their squared elements, in fp32, as one 0-d tensor on their device."""
    if tensors[0].device.type == "cuda":
        # One fused kernel launch for all of them (fp32 accumulation in a parallel reduction, as clip_grad_norm_).
        return torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32)).square().sum()
    return torch.stack([t.float().square().sum() for t in tensors]).sum()


def _over_mesh(mesh, grads: list[DTensor]) -> torch.Tensor:
    """The global sum of squares of DTensor gradients on one mesh, with a single reduction: each rank's local square
    sum, divided by the ranks that hold the same values (the mesh dims a gradient is replicated on), summed over the
    whole mesh. A Partial gradient (pending sums, e.g. a norm weight's under sequence parallelism) is reduced first."""
    by_copies: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        if any(p.is_partial() for p in g.placements):
            g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])
        copies = math.prod(mesh.size(d) for d, p in enumerate(g.placements) if p.is_replicate())
        by_copies.setdefault(copies, []).append(g.to_local())
    local = sum(local_sum_of_squares(ts) / copies for copies, ts in by_copies.items())
    return DTensor.from_local(local, mesh, [Partial()] * mesh.ndim, run_check=False).full_tensor()
