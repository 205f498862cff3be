"""[profiling] and [comm]: torch.profiler traces land in iteration_<step>/rank<r>_trace.json for the configured steps,
a CUDA memory snapshot on CPU stops at start-up with one line naming the key, the step timer's regions add up, and a
collective stuck past comm.train_timeout_seconds fails with titan's hint (gloo, 2 processes)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from dist_utils import TINY, read_metrics, spawn_gloo

from titan.metrics import StepTimer
from titan.train import main


def test_profiler_writes_traces_for_the_configured_steps(tmp_path, one_thread):
    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), "--training.steps", "4",
            "--validation.enable", "false", "--profiling.enable_profiling", "--profiling.profile_freq", "2"]
    assert main(argv) == 0
    folders = sorted(p.name for p in (tmp_path / "profile_traces").iterdir())
    assert folders == ["iteration_2", "iteration_4"]
    for folder in folders:
        trace = json.loads((tmp_path / "profile_traces" / folder / "rank0_trace.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("aten::mm" in n or "aten::addmm" in n for n in names)  # the step's matmuls were recorded
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_memory_snapshot_on_cpu_is_a_config_error(tmp_path, capsys):
    argv = ["--config", TINY, "--job.dump_folder", str(tmp_path), "--training.steps", "1",
            "--profiling.enable_memory_snapshot"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "profiling.enable_memory_snapshot" in err[0], err


def test_step_timer_laps_regions_and_excludes_untimed_ones():
    timer = StepTimer("cpu", keep_history=True)
    timer.start()
    with timer("data"):
        time.sleep(0.02)
    with timer("validation", in_step=False):
        time.sleep(0.05)
    step, regions = timer.lap()
    assert regions["data"] >= 0.02 and regions["validation"] >= 0.05
    assert 0.02 <= step < 0.05 + 0.02  # validation left out of the step
    step2, regions2 = timer.lap()
    assert regions2 == {} and step2 < 0.01
    assert [sorted(h) for h in timer.history] == [["data", "step", "validation"], ["step"]]


def _stuck_collective(rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from titan.parallel.process_group import set_train_timeout, timeout_hint

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    set_train_timeout({"dp": mesh}, 1)
    if rank == 1:
        time.sleep(3)  # never joins the all-reduce
        return
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as error:
        dist.all_reduce(torch.ones(1), group=mesh.get_group())
    assert time.perf_counter() - start < 2.5, "the 1 s train timeout did not apply"
    hint = timeout_hint(error.value)
    assert hint is not None and "comm.train_timeout_seconds" in hint, str(error.value)


@pytest.mark.slow  # ~20 s on the shared 2-core machine, nearly all of it starting two processes
def test_train_timeout_fails_a_stuck_collective_with_a_hint():
    spawn_gloo(_stuck_collective, 2)
