#!/usr/bin/env python
"""Mixture-of-Experts throughput, one process vs expert parallel, and the share of the step spent in all-to-all.

    python scripts/benchmark_moe.py [--steps 10 --warmup 3] [--section.key value ...]
    torchrun --nproc_per_node=2 scripts/benchmark_moe.py --parallelism.expert_parallel_degree 2

Runs titan's own loop (`titan.build.build` + `titan.train.train`) on train_configs/qwen3_moe_debug.toml (or --config)
with validation and checkpoints off, under torch.profiler for the measured steps (after --warmup steps). Prints, on rank
0: tokens/s over all ranks (tokens per step / mean measured step time) and the all-to-all share = this rank's CPU time
in the profiler events of the token all-to-alls (`all_to_all` in the name: the launch and, where the
collective blocks, the wait for it: `wait_tensor`) over the measured steps' wall time. Forward and backward are
both counted (backward's all-to-alls are autograd's). The profiler adds a cost per op (large for the per-expert
loop's many small ops), so tokens/s here are below an unprofiled run's: compare runs of this script with each other.
On a GPU the kernels overlap compute, so the CPU share is only a bound; docs/performance.md has recorded figures.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, schedule

from titan import config_io
from titan.build import build
from titan.errors import ConfigError
from titan.metrics import StepTimer, setup_logging
from titan.train import train

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # flags.py and benchmark_common.py, however this file is loaded
from benchmark_common import STEP_RANGES  # noqa: E402
from flags import FILE, NEW_FILE, Parser  # noqa: E402

COLLECTIVE = ("all_to_all", "alltoall", "wait_tensor")


class ProfiledTimer(StepTimer):
    """titan's step timer that also advances the profiler's schedule once per step."""

    def __init__(self, device: torch.device, prof):
        super().__init__(device, sync=True, keep_history=True)
        self.prof = prof

    def lap(self):
        result = super().lap()
        self.prof.step()
        return result


def measure(args, overrides: list[str]) -> dict | None:
    """titan's loop on the config, the measured steps profiled; the figures on rank 0, None on the others."""
    cfg = config_io.load(["--config", args.config, "--validation.enable", "false", "--checkpoint.enable", "false",
                          "--training.steps", str(args.warmup + args.steps), *overrides])
    run = build(cfg)
    with profile(activities=[ProfilerActivity.CPU],
                 schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)) as prof:
        run.timer = ProfiledTimer(run.device, prof)
        train(run)
    run.close()
    steps = [lap["step"] for lap in run.timer.history[args.warmup:]]
    collective_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                        if any(c in e.key for c in COLLECTIVE))
    t = cfg.training
    tokens = t.local_batch_size * run.dims.dp * run.grad_accum * t.seq_len
    result = {"world_size": run.dims.world_size, "ep": run.dims.ep, "tokens_per_s": tokens / statistics.mean(steps),
              "step_time_median_s": statistics.median(steps),
              "all_to_all_share": collective_us / 1e6 / sum(steps), "torch": torch.__version__}
    return result if dist.get_rank() == 0 else None


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="benchmark_moe.py", description=__doc__.split("\n\n")[0], allow_abbrev=False, ranges=STEP_RANGES,
               paths={"config": FILE, "json": NEW_FILE})
    p.add_argument("--config", default=str(REPO / "train_configs" / "qwen3_moe_debug.toml"))
    p.add_argument("--steps", type=int, default=10, help="measured steps, in [1, 10**6]")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring, in [1, 10**6]")
    p.add_argument("--json", help="also write the results as JSON to this path")
    args, overrides = p.parse_known_args(argv)
    setup_logging()
    with tempfile.TemporaryDirectory(prefix="titan_benchmark_moe_") as folder:
        try:
            result = measure(args, ["--job.dump_folder", folder, *overrides])
        except ConfigError as e:
            print(f"benchmark_moe: error: {e}", file=sys.stderr)
            return 2
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    if result is not None:  # rank 0
        print(json.dumps(result, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
