"""What scripts/benchmark.py and scripts/benchmark_model.py both report with: a median that tolerates no samples, the
device, the commit, a time in milliseconds; and the range of --steps and --warmup they (and benchmark_moe.py) take.
A helper module of the benchmarks, not a script itself."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# --steps and --warmup, as flags.py checks them: at least one warm-up step, as the first has one-time costs.
STEP_RANGES = {"steps": (1, 10**6), "warmup": (1, 10**6)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} thread(s)"


def fmt_s(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:9.2f} ms"
