"""Fixtures shared by several test files, and how the suite shares the machine's cores.

README's test command runs two pytest workers (`-n 2 --dist loadfile`, pytest-xdist): a file's tests stay together
in one worker, so its module fixtures (shared reference runs) are computed once. Each worker then uses one intra-op
thread, also in the processes it starts: two workers with two threads each on 2 cores run several times slower.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# A process a test starts that dies of a signal (SIGSEGV, SIGABRT) prints its Python stack to the captured stderr.
os.environ["PYTHONFAULTHANDLER"] = "1"

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The longest files first, so that neither worker is left alone with one of them at the end (test_parallel.py is
# about a fifth of the suite; test_train.py holds the 100-step README run).
LONGEST_FIRST = ["test_parallel.py", "test_train.py", "test_checkpoint.py", "test_docs.py", "test_finetune.py",
                 "test_expert_parallel.py", "test_launch.py", "test_dry_run.py", "test_float8.py", "test_moe.py",
                 "test_reliability.py", "test_prepare.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # pytest-xdist would order files by their number of tests instead


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: order within a file kept


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after: fast on a shared 2-core machine, and titan's CPU results do
    not depend on the thread count (tests/test_golden.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mesh():
    """A one-process gloo group and mesh, for in-process tests of code that reduces over a mesh or shards on one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():  # left by another in-process test: use it as it is
        assert dist.get_world_size() == 1
        yield init_device_mesh("cpu", (1,))
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
