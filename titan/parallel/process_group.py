"""The process group of a run: how it starts (NCCL on GPUs, gloo on CPUs, a group of one for a single process), its
timeouts (a long one for start-up and compilation, a shorter one once step 1 is done), the one sum the loop
reduces by hand, and the object gather and barrier the checkpoint's coordination uses. The mesh over it is
titan/parallel/mesh.py's; what runs on it is everybody else's.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger("titan")


def init_distributed(deterministic: bool, seed: int, timeout_s: int = 300,
                     cpu_collectives: bool = False) -> torch.device:
    """One process group for every launch (a single process gets a group of one), CUDA + NCCL when there is a GPU,
    else CPU + gloo. `timeout_s` ([comm] init_timeout_seconds) bounds each collective until `set_train_timeout`.
    `cpu_collectives` (CPU offload: gradients, optimizer state and their DTensors live in CPU memory) adds gloo for
    CPU tensors to every group: "cuda:nccl,cpu:gloo", as torchtitan does."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; it reads this variable when it first starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    _RUN["timeout"] = timedelta(seconds=timeout_s)
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    if local and world > local and not os.environ.get("GLOO_SOCKET_IFNAME") and int(os.environ.get("RANK", 0)) == 0:
        logger.warning("GLOO_SOCKET_IFNAME is not set on a job of several nodes: titan's gloo groups (stop requests, "
                       "checkpoint coordination) may pick an interface the other nodes cannot reach and hang; "
                       "scripts/run_train.sh sets it")
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=timeout_s))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
    torch.manual_seed(seed)
    return device


def all_reduce_sum(x: torch.Tensor, mesh) -> torch.Tensor:
    dist.all_reduce(x, group=mesh.get_group())
    return x


_RUN: dict = {}  # "timeout": the collective timeout this run's groups have now


def set_timeouts(seconds: int, groups=()) -> None:
    """`seconds` as the collective timeout of every process group this process has (c10d's registry: the default
    group, the mesh's, titan's gloo groups; plus `groups`) and of those `new_group` makes later. Groups made with
    dist.new_group get torch's default instead (30 minutes for gloo, 10 for NCCL), not the default group's."""
    timeout = timedelta(seconds=seconds)
    _RUN["timeout"] = timeout
    # torch >= 2.14 has the public set_timeout (and deprecates _set_pg_timeout with a FutureWarning); 2.13 has not.
    set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    for group in {None} | set(dist.distributed_c10d._world.pg_map) | set(groups):
        set_timeout(timeout, group)


def new_group(**kwargs):
    """dist.new_group with the run's current timeout ([comm] init_timeout_seconds, then train_timeout_seconds)."""
    return dist.new_group(timeout=_RUN.get("timeout"), **kwargs)


def set_train_timeout(mesh: dict, seconds: int) -> None:
    """[comm] train_timeout_seconds for every group (the mesh's among them), as torchtitan does after step 1.
    The barrier first: a rank still finishing step 1 under the long timeout must not make a faster one time out."""
    dist.barrier()
    set_timeouts(seconds, {m.get_group(d) for m in mesh.values() for d in range(m.ndim)})


def timeout_hint(error: BaseException) -> str | None:
    """Advice for a collective that timed out (gloo raises here; NCCL's watchdog aborts with its own message)."""
    text = str(error).lower()
    if "timed out" not in text and "timeout" not in text:
        return None
    return ("a collective timed out (after comm.init_timeout_seconds until step 1 ends, comm.train_timeout_seconds "
            "after it): another rank is stuck or died, see its log; if a step legitimately takes that long (a slow "
            "checkpoint save, compilation), raise the timeout")


def gather_objects(obj, group=None) -> list:
    """`obj` of every rank of `group`, in rank order (picklable objects; no collective in a group of one)."""
    world = dist.get_world_size(group)
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if dist.get_world_size(group) > 1:
        dist.barrier(group=group)
