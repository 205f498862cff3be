"""Shared helpers for multi-process tests: run `titan.train.main` on N gloo processes (spawned from pytest, or under
torchrun) and read back the per-step metrics a run wrote.

Starting a process group costs seconds on this 2-core machine even from the forkserver (below), so `run_layouts`
runs several configurations one after another in the same processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "tests" / "configs" / "tiny.toml")

# Processes start from a forkserver that has imported torch and titan once (for each pytest worker): a spawned
# process imports them anew, 10-25 s per process group on 2 cores. Like spawn (and unlike fork), each child still
# begins with fresh module state and the test's working directory; it inherits the forkserver's environment, and
# its output goes to pytest's capture like a spawned one's.
START_METHOD = "forkserver"
mp.set_forkserver_preload(["titan.train", "dist_utils"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shared_port(rank: int, folder: str, run: int) -> int:
    """A free port chosen by rank 0 right before the run (chosen earlier, gloo's own sockets may take it) and handed
    to the other ranks through a file."""
    path = Path(folder) / f"port{run}"
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(free_port()))
        tmp.rename(path)  # atomic: readers never see a half-written file
    while not path.exists():
        time.sleep(0.05)
    return int(path.read_text())


def _set_torchrun_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _worker(rank: int, world_size: int, runs: list[list[str]], folder: str, expected: int) -> None:
    import torch

    torch.set_num_threads(1)  # N processes share 2 cores
    _record_fatal_signals(rank, folder)
    from titan.train import main

    for i, argv in enumerate(runs):
        _clear_dtensor_caches()  # see next_torchrun_env
        _set_torchrun_env(rank, world_size, _shared_port(rank, folder, i))
        code = main(argv)
        if code != expected:
            raise SystemExit(f"rank {rank}: titan.train.main({argv}) returned {code}, not {expected}")
        (Path(folder) / f"done{i}.{rank}").touch()


_FAULT_FILE = None  # kept open for faulthandler


def _record_fatal_signals(rank: int, folder: str) -> None:
    """A rank that dies of a signal (SIGSEGV, SIGABRT: a crash inside torch's native code) writes the Python stack of
    every thread to `fault<rank>` in `folder`, for the test's message."""
    import faulthandler

    global _FAULT_FILE
    _FAULT_FILE = open(Path(folder) / f"fault{rank}", "w")  # noqa: SIM115 - open until the process ends
    faulthandler.enable(_FAULT_FILE, all_threads=True)


def run_layouts(world_size: int, runs: list[list[str]], expected: int = 0) -> None:
    """Run each argv list in turn on `world_size` spawned gloo processes; raises if a run does not end with exit
    code `expected` on every rank.

    A rank killed by a signal is a crash inside torch's native code, not a result of titan's (seen now and then when
    the whole suite loads the 2 cores, each time in another layout, and never when the file runs alone). Then the
    runs not yet done start once more on new processes (with a warning carrying the crashed rank's stacks, so CI's
    summary shows each), provided their dump folders did not exist before (they are removed first). A second crash,
    an error or a wrong exit code fails at once."""
    dumps = [Path(argv[argv.index("--job.dump_folder") + 1]) if "--job.dump_folder" in argv else None for argv in runs]
    fresh = [d is not None and not d.exists() for d in dumps]
    done = 0
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            try:
                mp.start_processes(_worker, args=(world_size, runs[done:], folder, expected), nprocs=world_size,
                                   start_method=START_METHOD)
                return
            except mp.ProcessExitedException as e:
                stacks = "\n".join(f.read_text() for f in sorted(Path(folder).glob("fault*")))
                done += sum(all((Path(folder) / f"done{i}.{r}").exists() for r in range(world_size))
                            for i in range(len(runs) - done))  # the runs go in order: the finished are a prefix
                if e.signal_name is None or attempt == 2 or not all(fresh[done:]):
                    raise AssertionError(f"{e} (attempt {attempt}); the ranks' stacks:\n{stacks}") from e
                warnings.warn(f"{e} in run {done + 1} of {len(runs)}; it and the {len(runs) - done - 1} after it "
                              f"start once more. The ranks' stacks:\n{stacks}", stacklevel=2)
                for d in dumps[done:]:
                    shutil.rmtree(d, ignore_errors=True)


def _env_worker(rank: int, world_size: int, folder: str, fn, runs) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["TITAN_TEST_PORTS"] = folder  # where next_torchrun_env finds its ports
    for i, args in enumerate(runs):
        _clear_dtensor_caches()  # see next_torchrun_env
        _set_torchrun_env(rank, world_size, _shared_port(rank, folder, i))
        fn(rank, world_size, *args)


def spawn_torchrun_env(fn, world_size: int, *args) -> None:
    """Call `fn(rank, world_size, *args)` on spawned processes with the environment torchrun would set, but no
    process group yet: for tests that drive titan's own `build` / `main` with extra checks around them. Before each
    further process group in the same call, `fn` calls `next_torchrun_env(run)`."""
    spawn_torchrun_env_runs(fn, world_size, [args])


def spawn_torchrun_env_runs(fn, world_size: int, runs: list[tuple]) -> None:
    """`spawn_torchrun_env` for several argument tuples, one after another in the same processes (each with a fresh
    port, as `run_layouts` does)."""
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_env_worker, args=(world_size, folder, fn, runs), nprocs=world_size,
                           start_method=START_METHOD)


def next_torchrun_env(run: int) -> None:
    """Ready the `run`-th (1, 2, ...) process group of a `spawn_torchrun_env` worker: a fresh port (the previous
    group's store may still hold the old one), and DTensor's caches emptied: they key on meshes by value, so a new
    mesh equal to a destroyed one would get the old mesh's process groups (torch 2.13)."""
    _clear_dtensor_caches()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _set_torchrun_env(rank, world_size, _shared_port(rank, os.environ["TITAN_TEST_PORTS"], run))


def _clear_dtensor_caches() -> None:
    import torch
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute
    from torch.distributed.tensor._ops import single_dim_strategy

    propagator = DTensor._op_dispatcher.sharding_propagator
    caches = [propagator.propagate_op_sharding, type(propagator)._propagate_tensor_meta_cached,
              _redistribute._gen_transform_infos, _collective_utils.MeshTopoInfo.build_from_mesh,
              getattr(single_dim_strategy, "_cached_create_expanded_strategy", None)]
    for cache in caches:
        if hasattr(cache, "cache_clear"):
            cache.cache_clear()
    if hasattr(torch._C, "_clear_DTensor_sharding_propagator_cache"):  # the C++ dispatch's own cache (2.13)
        torch._C._clear_DTensor_sharding_propagator_cache()


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
                       start_method=START_METHOD)


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (`pgrep -P`; Linux): torchrun's workers, for tests that kill them."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if running(int(p))]


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie that nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def readme_command(prefix: str) -> str:
    """The one command in README.md's ```bash blocks that starts with `prefix`."""
    found = [line.strip() for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
             for line in block.splitlines() if line.strip().startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


def read_metrics(dump_folder: str | Path, validation: bool = False) -> list[dict]:
    """The training-step records of a run's metrics.jsonl (and the validation ones too if asked)."""
    lines = (Path(dump_folder) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if validation or "loss" in r]


def losses(dump_folder: str | Path) -> list[float]:
    return [r["loss"] for r in read_metrics(dump_folder)]


def rel_error(got, ref) -> float:
    """||got - ref|| / ||ref|| of two tensors: scale-free, so small gradients are held to the same standard."""
    return ((got - ref).norm() / ref.norm()).item()


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def load_script(name: str):
    """scripts/<name>.py as a module, to call its main() in this process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
