#!/usr/bin/env python
"""Benchmark titan on one config: throughput, MFU, a step-time breakdown, peak memory, and titan's overhead over a
minimal hand-written PyTorch loop doing the same math.

    python scripts/benchmark.py --config train_configs/debug_model.toml [--steps 20 --warmup 5] [--json out.json]
        [--section.key value ...]
    torchrun --nproc_per_node=2 scripts/benchmark.py --config FILE ...   (no overhead ratio: see below)

How it measures (see docs/performance.md):
  * titan runs its real loop (`titan.build.build` + `titan.train.train`) for warmup + steps steps, with validation
    off and the config's other settings kept (logging, checkpointing). `StepTimer` in the loop records each step's
    wall time and its regions: data wait, forward+backward, optimizer (clip + step + LR + zero_grad), and any other
    region the loop times (a region named "checkpoint" is reported as checkpoint blocking). On CUDA the timer
    synchronises the device before every clock read, so regions hold device time; on CPU it just reads perf_counter.
  * In the same process a minimal loop (`MinimalLoop` below: same Transformer class and flavor, same per-device
    batch, seq_len, dtype, AdamW settings, clipping and compile; one pre-made batch already on the device, plain
    PyTorch, no titan code) alternates with titan's: after titan's warm-up it warms up itself, then runs one step
    after each of titan's measured steps (`AlternatingTimer`), so both see the same machine state. Its time is kept
    out of titan's step times; it synchronises CUDA before each clock read.
  * Times are medians of per-step times after the warm-up steps (robust to a disturbed machine);
    overhead ratio = titan median step time / minimal median step time. tokens/s = tokens per step / mean step time.
  * The minimal loop is one device without parallelism, activation checkpointing or float8: under torchrun, or when
    those are enabled, the ratio is not computed (reported as n/a with the reason).

The minimal loop uses titan's own Transformer, so it cannot see a slow model: scripts/benchmark_model.py times the
model alone against torchtitan's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from titan import config, config_io
from titan.build import build
from titan.config import DTYPES
from titan.errors import ConfigError
from titan.metrics import StepTimer, setup_logging
from titan.models import build_model
from titan.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark_common.py, however this file is loaded
from benchmark_common import STEP_RANGES, device_name, fmt_s, git_commit, median
from flags import FILE, NEW_FILE, Parser

FLOP_CONVENTION = ("6 x non-embedding parameters + 12 x n_layers x n_heads x head_dim x seq_len per token "
                   "(PaLM appendix B / torchtitan; titan/metrics.py:num_flops_per_token)")
METHOD = ("median of per-step wall times after warm-up; same process, alternating: one minimal-loop step after each "
          "titan step (not counted in titan's); CUDA synchronised before each clock read")
REGIONS = ("data", "forward_backward", "optimizer", "checkpoint")  # table order; other regions follow


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = Parser(prog="benchmark.py", description=__doc__.split("\n\n")[0], allow_abbrev=False, ranges=STEP_RANGES,
               paths={"config": FILE, "json": NEW_FILE})
    p.add_argument("--config", help="titan TOML config (required)")
    p.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="steps run before measuring (default 5)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.add_argument("--skip-minimal", action="store_true", help="do not run the minimal loop (no overhead ratio)")
    args, overrides = p.parse_known_args(argv)
    if "--model_only" in overrides:
        p.error("--model_only is its own script now: python scripts/benchmark_model.py")
    if not args.config:
        p.error("--config is required")
    return args, overrides


def load_config(args: argparse.Namespace, overrides: list[str]) -> config.Config:
    """The config as titan would run it, with the step count set and validation off (it is not training time)."""
    argv = ["--config", args.config, *overrides, "--training.steps", str(args.warmup + args.steps),
            "--validation.enable", "false"]
    if not any(o.split("=")[0] == "--job.dump_folder" for o in overrides):
        # One folder for all ranks of a torchrun launch (they share its run id and port), a new one per launch.
        launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}_{os.environ.get('MASTER_PORT', os.getpid())}"
        argv += ["--job.dump_folder", os.path.join(tempfile.gettempdir(), f"titan_benchmark_{launch}")]
    return config_io.load(argv)


# ---------------------------------------------------------------------------------------------------------------
# titan's loop


def run_titan(cfg: config.Config, args: argparse.Namespace) -> tuple[dict, list[float] | None, str | None]:
    """titan's loop, with the minimal loop's steps interleaved when it can do the same work:
    (titan's results, the minimal loop's measured step times or None, why not)."""
    run = build(cfg)
    why_not = "--skip-minimal" if args.skip_minimal else minimal_unavailable(cfg, run)
    if why_not is None:
        minimal = MinimalLoop(cfg, run.model_parts[0].args, run.device, run.grad_accum)
        run.timer = AlternatingTimer(run.device, args.warmup, minimal)
    else:
        run.timer = StepTimer(run.device, sync=True, keep_history=True)  # sync only acts on CUDA
    train(run)
    run.close()  # also releases job.dump_folder's lock
    t = cfg.training
    laps = run.timer.history[args.warmup:]
    steps = [lap["step"] for lap in laps]
    names = [r for r in REGIONS if r != "checkpoint"] + sorted({k for lap in laps for k in lap} - {"step", *REGIONS})
    if any("checkpoint" in lap for lap in laps):
        names.insert(3, "checkpoint")
    per_step = {name: [lap.get(name, 0.0) for lap in laps] for name in names}
    per_step["other"] = [lap["step"] - sum(v for k, v in lap.items() if k != "step") for lap in laps]
    jsonl = Path(cfg.job.dump_folder) / "metrics.jsonl"  # written by rank 0 only
    records = [json.loads(line) for line in jsonl.read_text().splitlines()] if dist.get_rank() == 0 else []
    # Logged during the warm-up (step 1 always is): before the minimal loop's model exists.
    memory = max((r["memory_gib"] for r in records if "memory_gib" in r and r["step"] <= args.warmup),
                 default=float("nan"))
    titan = {
        "world_size": run.dims.world_size,
        "tokens_per_step": t.local_batch_size * run.dims.dp * run.grad_accum * t.seq_len,
        "grad_accum": run.grad_accum,
        "step_time_median_s": median(steps),
        "step_time_mean_s": sum(steps) / len(steps),
        "breakdown_median_s": {name: median(v) for name, v in per_step.items()},
        "breakdown_mean_s": {name: sum(v) / len(v) for name, v in per_step.items()},  # e.g. a save every N steps
        "checkpoint_hook": "checkpoint" in names,
        "peak_memory_gib": memory,
        "memory_kind": ("max allocated in the warm-up, CUDA" if run.device.type == "cuda" else
                        "peak RSS of the process in the warm-up, CPU"),
        "flops_per_token": run.metrics.flops_per_token,
        "peak_flops_per_device": run.metrics.peak_flops,
        "device": device_name(run.device),
    }
    return titan, (run.timer.minimal_times if why_not is None else None), why_not


class AlternatingTimer(StepTimer):
    """titan's step timer that also runs the minimal loop, one step after each of titan's measured steps, so that
    both loops see the same machine (load, clocks, caches) and slow drift cancels out. The minimal loop's time is
    kept out of titan's: the clock restarts after it. Before the measured steps, after titan's warm-up, the minimal
    loop runs its own warm-up steps."""

    def __init__(self, device: torch.device, warmup: int, minimal: MinimalLoop):
        super().__init__(device, sync=True, keep_history=True)
        self.warmup, self.minimal, self.minimal_times = warmup, minimal, []

    def lap(self) -> tuple[float, dict[str, float]]:
        result = super().lap()
        done = len(self.history)
        if done == self.warmup:
            self.minimal.build()
            for _ in range(self.warmup):
                self.minimal.step()
        elif done > self.warmup:
            self.minimal_times.append(self.minimal.step())
        if done >= self.warmup:
            self._last = self._now()
        return result


# ---------------------------------------------------------------------------------------------------------------
# The minimal loop: plain PyTorch, nothing from titan but the model class


class MinimalLoop:
    """A plain training loop with titan's math: same model, per-device batch, dtype, optimizer, clipping and
    compile; one batch made up front, so there is no data loading. `step()` runs one step and returns its time."""

    def __init__(self, cfg: config.Config, model_args, device: torch.device, grad_accum: int):
        self.cfg, self.model_args, self.device, self.grad_accum = cfg, model_args, device, grad_accum

    def build(self) -> None:
        """Built only when titan's warm-up is over, so that titan's warm-up peak memory is titan's alone."""
        t, o = self.cfg.training, self.cfg.optimizer
        torch.manual_seed(t.seed)
        with torch.device(self.device):
            self.model = build_model(self.model_args)
            self.model.init_weights()
        if self.cfg.compile.enable and "model" in self.cfg.compile.components:
            for block in self.model.layers.values():
                block.compile(fullgraph=True)
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
        optim_cls = torch.optim.AdamW if o.name == "AdamW" else torch.optim.Adam
        self.optimizer = optim_cls(self.model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                   weight_decay=o.weight_decay, **impl[o.implementation])
        self.dtype = DTYPES[t.mixed_precision_param]
        tokens = torch.randint(self.model_args.vocab_size, (t.local_batch_size, t.seq_len + 1), device=self.device)
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]

    def step(self) -> float:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(self.grad_accum):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                logits = self.model(self.inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), self.labels.flatten(0, 1)) / self.grad_accum
            del logits
            loss.backward()
        if self.cfg.training.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.training.max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def minimal_unavailable(cfg: config.Config, run) -> str | None:
    """Why the minimal loop would not do the same work as titan's, or None."""
    if run.dims.world_size > 1 or run.pipeline is not None:
        return "titan runs on several ranks and the minimal loop is single-device; run without torchrun for it"
    if cfg.activation_checkpoint.mode != "none":
        return "activation checkpointing is on; the minimal loop does not recompute"
    if getattr(getattr(cfg, "float8", None), "enable", False):
        return "float8 is on; the minimal loop does not convert linears"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Report


