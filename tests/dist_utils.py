"""Shared helpers for multi-process tests: run `titan.train.main` on N gloo processes (spawned from pytest, or under
torchrun) and read back the per-step metrics a run wrote.

Spawning costs ~3 s per process group on this 2-core machine, so `run_layouts` runs several configurations one
after another in the same processes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "configs" / "tiny.toml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, runs: list[list[str]], ports: list[int]) -> None:
    import torch

    torch.set_num_threads(1)  # N processes share 2 cores
    from titan.train import main

    for argv, port in zip(runs, ports):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        code = main(argv)
        if code != 0:
            raise SystemExit(f"rank {rank}: titan.train.main({argv}) returned {code}")


def run_layouts(world_size: int, runs: list[list[str]]) -> None:
    """Run each argv list in turn on `world_size` spawned gloo processes; raises if any run fails."""
    ports = [free_port() for _ in runs]
    mp.start_processes(_worker, args=(world_size, runs, ports), nprocs=world_size, start_method="spawn")


def _gloo_worker(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world_size: int, *args) -> None:
    """Call `fn(rank, world_size, *args)` on `world_size` processes inside a gloo process group; `fn` must be a
    module-level function (it is pickled) and raise to fail the test."""
    mp.start_processes(_gloo_worker, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       start_method="spawn")


def read_metrics(dump_folder: str | Path) -> list[dict]:
    """The training-step records (not validation ones) of a run's metrics.jsonl."""
    lines = (Path(dump_folder) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(dump_folder: str | Path) -> list[float]:
    return [r["loss"] for r in read_metrics(dump_folder)]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
