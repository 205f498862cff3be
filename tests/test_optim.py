"""Optimizer construction and the LR schedule: hand-worked values per phase and decay shape, plus torchtitan v0.2."""

import math

import pytest
import torch

from titan.config import LRScheduler, Optimizer
from titan.optim import build_lr_scheduler, build_optimizer, lr_lambda, schedule_lengths


def curve(total_steps, **kw):
    cfg = LRScheduler(**kw)
    return [lr_lambda(s, cfg, total_steps) for s in range(total_steps + 1)]


def test_warmup_reaches_peak_on_its_last_step():
    values = curve(20, warmup_steps=4)
    assert values[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_linear_decay_over_everything_after_warmup():
    # W=2, T=10 -> D=8, decay starts after step 2; the last training step (9) is at 1/8, the floor comes at step 10.
    assert curve(10, warmup_steps=2) == pytest.approx([0.5, 1.0, 1.0] + [k / 8 for k in range(7, -1, -1)])


def test_stable_phase_then_decay_ratio():
    # decay_ratio 0.5 of 10 steps -> D=5, decay_start=5: steps 2..5 stable.
    values = curve(10, warmup_steps=2, decay_ratio=0.5)
    assert values == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


def test_decay_ratio_zero_is_constant_after_warmup():
    assert curve(6, warmup_steps=2, decay_ratio=0.0) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_sqrt_decay():
    cfg = LRScheduler(warmup_steps=0, decay_type="sqrt")
    assert lr_lambda(25, cfg, 100) == pytest.approx(0.5)  # 1 - sqrt(0.25)
    assert lr_lambda(64, cfg, 100) == pytest.approx(0.2)  # 1 - sqrt(0.64)
    assert lr_lambda(100, cfg, 100) == pytest.approx(0.0)


def test_cosine_decay():
    cfg = LRScheduler(warmup_steps=0, decay_type="cosine")
    assert lr_lambda(0, cfg, 12) == 1.0
    assert lr_lambda(4, cfg, 12) == pytest.approx(0.75)  # (1 + cos(pi/3)) / 2
    assert lr_lambda(6, cfg, 12) == pytest.approx(0.5)
    assert lr_lambda(12, cfg, 12) == pytest.approx(0.0)


def test_min_lr_factor_is_the_floor():
    cfg = LRScheduler(warmup_steps=2, min_lr_factor=0.2)
    assert lr_lambda(6, cfg, 10) == pytest.approx(0.2 + 0.8 * 0.5)  # p = 4/8
    assert lr_lambda(10, cfg, 10) == pytest.approx(0.2)
    assert lr_lambda(13, cfg, 10) == pytest.approx(0.2)  # stepped past the end: clamped, not negative


def test_warmup_and_decay_are_clamped_to_the_run():
    assert schedule_lengths(LRScheduler(warmup_steps=5, decay_ratio=0.8), 10) == (5, 5)
    assert schedule_lengths(LRScheduler(warmup_steps=11), 10) == (10, 0)
    cfg = LRScheduler(warmup_steps=200)  # the preset's warm-up in a 4-step smoke run: warm-up only, never NaN
    assert [lr_lambda(s, cfg, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def _torchtitan_v02(step, warmup, decay, total, decay_type, min_lr_factor):
    """torchtitan v0.2 linear_warmup_stable_decay, restated: virtual stable step, (step + 1)-based progress."""
    stable = total + 1 - warmup - decay
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + stable:
        return 1.0
    p = (step + 1 - warmup - stable) / decay
    shape = {"linear": 1 - p, "sqrt": 1 - math.sqrt(p), "cosine": 0.5 * (1 + math.cos(math.pi * p))}[decay_type]
    return min_lr_factor + (1 - min_lr_factor) * shape


@pytest.mark.parametrize("decay_type", ["linear", "sqrt", "cosine"])
@pytest.mark.parametrize("warmup, decay_ratio, min_lr", [(0, None, 0.0), (3, None, 0.1), (4, 0.3, 0.0), (2, 0.5, 0.3)])
def test_matches_torchtitan_v02_at_every_step(decay_type, warmup, decay_ratio, min_lr):
    total = 17
    cfg = LRScheduler(warmup_steps=warmup, decay_ratio=decay_ratio, decay_type=decay_type, min_lr_factor=min_lr)
    decay = schedule_lengths(cfg, total)[1]
    for step in range(total + 1):
        assert lr_lambda(step, cfg, total) == pytest.approx(
            _torchtitan_v02(step, warmup, decay, total, decay_type, min_lr), abs=1e-12
        ), step


def test_scheduler_drives_the_optimizer_lr():
    opt = build_optimizer([("w", torch.nn.Parameter(torch.zeros(2)))], Optimizer(lr=0.1, implementation="for-loop"))
    cfg = LRScheduler(warmup_steps=2, decay_ratio=0.5, decay_type="cosine", min_lr_factor=0.1)
    sched = build_lr_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_lambda(s, cfg, 10) for s in range(10)])
    assert seen[0] == pytest.approx(0.05)


@pytest.mark.parametrize("name, cls", [("AdamW", torch.optim.AdamW), ("Adam", torch.optim.Adam)])
def test_build_optimizer_passes_the_section(name, cls):
    cfg = Optimizer(name=name, lr=3e-4, eps=1e-6, weight_decay=0.05, betas=[0.8, 0.9], implementation="foreach")
    opt = build_optimizer([("w", torch.nn.Parameter(torch.zeros(3)))], cfg)
    assert type(opt) is cls
    d = opt.defaults
    assert (d["lr"], d["eps"], d["weight_decay"], d["betas"], d["foreach"]) == (3e-4, 1e-6, 0.05, (0.8, 0.9), True)


def test_implementations_take_the_same_step():
    expected = {"fused": (True, None), "foreach": (None, True), "for-loop": (False, False)}
    results = {}
    for impl, (fused, foreach) in expected.items():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3))
        opt = build_optimizer([("w", p)], Optimizer(implementation=impl))
        assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach)
        for _ in range(2):
            p.grad = torch.ones_like(p)
            opt.step()
        results[impl] = p.detach()
    torch.testing.assert_close(results["fused"], results["for-loop"])
    torch.testing.assert_close(results["foreach"], results["for-loop"])