def summarize(args, cfg: config.Config, titan: dict, minimal_times: list[float] | None, why_not: str | None) -> dict:
    device = titan.pop("device")
    tps = titan["tokens_per_step"] / titan["step_time_mean_s"]
    tps_per_device = tps / titan["world_size"]
    peak = titan["peak_flops_per_device"]
    mfu = 100 * titan["flops_per_token"] * tps_per_device / peak if peak else None
    minimal = None
    ratio = None
    if minimal_times is not None:
        measured = minimal_times
        minimal = {"step_time_median_s": median(measured), "step_time_mean_s": sum(measured) / len(measured),
                   "tokens_per_s": titan["tokens_per_step"] / (sum(measured) / len(measured))}
        ratio = titan["step_time_median_s"] / minimal["step_time_median_s"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": args.config,
        "command": " ".join(sys.argv),
        "device": device,
        "torch_version": torch.__version__,
        "commit": git_commit(),
        "steps": args.steps,
        "warmup": args.warmup,
        "tokens_per_s": tps,
        "tokens_per_s_per_device": tps_per_device,
        "mfu_pct": mfu,
        "flop_convention": FLOP_CONVENTION,
        "peak_flops_source": ("titan/metrics.py:peak_flops (dense datasheet peak for the dtype)" if peak else
                              "n/a: no known peak for this device (CPU or unlisted GPU)"),
        "titan": titan,
        "minimal": minimal,
        "overhead_ratio": ratio,
        "overhead_ratio_unavailable": why_not,
        "method": METHOD,
    }


