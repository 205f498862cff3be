#!/usr/bin/env python
"""Loss curves of the optimizer and data-parallel choices on the debug model, and what they cost, written to one JSON
file that the suite reads (tests/test_muon.py checks the claims docs/optimizers.md and docs/parallelism.md make).

    python scripts/benchmark_optimizers.py [--out tests/assets/benchmarks/optimizers.json] [--only NAME ...] [--steps N]

Runs (train_configs/debug_model.toml, 100 steps, fp32 on CPU, every step logged; see RUNS):
  adamw               the preset: AdamW at its tuned lr 3e-3
  muon                train_configs/debug_muon.toml: Muon for the hidden matrices, AdamW (lr 3e-3) for the rest
  adamw_bf16          AdamW with bf16 moments, stochastic rounding (optimizer.state_dtype = "bfloat16")
  adamw_bf16_nearest  the same, rounded to nearest
  hsdp                2 replica groups x 2 shards (torchrun, 4 ranks), the same 8 sequences per step
  diloco_h8           the same with [semi_sync] method = "diloco", sync_every = 8 (outer lr 0.7, momentum 0.9)
  diloco_h8_momentum_0.5, diloco_h8_averaging   outer momentum 0.5; outer lr 1 without momentum (plain averaging)
Each record holds the training loss of every step, the validation losses, and: for one-process runs the bytes of the
optimizer's state tensors after training (measured on the live optimizer, step counters left out), for the 4-rank
runs the bytes each rank sent over dp_replicate per step (the `replica_bytes` metric, counted). Runs already in the
file are kept unless named again with --only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # flags.py, however this file is loaded
from flags import RECORDS, Parser  # noqa: E402

PRESET = "train_configs/debug_model.toml"
COMMON = ["--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--validation.freq", "25"]
FOUR_RANKS = ["--parallelism.data_parallel_replicate_degree", "2", "--training.local_batch_size", "2",
              "--training.global_batch_size", "8"]
RUNS = {  # name -> (config, ranks, overrides)
    "adamw": (PRESET, 1, []),
    "muon": ("train_configs/debug_muon.toml", 1, []),
    "adamw_bf16": (PRESET, 1, ["--optimizer.state_dtype", "bfloat16"]),
    "adamw_bf16_nearest": (PRESET, 1, ["--optimizer.state_dtype", "bfloat16", "--optimizer.state_rounding",
                                       "nearest"]),
    "hsdp": (PRESET, 4, FOUR_RANKS),
    **{name: (PRESET, 4, FOUR_RANKS + ["--semi_sync.method", "diloco", "--semi_sync.sync_every", "8",
                                       "--semi_sync.outer_lr", lr, "--semi_sync.outer_momentum", momentum])
       for name, lr, momentum in (("diloco_h8", "0.7", "0.9"), ("diloco_h8_momentum_0.5", "0.7", "0.5"),
                                  ("diloco_h8_averaging", "1", "0"))},
}


def state_bytes(optimizer) -> int:
    """Bytes of this rank's optimizer state tensors (moments; the scalar step counters left out)."""
    from torch.distributed.tensor import DTensor

    return sum((v.to_local() if isinstance(v, DTensor) else v).nbytes
               for s in optimizer.state.values() for k, v in s.items() if k != "step")


def run_one(config: str, ranks: int, overrides: list[str], dump: Path) -> dict:
    argv = ["--config", str(REPO / config), *COMMON, *overrides, "--job.dump_folder", str(dump)]  # from any folder
    record = {"config": config, "ranks": ranks, "overrides": overrides}
    if ranks == 1:
        from titan import config_io
        from titan.build import build
        from titan.train import train

        run = build(config_io.load(argv))
        try:
            train(run)
            record["optimizer_state_bytes"] = state_bytes(run.optimizer)
            run.close()
        finally:
            import torch.distributed as dist

            dist.destroy_process_group()
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m",
               "titan.train", *argv]
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    record["loss"] = [r["loss"] for r in lines if "loss" in r]
    record["val_loss"] = {r["step"]: r["val_loss"] for r in lines if "val_loss" in r}
    if ranks > 1:
        last = [r for r in lines if "loss" in r][-1]
        record["replica_bytes_per_step"] = last["replica_bytes"]  # the running mean over the run
    return record


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="benchmark_optimizers.py", description=__doc__.split("\n\n")[0],
                    ranges={"steps": (1, 10**6)}, paths={"out": RECORDS})
    parser.add_argument("--out", default=str(REPO / "tests" / "assets" / "benchmarks" / "optimizers.json"))
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="runs to (re)do; default all")
    parser.add_argument("--steps", type=int, help="training.steps instead of the preset's 100 (a quick check), in "
                        "[1, 10**6]")
    args = parser.parse_args(argv)
    steps = [] if args.steps is None else ["--training.steps", str(args.steps)]
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}  # a JSON object: the parser checked
    for name in args.only or list(RUNS):
        with tempfile.TemporaryDirectory(prefix=f"titan_bench_{name}_") as dump:
            config, ranks, overrides = RUNS[name]
            results[name] = run_one(config, ranks, overrides + steps, Path(dump))
        out.write_text(json.dumps(results, indent=1) + "\n")  # after each run: a long sweep keeps what it has
        print(f"{name}: loss {results[name]['loss'][0]:.4f} -> {results[name]['loss'][-1]:.4f}, val "
              f"{results[name]['val_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
