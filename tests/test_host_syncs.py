"""No avoidable host sync in the training step (issue 27): every read of a tensor's value by the host is counted
with `titan.profiling.HostReads` during whole steps of titan's own loop, on CPU (where the same calls are made as on a
GPU, and each would be a sync there). Outside logging steps the dense step makes exactly one, the non-finite guard's
(titan/guard.py: whether the optimizer steps depends on it), and the MoE layers none. A read added anywhere in the
step fails these tests with the line that made it.

What a CPU run cannot count: reads inside C++ kernels (e.g. torch's grouped-GEMM fallback on GPUs other than
H100/H200 copies its offsets to the host); scripts/gpu_check.py audits a real GPU step with
torch.cuda.set_sync_debug_mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import REPO, TINY

from titan import config_io
from titan.build import build
from titan.profiling import HostReads
from titan.train import train

TINY_MOE = str(REPO / "tests" / "configs" / "tiny_moe.toml")


def _reads_per_step(config: str, tmp_path, *extra: str) -> tuple[list[list[tuple[str, str]]], object]:
    """Train 4 steps (logged: 1 and 4) under HostReads; the reads each step made, in order."""
    # torch.optim's foreach AdamW (the default) keeps its step counters on the host unless capturable, in a GPU run
    # too, and reads them: no sync there, but a CPU run cannot tell them from one. The fused kernels read nothing.
    argv = ["--config", config, "--training.steps", "4", "--metrics.log_freq", "100", "--validation.enable", "false",
            "--optimizer.implementation", "fused", "--job.dump_folder", str(tmp_path), *extra]
    run = build(config_io.load(argv))
    try:
        reads = HostReads()
        per_step, logged = [], run.metrics.step

        def step_ends(step, **kwargs):
            logged(step, **kwargs)
            per_step.append(list(reads.reads))  # the input pipeline's own reads are not counted (host tensors)
            reads.reads.clear()

        run.metrics.step = step_ends
        with reads:
            train(run)
        run.close()
    finally:
        dist.destroy_process_group()
    return per_step, run


def test_dense_step_reads_the_host_once(tmp_path, one_thread):
    """Every step, logged ones included (the guard's values are what the line prints): the guard's read alone."""
    per_step, _ = _reads_per_step(TINY, tmp_path)
    assert len(per_step) == 4
    for reads in per_step:
        assert [what for what, _ in reads] == ["tolist"] and reads[0][1].startswith("titan/guard.py:"), reads


@pytest.mark.parametrize("config, extra", [
    (TINY_MOE, []),
    # DeepSeek-V3 (MLA, group-limited routing, a shared expert; its MTP depth and loss) and gpt-oss (sinks, windows,
    # biased experts: each row's biases found without a sync)
    (str(REPO / "tests" / "configs" / "tiny_deepseek_v3.toml"), ["--model.mtp_layers", "1"]),
    (str(REPO / "tests" / "configs" / "tiny_gpt_oss.toml"), []),
], ids=["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_moe_step_reads_the_host_once_and_its_layers_never(tmp_path, one_thread, config, extra):
    """The tiny MoE models (grouped GEMM: their dims fit `_grouped_mm`'s strides): four MoE layers (three after
    DeepSeek-V3's dense one), each routing with sync-free counts, and the end-of-step statistics read nothing either."""
    per_step, _ = _reads_per_step(config, tmp_path, *extra)
    for step, reads in enumerate(per_step, 1):
        assert not [r for r in reads if "titan/models/" in r[1]], reads
        if step in (2, 3):  # not logged
            assert [what for what, _ in reads] == ["tolist"] and reads[0][1].startswith("titan/guard.py:"), reads
        else:  # logged: the expert loads and imbalances of the line and metrics.jsonl are read as well
            assert {site.split(":")[0] for _, site in reads} == {"titan/guard.py", "titan/metrics.py"}, reads


def test_the_counter_sees_every_kind_of_read():
    """Guards the guard: each way of reading a value on the host is counted, once, at the line that made it."""
    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item()
        float(x[0])
        bool(x[1] > 0)
        x.tolist()
        x.numpy()
        x[x > 2]
        torch.nonzero(x)
        torch.bincount(x.long())
        x.new_tensor(3)
        torch.repeat_interleave(x.long())
        x.to("meta")
        x.new_full((), 3)  # not a read: filled on the device
        torch.zeros(2, dtype=torch.long).scatter_add_(0, x.long() % 2, torch.ones(6, dtype=torch.long))  # neither
    kinds = [what for what, _ in reads.reads]
    assert kinds == ["_local_scalar_dense"] * 3 + ["tolist", "numpy", "index", "nonzero", "bincount", "lift_fresh",
                                                    "repeat_interleave", "_to_copy"], kinds
    assert all(site.startswith("tests/test_host_syncs.py:") for _, site in reads.reads)
    assert torch.Tensor.tolist is not None and "reading" not in torch.Tensor.tolist.__qualname__  # restored