def table(r: dict) -> str:
    t = r["titan"]
    step = t["step_time_median_s"]
    rows = [
        ("config", r["config"]),
        ("device", f"{r['device']}, {t['world_size']} rank(s), torch {r['torch_version']}, commit {r['commit']}"),
        ("steps", f"{r['steps']} measured after {r['warmup']} warm-up, {t['tokens_per_step']:,} tokens/step"),
        ("tokens/s", f"{r['tokens_per_s']:,.0f} total, {r['tokens_per_s_per_device']:,.0f} per device"),
        ("MFU", "n/a (no known peak for this device)" if r["mfu_pct"] is None else
         f"{r['mfu_pct']:.2f} % of {t['peak_flops_per_device'] / 1e12:.1f} TFLOP/s per device"),
        ("FLOPs/token", f"{t['flops_per_token']:.4g}: {r['flop_convention']}"),
        ("step time", f"{fmt_s(step)} (median; regions: median, share of the median step, mean)"),
    ]
    for name, seconds in t["breakdown_median_s"].items():
        share = f"{100 * seconds / step:5.1f} %" if step > 0 else ""
        rows.append((f"  {name}", f"{fmt_s(seconds)}  {share}  (mean {fmt_s(t['breakdown_mean_s'][name]).strip()})"))
    if not t["checkpoint_hook"]:
        rows.append(("  checkpoint", "n/a (the loop times no 'checkpoint' region)"))
    rows.append(("peak memory", f"{t['peak_memory_gib']:.2f} GiB ({t['memory_kind']})"))
    if r["minimal"] is not None:
        rows.append(("minimal loop", f"{fmt_s(r['minimal']['step_time_median_s'])} (median), "
                                     f"{r['minimal']['tokens_per_s']:,.0f} tokens/s"))
        rows.append(("overhead ratio", f"{r['overhead_ratio']:.3f} = titan / minimal median step time"))
    else:
        rows.append(("overhead ratio", f"n/a ({r['overhead_ratio_unavailable']})"))
    rows.append(("measured as", r["method"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    setup_logging()  # titan's usual log lines show progress; the table comes at the end
    try:
        cfg = load_config(args, overrides)
        titan, minimal_times, why_not = run_titan(cfg, args)
    except ConfigError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        if dist.is_initialized():  # a config the builder refused after it made the process group
            dist.destroy_process_group()
        return 2
    rank = dist.get_rank()
    dist.destroy_process_group()
    if rank != 0:
        return 0
    result = summarize(args, cfg, titan, minimal_times, why_not)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
